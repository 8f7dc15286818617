"""keras_safe.privacy: DP-SGD for a Keras model, its privacy ledger, Poisson sampling, model checks
and per-example gradient rules.

- `make_private(model)`: keras_safe's train step, a checked `fit`, a privacy ledger;
  `dp_gradients(model, x, y)`: the DP-SGD gradients of one batch, for custom loops.
- `get_ledger(model)` -> `PrivacyLedger`: what the model spent and may spend, saved with it.
- `poisson_batches(x, y, batch_size=...)`: the Poisson-sampled batches epsilon assumes.
- `validate(model, fix=False)`: the layers DP-SGD cannot train (`UnsupportedLayer`), and a fix.
- Per-example gradient rules for your own layers: `PerExampleRule` (the contract),
  `register_rule`, `unregister_rule`, `get_rule`, `rule_names` (the forms a rule returns are in
  `keras_safe.privacy.per_example`).

Epsilon from settings, the schedule, the default delta, accountants and the privacy statement are
in `keras_safe.accounting` (it needs no TensorFlow).

This package is also keras_safe's bottom layer: its modules import nothing from the packages above
it. `make_private` and `dp_gradients` are defined in `keras_safe.training` (they need the train
step) and exported here, where users look for them: the two names are resolved on first use
(PEP 562), the only names of keras_safe reached upwards (`ENTRY_POINTS`; keras_safe's own
modules import them from `keras_safe.training`, which `tests/test_architecture.py` checks).
"""

import importlib

from keras_safe.accounting import compute_epsilon, privacy_statement  # noqa: F401 (see below)
from keras_safe.privacy.ledger import PrivacyLedger, get_ledger
from keras_safe.privacy.model_checks import UnsupportedLayer, validate
from keras_safe.privacy.per_example.registry import (
    get_rule,
    register_rule,
    rule_names,
    unregister_rule,
)
from keras_safe.privacy.per_example.rules.base import PerExampleRule
from keras_safe.privacy.sampling import poisson_batches

__all__ = [
    "PerExampleRule",
    "PrivacyLedger",
    "UnsupportedLayer",
    "dp_gradients",
    "get_ledger",
    "get_rule",
    "make_private",
    "poisson_batches",
    "register_rule",
    "rule_names",
    "unregister_rule",
    "validate",
]

ENTRY_POINTS = {
    "dp_gradients": "keras_safe.training.train_step",
    "make_private": "keras_safe.training.private_model",
}
"""The entry points defined above this layer and exported here: name -> defining module."""

# `compute_epsilon` and `privacy_statement` (exported by keras_safe.accounting) stay reachable
# here, outside `__all__`, for code written against keras_safe 0.2.0, which exported them here.


def __getattr__(name):
    if name in ENTRY_POINTS:
        return getattr(importlib.import_module(ENTRY_POINTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(ENTRY_POINTS))
