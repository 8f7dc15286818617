"""keras_safe.training: the one train step that owns the gradient path of `fit`.

DP-SGD (per-example clipping, then the DP optimizer's noise), adversarial training and gradient
clipping are stages of this step, so they compose in one `fit`.
"""

from keras_safe.training.private_model import SafeFunctional, SafeSequential, install, make_private
from keras_safe.training.stages import TrainingStage, get_stages, set_stages
from keras_safe.training.state import is_private
from keras_safe.training.train_step import dp_gradients
from keras_safe.training.verification import verify_model

__all__ = [
    "SafeFunctional",
    "SafeSequential",
    "TrainingStage",
    "dp_gradients",
    "get_stages",
    "install",
    "is_private",
    "make_private",
    "set_stages",
    "verify_model",
]
