"""PreprocessingStack: a layer that adapts its layers in order on training data only."""

import math

import keras
import numpy as np

from keras_safe._data import describe, to_numpy
from keras_safe._validation import check_number, fail

__all__ = ["PreprocessingStack"]


def _adapted_on_data(layer):
    """Whether `layer` holds statistics of the data adapted without DP."""
    adapted = getattr(layer, "is_adapted", None)
    if adapted is not None:
        return bool(adapted) and getattr(layer, "uses_data", True)
    return hasattr(layer, "adapt")  # a Keras preprocessing layer adapted inside the stack


@keras.saving.register_keras_serializable(package="keras_safe")
class PreprocessingStack(keras.layers.Layer):
    """A chain of preprocessing layers, adapted in order and used as one layer.

    `adapt(x_train)` adapts the first layer on `x_train`, passes `x_train` through it, adapts
    the second layer on that output, and so on, so each layer sees the data as it will at
    serving time. Adapt it on the training part only (see `train_val_test_split`): statistics
    computed on validation or test rows leak them into the model. Layers without `adapt` (for
    example a `keras.layers.Rescaling`) are applied as they are; Keras's own adaptable layers
    (such as `keras.layers.Normalization`) work too.

    The stack is a Keras layer: put it first in a model so the statistics are saved with it,
    or map it over a `tf.data.Dataset`. `dp_epsilon_spent` adds up the epsilons of the
    differentially private layers (sequential composition: they all read the same rows).

    Args:
        layers: list of Keras layers, applied in this order.
        **kwargs: base `keras.layers.Layer` arguments.

    Returns:
        Called on a tensor, the output of the last layer.

    Raises:
        ArgumentError: an empty list or an entry that is not a Keras layer.

    Example:
        >>> import numpy as np
        >>> import keras
        >>> from keras_safe.preprocessing import (
        ...     Imputer, OutlierClipper, PreprocessingStack, RobustNormalization)
        >>> x_train = np.random.default_rng(0).normal(size=(200, 3))
        >>> x_train[0, 0], x_train[1, 1] = np.nan, 1e6
        >>> stack = PreprocessingStack([Imputer(), OutlierClipper(), RobustNormalization()])
        >>> stack.adapt(x_train)
        >>> model = keras.Sequential([keras.Input((3,)), stack, keras.layers.Dense(1)])
        >>> bool(np.all(np.isfinite(model.predict(x_train, verbose=0))))
        True
    """

    def __init__(self, layers, **kwargs):
        super().__init__(**kwargs)
        if (
            isinstance(layers, keras.layers.Layer)
            or not isinstance(layers, (list, tuple))
            or not layers
        ):
            fail(
                "layers",
                describe(layers),
                "a non-empty list of Keras layers",
                "pass for example [Imputer(), RobustNormalization()].",
            )
        for i, layer in enumerate(layers):
            if not isinstance(layer, keras.layers.Layer):
                fail(
                    f"layers[{i}]",
                    describe(layer),
                    "a Keras layer",
                    "pass layers such as keras_safe.preprocessing.Imputer().",
                )
        self._stack = list(layers)
        self._build_input_shape = None

    @property
    def layers(self):
        """The layers of the stack, in order."""
        return list(self._stack)

    def build(self, input_shape):
        self._build_input_shape = tuple(input_shape)
        shape = tuple(input_shape)
        for layer in self._stack:
            if not layer.built:
                layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        self.built = True

    def get_build_config(self):
        if self._build_input_shape is not None:
            return {"input_shape": list(self._build_input_shape)}
        return None

    def build_from_config(self, config):
        if config:
            self.build(config["input_shape"])

    def adapt(self, data, batch_size=8192):
        """Adapts every layer, in order, on the output of the layers before it.

        The data is materialised in memory as a numpy array (float64 while adapting).

        Args:
            data: training features: numpy array, tensor, pandas DataFrame or
                `tf.data.Dataset` (for `(x, y)` elements only `x` is used).
            batch_size: rows per eager call when passing the data through a layer.

        Raises:
            ArgumentError: empty data, or any error of a layer's own `adapt`.
        """
        batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        x, _ = to_numpy(data, "data")
        if x.shape[0] == 0:
            fail("data", describe(x), "non-empty", "pass the training rows.")
        if not self.built:
            self._build_input_shape = (None,) + tuple(x.shape[1:])
        for i, layer in enumerate(self._stack):
            if hasattr(layer, "adapt"):
                layer.adapt(x)
            if i + 1 < len(self._stack):
                x = np.concatenate(
                    [
                        np.asarray(layer(x[s : s + batch_size]), dtype="float64")
                        for s in range(0, x.shape[0], batch_size)
                    ],
                    axis=0,
                )
        if not self.built:
            self.build(self._build_input_shape)

    @property
    def dp_epsilon_spent(self):
        """Sum of the epsilons spent by the layers' `adapt` (basic composition).

        Infinite when a layer adapted on exact statistics (a keras_safe layer without
        `dp_epsilon`, or a Keras preprocessing layer such as `Normalization`): the stack then
        releases non-private statistics of the data.
        """
        total = 0.0
        for layer in self._stack:
            if getattr(layer, "dp_epsilon", None) is not None:
                total += float(layer.dp_epsilon_spent)
            elif _adapted_on_data(layer):
                return math.inf
        return total

    def call(self, inputs):
        x = inputs
        for layer in self._stack:
            x = layer(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self._stack:
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    def get_config(self):
        config = super().get_config()
        config["layers"] = [keras.saving.serialize_keras_object(layer) for layer in self._stack]
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layers"] = [keras.saving.deserialize_keras_object(c) for c in config["layers"]]
        return cls(**config)
