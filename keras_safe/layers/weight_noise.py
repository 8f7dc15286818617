"""Weight noise: Gaussian perturbation of a layer's weights during training.

Weight noise is offered as a layer wrapper and not as a `keras.regularizers.Regularizer`:
a Keras regulariser can only add a penalty computed from the weights to the loss, while weight
noise changes the forward pass itself (the loss is evaluated at perturbed weights), which only
a layer can do.
"""

import inspect
import numbers

import keras
from keras import ops

MODES = ("additive", "multiplicative")


@keras.saving.register_keras_serializable(package="keras_safe")
class WeightNoise(keras.layers.Wrapper):
    """Perturbs the wrapped layer's trainable weights with fresh Gaussian noise in training.

    On every forward pass with `training=True` each trainable weight `W` of the wrapped layer
    is replaced, for that pass only, by

    - `W + s * eps` (`mode="additive"`, Graves 2011, "Practical Variational Inference for
      Neural Networks"), or
    - `W * (1 + s * eps)` (`mode="multiplicative"`: noise relative to the weight's size, in
      the spirit of the parametric noise injection of He, Rakin and Fan 2019),

    with `eps ~ N(0, 1)` drawn anew for every pass from a `keras.random.SeedGenerator`. The
    wrapped layer's own computation runs on the noisy weights (through
    `Layer.stateless_call`), so the loss and its gradients are evaluated at the noisy
    weights, and the optimizer updates the clean weights. With `training=False` (`predict`,
    `evaluate`) the clean weights are used and the output is deterministic.

    The scale `s` is `stddev` (fixed), or with `learnable=True` one trainable non-negative
    scalar per wrapped weight, initialised at `stddev` (He et al. 2019 learn it jointly with
    the weights, usually together with adversarial training; on its own the clean loss tends
    to drive it towards 0).

    Works around any layer with trainable weights (Dense, Conv1D/2D/3D, Embedding, ...).
    Non-trainable state of the wrapped layer (e.g. BatchNormalization statistics) is updated
    as usual; losses the wrapped layer adds (in `call`, or through its activity regularizer)
    are kept. Weight regularisers of the wrapped layer are computed on the clean weights.

    Args:
        layer: the `keras.layers.Layer` to wrap.
        stddev: the noise scale `s` (or its initial value when learnable), >= 0.
        mode: `"additive"` or `"multiplicative"`.
        learnable: whether the scale is a trainable weight.
        seed: optional int seed of the noise.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Raises:
        ValueError: if `layer` is not a Keras layer, `stddev` is negative or `mode` unknown.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.layers import WeightNoise
        >>> layer = WeightNoise(keras.layers.Dense(3), stddev=0.1, seed=0)
        >>> x = np.ones((2, 4), "float32")
        >>> bool(np.allclose(layer(x, training=True), layer(x, training=True)))
        False
        >>> bool(np.allclose(layer(x, training=False), layer(x, training=False)))
        True
    """

    def __init__(self, layer, stddev=0.05, mode="additive", learnable=False, seed=None, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                "Argument `layer` of WeightNoise must be a keras.layers.Layer instance, e.g. "
                f"WeightNoise(keras.layers.Dense(64)); received {layer!r}."
            )
        if isinstance(stddev, bool) or not isinstance(stddev, numbers.Real) or not stddev >= 0:
            raise ValueError(
                f"Argument `stddev` must be a number >= 0; received stddev={stddev!r}. Fix: "
                "e.g. stddev=0.05."
            )
        if mode not in MODES:
            raise ValueError(f"Argument `mode` must be one of {MODES}; received mode={mode!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Argument `seed` must be an int or None; received seed={seed!r}.")
        super().__init__(layer, **kwargs)
        self.stddev = float(stddev)
        self.mode = mode
        self.learnable = bool(learnable)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = getattr(layer, "supports_masking", False)
        self._inner_has_training = "training" in inspect.signature(layer.call).parameters
        self.noise_scales = []

    def build(self, input_shape=None):
        """Builds the wrapped layer and, when learnable, one noise scale per trainable weight.

        Args:
            input_shape: the input shape, passed to the wrapped layer's `build`.
        """
        super().build(input_shape)
        if self.learnable:
            self.noise_scales = [
                self.add_weight(
                    shape=(),
                    initializer=keras.initializers.Constant(self.stddev),
                    constraint=keras.constraints.NonNeg(),
                    trainable=True,
                    name=f"noise_scale_{i}",
                )
                for i, _ in enumerate(self.layer.trainable_variables)
            ]
        self.built = True

    def _scale(self, index):
        if self.learnable:
            return self.noise_scales[index]
        return self.stddev

    def noisy_values(self):
        """Draws one noisy copy of each trainable weight of the wrapped layer.

        Returns:
            A list of tensors, one per `self.layer.trainable_variables`.
        """
        values = []
        for i, variable in enumerate(self.layer.trainable_variables):
            eps = keras.random.normal(
                variable.shape, dtype=variable.dtype, seed=self.seed_generator
            )
            scale = ops.cast(self._scale(i), variable.dtype)
            if self.mode == "additive":
                values.append(ops.add(variable, scale * eps))
            else:
                values.append(ops.multiply(variable, 1.0 + scale * eps))
        return values

    def call(self, inputs, training=None, **kwargs):
        if self._inner_has_training:
            kwargs["training"] = training
        if not training or (self.stddev == 0.0 and not self.learnable):
            return self.layer(inputs, **kwargs)
        noisy = self.noisy_values()
        state = [v.value for v in self.layer.non_trainable_variables]
        outputs, new_state, losses = self.layer.stateless_call(
            noisy, state, inputs, return_losses=True, **kwargs
        )
        for variable, value in zip(self.layer.non_trainable_variables, new_state, strict=True):
            variable.assign(value)
        # `losses` ends with the wrapped layer's weight penalties at the noisy weights; those
        # at the clean weights are already in `model.losses`, so keep only the added losses.
        penalties = sum(1 for v in self.layer.trainable_weights if v.regularizer is not None)
        for loss in losses[: len(losses) - penalties]:
            self.add_loss(loss)
        regularizer = self.layer.activity_regularizer
        if regularizer is not None:
            # `stateless_call` bypasses `Layer.__call__`, which is where Keras applies the
            # activity regularizer (normalised by the batch size); do the same here.
            for output in keras.tree.flatten(outputs):
                loss = regularizer(output)
                if len(output.shape) > 0:
                    loss = ops.divide_no_nan(loss, ops.cast(ops.shape(output)[0], loss.dtype))
                self.add_loss(loss)
        return outputs

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return self.layer.compute_output_shape(input_shape, *args, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates a `WeightNoise` from `get_config()`'s output (the dict is not modified).

        Args:
            config: the dict returned by `get_config`.
            custom_objects: optional dict of custom classes for the wrapped layer.

        Returns:
            A new `WeightNoise`.
        """
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(
            config.pop("layer"), custom_objects=custom_objects
        )
        return cls(layer, **config)

    def get_config(self):
        """Returns the wrapped layer's config and the noise settings.

        Returns:
            A JSON-friendly dict.
        """
        config = super().get_config()
        config.update(
            {
                "stddev": self.stddev,
                "mode": self.mode,
                "learnable": self.learnable,
                "seed": self.seed,
            }
        )
        return config
