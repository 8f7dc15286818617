"""Dense: per-example kernel gradient `sum_t a_t g_t^T`, bias gradient `sum_t g_t`."""

import keras

from keras_safe.privacy.per_example.forms import OuterProductGrad, summed_form
from keras_safe.privacy.per_example.rules.base import TapRule, as_sequence, finish, plain_keras_call

__all__ = ["DenseRule", "bias_form"]


def bias_form(variable, g):
    """The form of a bias added at every position: `sum_t g_t` per example (`g`: `[B, T, O]`)."""
    return summed_form(variable, g, [1])


class DenseRule(TapRule):
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
        a, g = as_sequence(inputs), as_sequence(dz)
        forms = [OuterProductGrad(layer.kernel, a, g, layer.kernel.shape)]
        if layer.bias is not None:
            forms.append(bias_form(layer.bias, g))
        return forms
