"""Installing the rules on a model for one forward pass, and what makes a record unusable."""

import contextlib
import functools
import weakref

import keras
import tensorflow as tf

from keras_safe.privacy.model_checks import all_layers
from keras_safe.privacy.per_example.registry import find_rule, is_builtin

__all__ = ["MAX_UNROLL", "installed_taps", "tapped_layers", "unrolled", "untap_unsafe_layers"]

MAX_UNROLL = 200

# Per layer, whether a trace with a known batch size saw its recorded rows differ from the
# examples (a layer applied to a batch axis folded with others).
_FOLDED = weakref.WeakKeyDictionary()
"""Recurrent layers with up to this many (static) time steps run unrolled so cells are tapped."""


def tapped_layers(model):
    """Returns `{layer: rule}` for the model's trainable layers that a rule supports."""
    result = {}
    for layer in all_layers(model):
        if not layer.trainable or not layer.trainable_weights:
            continue
        rule = find_rule(layer)
        if rule is not None:
            result[layer] = rule
    return result


@contextlib.contextmanager
def installed_taps(taps, records, untapped, sentinel):
    """Swaps each tapped layer's `call` for its rule's recording `forward` while the block runs.

    A call in another graph than the forward pass's (inside a loop or branch body) runs the
    layer's own `call` and marks the layer untapped: its tensors cannot be differentiated from
    outside that body. Tapped calls do not record on `sentinel`, so the sentinel tape sees the
    variables used outside tapped calls.

    Args:
        taps: `{layer: rule}`.
        records: a list receiving `(layer, saved, zs)` per tapped call.
        untapped: a set receiving the layers whose records cannot be used.
        sentinel: a `tf.GradientTape` recording the forward pass.
    """
    installed = []
    graph = tf.compat.v1.get_default_graph()
    try:
        for layer, rule in taps.items():
            original = layer.call

            @functools.wraps(original)
            def tapped_call(*args, _layer=layer, _rule=rule, _original=original, **kwargs):
                if tf.compat.v1.get_default_graph() is not graph:
                    untapped.add(_layer)
                    return _original(*args, **kwargs)
                kwargs.pop("training", None)
                with sentinel.stop_recording():
                    return _rule.forward(
                        _layer,
                        lambda saved, *zs, _l=_layer: records.append((_l, saved, zs)),
                        *args,
                        **kwargs,
                    )

            object.__setattr__(layer, "call", tapped_call)
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            object.__delattr__(layer, "call")


@contextlib.contextmanager
def unrolled(rnn_layers):
    """Runs recurrent layers with tapped cells unrolled (time steps up to `MAX_UNROLL`).

    Unrolled, every step's cell call lives in the forward pass's graph, so the cell rules can
    record it; with a symbolic loop the cell goes to the Jacobian fallback.
    """
    installed = []
    try:
        for layer in rnn_layers:
            original = layer.call

            @functools.wraps(original)
            def unrolled_call(sequences, *args, _layer=layer, _original=original, **kwargs):
                steps = keras.tree.flatten(sequences)[0].shape[1]
                if _layer.unroll or steps is None or steps > MAX_UNROLL:
                    return _original(sequences, *args, **kwargs)
                object.__setattr__(_layer, "unroll", True)
                try:
                    return _original(sequences, *args, **kwargs)
                finally:
                    object.__setattr__(_layer, "unroll", False)

            object.__setattr__(layer, "call", unrolled_call)
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            object.__delattr__(layer, "call")


def untap_unsafe_layers(taps, records, untapped, sentinel, losses):
    """Adds to `untapped` the layers whose records do not describe per-example gradients.

    - a tapped variable also read outside its tapped call (tied weights): the records miss
      that part of its gradient;
    - records whose leading axis is not the example axis (the model folded other axes into
      the batch before the layer): each row would be clipped on its own.

    Returns runtime checks of the leading axis where it is not known while tracing.
    """
    # The tape watches the backend variables behind Keras variables (`variable.value`).
    outside = {id(v) for v in sentinel.watched_variables()}
    for layer in taps:
        if any(id(v.value) in outside or id(v) in outside for v in layer.trainable_weights):
            untapped.add(layer)
    batch = losses.shape[0]
    pending = []
    for layer, saved, zs in records:
        # The built-in rules record `saved` and `zs` with the same rows; a registered rule's
        # outputs are checked too.
        tensors = [keras.tree.flatten(saved)[0]]
        if not is_builtin(taps[layer]):
            tensors.extend(zs)
        for tensor in tensors:
            rows = tensor.shape[0]
            if rows is not None and batch is not None:
                _FOLDED[layer] = _FOLDED.get(layer, False) or rows != batch
                if rows != batch:
                    untapped.add(layer)
            elif _FOLDED.get(layer):
                # A trace with a known batch size saw this layer's rows differ from the
                # examples (a batch axis folded in); a trace without one (the last, smaller
                # batch of an epoch) sends it to the fallback too, instead of failing.
                untapped.add(layer)
            else:
                pending.append((layer, tensor))
    return [
        tf.debugging.assert_equal(
            tf.shape(tensor)[0],
            tf.shape(losses)[0],
            message=f"{layer.name} sees a batch axis that is not the example axis; DP-SGD "
            "cannot clip its gradients per example with layer rules.",
        )
        for layer, tensor in pending
        if layer not in untapped
    ]
