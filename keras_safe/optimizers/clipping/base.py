"""What a clip rule of `GradientClip` provides, and the norm arithmetic the rules share.

A clip rule is one clipping algorithm (one `mode` of `GradientClip`). It validates its own
arguments when it is made, creates its own state variables (as variables of the optimizer, so
they are saved with it), clips the gradients of a step and then advances its state. The
wrapper, `GradientClip`, owns everything the rules share: the gradient norms, the statistics,
the non-finite guard and `step_logs()`.
"""

from keras import ops

from keras_safe._validation import fail

__all__ = ["ClipRule", "any_flag", "l2_norm", "scale_factor", "scale_gradients"]


def l2_norm(x, axis=None, keepdims=False):
    """The L2 norm of `x` computed in float32 (over all axes by default).

    Example:
        >>> float(l2_norm([3.0, 4.0]))
        5.0
    """
    x = ops.cast(ops.convert_to_tensor(x), "float32")
    return ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=keepdims))


def scale_factor(norm, threshold):
    """`min(1, threshold / norm)`: safe for a zero norm and for an infinite threshold.

    Example:
        >>> float(scale_factor(4.0, 1.0)), float(scale_factor(0.0, 1.0))
        (0.25, 1.0)
    """
    norm = ops.convert_to_tensor(norm, "float32")
    threshold = ops.convert_to_tensor(threshold, "float32")
    return ops.where(ops.greater(norm, threshold), threshold / ops.maximum(norm, 1e-30), 1.0)


def scale_gradients(grads, norm, threshold):
    """Scales every gradient by `min(1, threshold / norm)` (None entries stay None).

    Returns:
        `(scaled gradients, whether norm > threshold)`.
    """
    factor = scale_factor(norm, threshold)
    scaled = [None if g is None else g * ops.cast(factor, g.dtype) for g in grads]
    return scaled, ops.greater(norm, threshold)


def any_flag(flags):
    """True if any of the boolean scalar tensors in `flags` is (False for an empty list)."""
    if not flags:
        return ops.convert_to_tensor(False)
    return ops.any(ops.stack(flags))


class ClipRule:
    """Base class of the clip rules: one clipping algorithm of `GradientClip`.

    A subclass sets `mode` (the `GradientClip(mode=...)` string that selects it) and
    `arguments` (the `GradientClip` keyword arguments it reads, which are also its config
    keys and attributes), validates them in `__init__`, and implements `clip`. A rule with
    state creates it in `build` with `optimizer.add_variable` and advances it in `update`.

    `GradientClip` calls, at every step, `clip(grads, variables, norms, global_norm)` and then
    `update(global_norm, was_clipped, finite)`:

    - `grads`: the gradients to clip, one per variable, None where there is none (or where the
      variable is overwritten with its "gradient", as float8 scales are);
    - `norms`: the float32 L2 norm of each of `grads` (None where the gradient is None);
    - `global_norm`: the L2 norm of all of them together (float32 scalar);
    - `finite`: whether every gradient of the step is finite. A rule must leave its state
      unchanged when it is False (a non-finite step never moves a threshold).
    """

    #: The `GradientClip(mode=...)` string that selects the rule.
    mode = None
    #: The `GradientClip` arguments the rule reads (its config keys and attributes).
    arguments = ()
    #: Variables that keras_safe 0.1.0 saved right after this rule's own, which the rule no
    #: longer has; `GradientClip.load_own_variables` skips them in files of that version.
    legacy_unused_variables = 0

    @classmethod
    def select(cls, arguments):
        """The rule class for these `GradientClip` arguments (a mode may have variants)."""
        del arguments
        return cls

    @classmethod
    def reject(cls, name, value):
        """Raises the error for a `GradientClip` argument that this rule does not read."""
        fail(
            name,
            value,
            f"left unset with mode={cls.mode!r}, which does not read it",
            f"remove it; mode={cls.mode!r} reads {', '.join(cls.arguments)}.",
        )

    def build(self, optimizer, var_list):
        """Creates the rule's state variables with `optimizer.add_variable` (none by default)."""
        del optimizer, var_list

    def clip(self, grads, variables, norms, global_norm):
        """Clips one step's gradients.

        Returns:
            `(clipped, was_clipped)`: the gradients aligned with `grads` (None stays None) and
            a boolean scalar tensor, whether any gradient was changed.
        """
        raise NotImplementedError

    def update(self, global_norm, was_clipped, finite):
        """Advances the rule's state after `clip` (nothing by default)."""
        del global_norm, was_clipped, finite

    def step_logs(self):
        """The rule's own figures for the training logs (none by default)."""
        return {}

    def get_config(self):
        """The rule's arguments, as `GradientClip` takes them."""
        return {name: getattr(self, name) for name in self.arguments}

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"
