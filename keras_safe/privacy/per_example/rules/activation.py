"""PReLU: `out = relu(x) + alpha * min(x, 0)`, per-example gradient `sum min(x, 0) * dz` over
the shared axes."""

import keras

from keras_safe.privacy.per_example.forms import summed_form
from keras_safe.privacy.per_example.numerics import working
from keras_safe.privacy.per_example.rules.base import PerExampleRule, plain_keras_call

__all__ = ["PReLURule"]


class PReLURule(PerExampleRule):
    """`keras.layers.PReLU` (any `shared_axes`)."""

    @staticmethod
    def supports(layer):
        return plain_keras_call(layer, keras.layers.PReLU)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        negative = -keras.ops.relu(-inputs)
        z = layer.alpha * negative
        record(negative, z)
        return keras.ops.relu(inputs) + z

    @staticmethod
    def forms(layer, negative, dz):
        shared = [
            axis
            for axis, size in enumerate(layer.alpha.shape, start=1)
            if size == 1 and dz.shape[axis] != 1
        ]
        return [summed_form(layer.alpha, working(negative) * working(dz), shared)]
