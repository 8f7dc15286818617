"""keras_safe.privacy: per-example clipping, the DP train step, accounting and sampling."""

from keras_safe.privacy.accounting import (  # noqa: F401
    compute_epsilon,
    default_delta,
    noise_multiplier_for_epsilon,
    privacy_statement,
)
from keras_safe.privacy.model_checks import UnsupportedLayer, validate  # noqa: F401
from keras_safe.privacy.sampling import poisson_batches  # noqa: F401
from keras_safe.privacy.train_step import (  # noqa: F401
    dp_gradients,
    find_dp_optimizer,
    make_private,
)
