"""LayerNormalization and GroupNormalization: per-example gradients of the scale and offset.

The rule records the normalised input `n` and the affine output `z = gamma n + beta`; the
per-example gradients are `sum(n * dz)` and `sum(dz)` over the axes the parameters are shared
across, materialised (they are as small as the parameters).
"""

import keras

from keras_safe.privacy.per_example.forms import summed_form
from keras_safe.privacy.per_example.numerics import working
from keras_safe.privacy.per_example.rules.base import PerExampleRule, plain_keras_call

__all__ = ["GroupNormRule", "LayerNormRule"]


def _param_axes(layer, rank):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axes)


def _broadcast(param, axes, rank, shape=None):
    """`param` shaped to broadcast against a rank-`rank` tensor along `axes` (its own shape, or
    `shape` when the parameter is viewed split, as GroupNormalization's channels in groups)."""
    full = [1] * rank
    for axis, size in zip(axes, shape or param.shape):
        full[axis] = size
    return keras.ops.reshape(param, full)


def _normalize(layer, x, mean, variance, param_axes, param_shape=None):
    """`(normalized, out)`: `(x - mean) / sqrt(variance + epsilon)` and the affine output.

    The output is computed as Keras computes it, `x * scale + offset` with the per-group scale
    and offset folded first (two passes over `x`, and two in the backward pass). The normalised
    input `n` is not on the loss's path: it is computed beside it, for the per-example gradient
    of the scale, `sum(n * dz)` (`n` is the exact derivative of the output by the scale).
    """
    rank = len(x.shape)
    inv = keras.ops.rsqrt(variance + layer.epsilon)
    normalized = (x - mean) * inv
    scale, offset = inv, -mean * inv
    if layer.scale:
        gamma = keras.ops.cast(_broadcast(layer.gamma, param_axes, rank, param_shape), x.dtype)
        scale, offset = scale * gamma, offset * gamma
    if layer.center:
        offset = offset + keras.ops.cast(
            _broadcast(layer.beta, param_axes, rank, param_shape), x.dtype
        )
    return normalized, x * scale + offset


def _affine_forms(layer, normalized, dz, axes):
    reduce_axes = [a for a in range(1, len(dz.shape)) if a not in axes]
    normalized, dz = working(normalized), working(dz)
    forms = []
    if layer.scale:
        forms.append(summed_form(layer.gamma, normalized * dz, reduce_axes))
    if layer.center:
        forms.append(summed_form(layer.beta, dz, reduce_axes))
    return forms


def _float32(x):
    return x if x.dtype == "float64" else keras.ops.cast(x, "float32")


class LayerNormRule(PerExampleRule):
    """`keras.layers.LayerNormalization` without `rms_scaling`."""

    @staticmethod
    def supports(layer):
        return plain_keras_call(layer, keras.layers.LayerNormalization) and not layer.rms_scaling

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        axes = _param_axes(layer, len(inputs.shape))
        x = _float32(inputs)
        mean, variance = keras.ops.moments(x, axes=axes, keepdims=True)
        normalized, out = _normalize(layer, x, mean, variance, axes)
        record(keras.ops.cast(normalized, inputs.dtype), out)
        return keras.ops.cast(out, layer.compute_dtype)

    @staticmethod
    def forms(layer, normalized, dz):
        return _affine_forms(layer, normalized, dz, _param_axes(layer, len(dz.shape)))


class GroupNormRule(PerExampleRule):
    """`keras.layers.GroupNormalization`."""

    @staticmethod
    def supports(layer):
        return plain_keras_call(layer, keras.layers.GroupNormalization)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        rank = len(inputs.shape)
        axis = layer.axis % rank
        channels = inputs.shape[axis]
        shape = keras.ops.shape(inputs)
        split = (layer.groups, channels // layer.groups)
        x = keras.ops.reshape(
            keras.ops.cast(inputs, "float32"), (*shape[:axis], *split, *shape[axis + 1 :])
        )
        reduce_axes = [a for a in range(1, rank + 1) if a != axis]
        mean, variance = keras.ops.moments(x, axes=reduce_axes, keepdims=True)
        normalized, out = _normalize(layer, x, mean, variance, [axis, axis + 1], split)
        out = keras.ops.reshape(out, shape)
        record(keras.ops.cast(keras.ops.reshape(normalized, shape), inputs.dtype), out)
        return keras.ops.cast(out, layer.compute_dtype)

    @staticmethod
    def forms(layer, normalized, dz):
        return _affine_forms(layer, normalized, dz, [layer.axis % len(dz.shape)])
