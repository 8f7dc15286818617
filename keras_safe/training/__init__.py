"""keras_safe.training: the one train step that owns the gradient path of `fit`.

DP-SGD (per-example clipping, then the DP optimizer's noise), adversarial training and gradient
clipping are stages of this step, so they compose in one `fit`.
"""

from keras_safe.training.train_step import dp_gradients, make_private

__all__ = ["dp_gradients", "make_private"]
