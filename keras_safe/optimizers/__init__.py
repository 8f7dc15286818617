"""keras_safe.optimizers: DP optimizers and gradient clipping wrappers."""

from keras_safe.optimizers.clipping import GradientClip  # noqa: F401
from keras_safe.optimizers.dp import DPSGD, DPAdam, DPOptimizer  # noqa: F401
