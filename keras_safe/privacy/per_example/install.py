"""Installing the rules on a model for one forward pass, and what makes a record unusable."""

import contextlib
import functools
import weakref

import keras
import tensorflow as tf

from keras_safe.privacy.model_checks import all_layers
from keras_safe.privacy.per_example.registry import find_rule, is_builtin

__all__ = [
    "MAX_UNROLL",
    "exclude_unusable_layers",
    "installed_rules",
    "layers_with_rules",
    "unrolled",
]

MAX_UNROLL = 200
"""Recurrent layers with up to this many (static) time steps run unrolled, so that their cells'
rules record every step."""

# Per layer, whether a trace with a known batch size saw its recorded rows differ from the
# examples (a layer applied to a batch axis folded with others).
_FOLDED = weakref.WeakKeyDictionary()


def layers_with_rules(model):
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
def installed_rules(rules, records, excluded, sentinel):
    """Swaps the `call` of each layer with a rule for the rule's recording `forward` while the
    block runs.

    A call in another graph than the forward pass's (inside a loop or branch body) runs the
    layer's own `call` and marks the layer excluded: its tensors cannot be differentiated from
    outside that body. Recording calls do not record on `sentinel`, so the sentinel tape sees the
    variables used outside them.

    Args:
        rules: `{layer: rule}`.
        records: a list receiving `(layer, saved, zs)` per recording call.
        excluded: a set receiving the layers whose records cannot be used.
        sentinel: a `tf.GradientTape` recording the forward pass.
    """
    installed = []
    graph = tf.compat.v1.get_default_graph()
    try:
        for layer, rule in rules.items():
            original = layer.call

            @functools.wraps(original)
            def recording_call(*args, _layer=layer, _rule=rule, _original=original, **kwargs):
                if tf.compat.v1.get_default_graph() is not graph:
                    excluded.add(_layer)
                    return _original(*args, **kwargs)
                kwargs.pop("training", None)
                with sentinel.stop_recording():
                    return _rule.forward(
                        _layer,
                        lambda saved, *zs, _l=_layer: records.append((_l, saved, zs)),
                        *args,
                        **kwargs,
                    )

            object.__setattr__(layer, "call", recording_call)  # keras-internal: layer-call-patch
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            object.__delattr__(layer, "call")  # keras-internal: layer-call-patch


@contextlib.contextmanager
def unrolled(rnn_layers):
    """Runs recurrent layers whose cells have rules unrolled (time steps up to `MAX_UNROLL`).

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
                object.__setattr__(_layer, "unroll", True)  # keras-internal: rnn-unroll
                try:
                    return _original(sequences, *args, **kwargs)
                finally:
                    object.__setattr__(_layer, "unroll", False)  # keras-internal: rnn-unroll

            object.__setattr__(layer, "call", unrolled_call)  # keras-internal: layer-call-patch
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            object.__delattr__(layer, "call")  # keras-internal: layer-call-patch


def exclude_unusable_layers(rules, records, excluded, sentinel, losses):
    """Adds to `excluded` the layers whose records do not describe per-example gradients.

    - a variable of a layer with a rule also read outside the rule's call (tied weights): the
      records miss that part of its gradient;
    - records whose leading axis is not the example axis (the model folded other axes into
      the batch before the layer): each row would be clipped on its own.

    Returns runtime checks of the leading axis where it is not known while tracing.
    """
    # The tape watches the backend variables behind Keras variables (`variable.value`).
    outside = {id(v) for v in sentinel.watched_variables()}
    for layer in rules:
        if any(id(v.value) in outside or id(v) in outside for v in layer.trainable_weights):
            excluded.add(layer)
    batch = losses.shape[0]
    pending = []
    for layer, saved, zs in records:
        # The built-in rules record `saved` and `zs` with the same rows; a registered rule's
        # outputs are checked too.
        tensors = [keras.tree.flatten(saved)[0]]
        if not is_builtin(rules[layer]):
            tensors.extend(zs)
        for tensor in tensors:
            rows = tensor.shape[0]
            if rows is not None and batch is not None:
                _FOLDED[layer] = _FOLDED.get(layer, False) or rows != batch
                if rows != batch:
                    excluded.add(layer)
            elif _FOLDED.get(layer):
                # A trace with a known batch size saw this layer's rows differ from the
                # examples (a batch axis folded in); a trace without one (the last, smaller
                # batch of an epoch) sends it to the fallback too, instead of failing.
                excluded.add(layer)
            else:
                pending.append((layer, tensor))
    pending = [(layer, tensor) for layer, tensor in pending if layer not in excluded]
    if not pending:
        return []
    # One check for every record (an unrolled recurrent layer records each of its steps): the
    # step's graph holds one assertion, not one per record.
    rows = tf.stack([tf.shape(tensor, out_type=tf.int64)[0] for _, tensor in pending])
    apart = tf.equal(rows, tf.shape(losses, out_type=tf.int64)[0])
    names = tf.constant([layer.name for layer, _ in pending])
    first = tf.argmin(tf.cast(apart, tf.int32))
    return [
        tf.debugging.Assert(
            tf.reduce_all(apart),
            [
                tf.gather(names, first),
                "sees a batch axis that is not the example axis; DP-SGD cannot clip its "
                "gradients per example with layer rules.",
            ],
        )
    ]
