"""keras_safe.layers."""

from keras_safe.layers.weight_noise import WeightNoise  # noqa: F401
