"""Dense: per-example kernel gradient `sum_t a_t g_t^T`, bias gradient `sum_t g_t`."""

import keras
import tensorflow as tf

from keras_safe.privacy.per_example.forms import (
    MaterialisedGrad,
    OuterProductGrad,
    SharedBiasGrad,
    summed_form,
)
from keras_safe.privacy.per_example.numerics import gamma, static_size, unit_roundoff, working
from keras_safe.privacy.per_example.rules.base import (
    PerExampleRule,
    as_sequence,
    finish,
    plain_keras_call,
)

__all__ = ["DenseRule", "bias_form", "outer_product_forms"]


def bias_form(variable, g, g_norm_bound=None):
    """The form of a bias added at every position: `sum_t g_t` per example (`g`: `[B, T, O]`).

    With `g_norm_bound` (a float64 bound of each example's `||g||_F`), the rounding bound of
    the sum over positions uses `|| sum_t |g_t| || <= sqrt(T) ||g||_F` instead of a pass over g.
    """
    steps = static_size(g, 1)
    if g_norm_bound is None or (isinstance(steps, int) and steps == 1):
        return summed_form(variable, g, [1])
    error = gamma(steps, unit_roundoff(working(g).dtype)) * tf.sqrt(tf.cast(steps, "float64"))
    summed = tf.reshape(keras.ops.sum(working(g), axis=1), [-1, *variable.shape])
    return MaterialisedGrad(variable, summed, error * g_norm_bound)


class DenseRule(PerExampleRule):
    """`keras.layers.Dense` on inputs of any rank (a sequence of T positions per example)."""

    @staticmethod
    def supports(layer):
        return plain_keras_call(layer, keras.layers.Dense)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        z = keras.ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = z + layer.bias
        record(inputs, z)
        return finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        return outer_product_forms(layer.kernel, layer.bias, as_sequence(inputs), as_sequence(dz))


def outer_product_forms(kernel, bias, a, g):
    """The forms of a Dense layer's kernel (`a`: `[B, T, K]`, `g`: `[B, T, O]`) and of its bias
    over all of O (or None)."""
    kernel_form = OuterProductGrad(kernel, a, g, kernel.shape)
    if bias is None:
        return [kernel_form]
    if g.shape[1] == 1:
        # One position: the bias gradient is g itself; its sum of squares and scaled rows are
        # the kernel form's.
        return [kernel_form, SharedBiasGrad(bias, kernel_form)]
    return [kernel_form, bias_form(bias, g)]
