"""The base class of per-example gradient rules and helpers the built-in rules share."""

import math

import keras

__all__ = ["PerExampleRule", "as_sequence", "finish", "plain_keras_call", "positions", "rule_name"]


class PerExampleRule:
    """A per-example gradient rule for one kind of layer.

    While the DP forward pass runs, every layer a rule supports runs the rule's `forward` in
    place of its own `call`; `forward` records what the per-example gradients of the layer's
    weights need. After one backward pass, `forms` turns each record into gradient forms
    (`keras_safe.privacy.per_example.forms`), from which keras_safe takes each example's norm
    and the sum of the clipped gradients. Register a rule with
    `keras_safe.privacy.register_rule`; its contract is written there.

    Subclasses define the three static methods below. `name` (default: the class name) is
    used in messages.
    """

    name = None

    @staticmethod
    def supports(layer):
        """True when this rule reproduces `layer.call` exactly and covers its weights."""
        raise NotImplementedError

    @staticmethod
    def forward(layer, record, *args, **kwargs):
        """Runs in place of `layer.call`; calls `record(saved, *zs)`; returns the output."""
        raise NotImplementedError

    @staticmethod
    def forms(layer, saved, *dzs):
        """A list of gradient forms for the layer's trainable weights, one record's worth."""
        raise NotImplementedError


def rule_name(rule):
    """The name a rule goes by in messages."""
    return getattr(rule, "name", None) or getattr(rule, "__name__", None) or type(rule).__name__


def plain_keras_call(layer, cls):
    """True when `layer` runs `cls.call` unchanged (no subclass override, LoRA or quantization)."""
    return (
        isinstance(layer, cls)
        and type(layer).call is cls.call
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "_remat_mode", None)  # keras-internal: remat-mode
    )


def positions(t, *tail):
    """Reshapes `[B, ...]` to `[B, T, *tail]`, with T static whenever the shape allows.

    A static T lets the forms choose their norm method while tracing, also when the batch
    size is unknown.
    """
    known = t.shape[1:].num_elements()
    if known is not None:
        return keras.ops.reshape(t, (-1, known // math.prod(tail), *tail))
    return keras.ops.reshape(t, (keras.ops.shape(t)[0], -1, *tail))


def as_sequence(t):
    """Flattens `[B, ..., K]` to `[B, T, K]` (T = 1 for rank-2 inputs)."""
    t = keras.ops.convert_to_tensor(t)
    if len(t.shape) == 2:
        return t[:, None, :]
    return positions(t, t.shape[-1])


def finish(layer, z):
    """Applies the layer's activation (if any) to the pre-activation `z`."""
    if layer.activation is not None:
        z = layer.activation(z)
    return z
