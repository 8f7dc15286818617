"""keras_safe.optimizers: DP optimizers and gradient clipping wrappers."""

from keras_safe.optimizers.clipping import GradientClip
from keras_safe.optimizers.dp import DPSGD, DPAdam, DPOptimizer, find_dp_optimizer
from keras_safe.optimizers.wrapper import OptimizerWrapper, optimizer_chain

__all__ = [
    "DPAdam",
    "DPOptimizer",
    "DPSGD",
    "GradientClip",
    "OptimizerWrapper",
    "find_dp_optimizer",
    "optimizer_chain",
]
