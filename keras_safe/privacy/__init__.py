"""keras_safe.privacy: per-example clipping, accounting, Poisson sampling and model checks.

The bottom layer of keras_safe: it imports nothing from the packages above it. `make_private`
and `dp_gradients` live in `keras_safe.training` and are re-exported here, where users look for
them.
"""

from keras_safe.privacy.accounting import (
    compute_epsilon,
    default_delta,
    noise_multiplier_for_epsilon,
    privacy_statement,
)
from keras_safe.privacy.model_checks import UnsupportedLayer, validate
from keras_safe.privacy.sampling import poisson_batches

# isort: split
# Re-exports from the layers above (a package __init__ may re-export); imported last so that the
# modules of this package are complete before those layers import them.
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.training.train_step import dp_gradients, make_private

__all__ = [
    "UnsupportedLayer",
    "compute_epsilon",
    "default_delta",
    "dp_gradients",
    "find_dp_optimizer",
    "make_private",
    "noise_multiplier_for_epsilon",
    "poisson_batches",
    "privacy_statement",
    "validate",
]
