"""Which gradient tensors are a DP release: the check a DP optimizer makes before applying.

A DP optimizer may only apply gradients that its own `privatize` produced from the clipped sum of
the same step, or that a keras_safe optimizer wrapper derived from such gradients (clipping a
noisy gradient again is post-processing). The check follows the data, not a flag: `privatize`
records the exact tensor objects it returns (in eager mode, or in the graph being traced), and
`DPOptimizer.apply` accepts a list of gradients only if every one of them is such a tensor.
Gradients from `tape.gradient`, from Keras's default train step, from an earlier eager call, or
arithmetic on released gradients are other tensor objects and are refused, whatever happened
before; nothing is "armed" that a later or failed step could inherit.

Tensors are held by weak reference: the record never keeps a graph or a tensor alive.

Releasing is the train step's alone: `privatize` runs only inside `releasing()`, which keras_safe's
step opens around it after the step's clipping, checks and charge are in place. Called anywhere
else (on gradients no clipping pass produced, with nothing charged) it refuses.
"""

import contextlib
import contextvars
import weakref

__all__ = ["in_release", "is_released", "mark_released", "releasing", "unreleased"]

_RELEASING = contextvars.ContextVar("keras_safe_releasing", default=False)


@contextlib.contextmanager
def releasing():
    """The context in which keras_safe's train step calls `DPOptimizer.privatize`."""
    token = _RELEASING.set(True)
    try:
        yield
    finally:
        _RELEASING.reset(token)


def in_release():
    """True inside `releasing()`."""
    return _RELEASING.get()


# id(tensor) -> weak reference to it. The weak reference also guards against a recycled id:
# an entry counts only while it still points at the very same object.
_RELEASED = {}


def _forget(key):
    def callback(_):
        _RELEASED.pop(key, None)

    return callback


def mark_released(tensors):
    """Records `tensors` (a list; None entries are skipped) as a DP release; returns them."""
    for tensor in tensors:
        if tensor is not None:
            key = id(tensor)
            _RELEASED[key] = weakref.ref(tensor, _forget(key))
    return tensors


def is_released(tensor):
    """True if `tensor` is a tensor object recorded by `mark_released`."""
    ref = _RELEASED.get(id(tensor))
    return ref is not None and ref() is tensor


def unreleased(grads):
    """Indices of the non-None gradients in `grads` that are not a recorded DP release."""
    return [i for i, g in enumerate(grads) if g is not None and not is_released(g)]
