"""Gradient clipping beyond Keras's `clipnorm`: `GradientClip` and its clip rules.

`GradientClip` (in `wrapper.py`) wraps any optimizer; each `mode` is one clip rule class, in a
module of its own:

- `global_norm.py`: `GlobalNormClip` (fixed threshold) and `AutoGlobalNormClip`
  (`clip_norm="auto"`), after Pascanu, Mikolov and Bengio (2013), "On the difficulty of
  training recurrent neural networks";
- `per_layer.py`: `PerLayerClip`, the same rule for each variable or layer;
- `adaptive.py`: `AdaptiveClip`, the quantile-tracking threshold of Andrew, Thakkar, McMahan
  and Ramaswamy (2021), "Differentially Private Learning with Adaptive Clipping";
- `agc.py`: `AGCClip` and `unitwise_norm`, the adaptive gradient clipping of Brock, De, Smith
  and Simonyan (2021), "High-Performance Large-Scale Image Recognition Without Normalization".

A new rule subclasses `ClipRule` (`base.py`) and is listed in `wrapper.RULES`.
"""

from keras_safe.optimizers.clipping.adaptive import AdaptiveClip
from keras_safe.optimizers.clipping.agc import AGCClip, unitwise_norm
from keras_safe.optimizers.clipping.base import ClipRule
from keras_safe.optimizers.clipping.global_norm import AutoGlobalNormClip, GlobalNormClip
from keras_safe.optimizers.clipping.per_layer import PerLayerClip
from keras_safe.optimizers.clipping.wrapper import MODES, GradientClip

__all__ = [
    "MODES",
    "AGCClip",
    "AdaptiveClip",
    "AutoGlobalNormClip",
    "ClipRule",
    "GlobalNormClip",
    "GradientClip",
    "PerLayerClip",
    "unitwise_norm",
]
