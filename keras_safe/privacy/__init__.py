"""keras_safe.privacy: per-example clipping, accounting, Poisson sampling and model checks.

The bottom layer of keras_safe: it imports nothing from the packages above it. `make_private`
and `dp_gradients` live in `keras_safe.training` (`find_dp_optimizer` in
`keras_safe.optimizers`) and are re-exported here, where users look for them.
"""

import importlib

from keras_safe.accounting import (
    DPSchedule,
    compute_epsilon,
    default_delta,
    noise_multiplier_for_epsilon,
    privacy_statement,
    register_accountant,
)
from keras_safe.privacy.ledger import PrivacyLedger, get_ledger
from keras_safe.privacy.model_checks import UnsupportedLayer, validate
from keras_safe.privacy.per_example import TapRule, register_tap
from keras_safe.privacy.sampling import poisson_batches

__all__ = [
    "DPSchedule",
    "PrivacyLedger",
    "TapRule",
    "UnsupportedLayer",
    "compute_epsilon",
    "default_delta",
    "dp_gradients",
    "find_dp_optimizer",
    "get_ledger",
    "make_private",
    "noise_multiplier_for_epsilon",
    "poisson_batches",
    "privacy_statement",
    "register_accountant",
    "register_tap",
    "validate",
]

# Names defined in the layers above, re-exported here where users look for them. Resolved on
# first use (PEP 562), so that importing this bottom layer never imports the layers above it.
_REEXPORTS = {
    "dp_gradients": "keras_safe.training",
    "find_dp_optimizer": "keras_safe.optimizers.dp",
    "make_private": "keras_safe.training",
}


def __getattr__(name):
    if name in _REEXPORTS:
        return getattr(importlib.import_module(_REEXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_REEXPORTS))
