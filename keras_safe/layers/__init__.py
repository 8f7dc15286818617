"""keras_safe.layers: weight noise for training, output defences for serving."""

from keras_safe.layers.output_defences import (
    LabelOnly,
    PredictionRounding,
    ReverseSigmoid,
    TopKOnly,
)
from keras_safe.layers.weight_noise import WeightNoise

__all__ = [
    "LabelOnly",
    "PredictionRounding",
    "ReverseSigmoid",
    "TopKOnly",
    "WeightNoise",
]
