"""Privacy accounting: accountants, the DP-SGD schedule and the privacy statement.

The bottom layer of keras_safe, beside `_validation`: it needs `dp_accounting` only (no
TensorFlow, no Keras), so the command line computes epsilon without starting TensorFlow.

- `accountants`: RDP and PLD (and any registered one) composing DP-SGD segments.
- `checks`: the argument checks (a delta of `1/n` or more is refused) and `default_delta`, the
  one default-delta rule.
- `compute`: `compute_epsilon`, `noise_multiplier_for_epsilon`.
- `schedule`: `DPSchedule`, the one place for the steps of an epoch, the sampling rate (Poisson
  or shuffled batches), the noise standard deviation, the divisor and how microbatches and
  gradient accumulation enter the accountant.
- `statement`: `privacy_statement`, the guarantee in plain language.
- `group`: `group_epsilon`, `group_epsilon_of_segments`: the epsilon of a person with several
  examples under example-level training, by group privacy from the RDP curve.

What a model has spent is its privacy ledger (`keras_safe.privacy.ledger`), which composes its
segments with these accountants.
"""

from keras_safe.accounting.accountants import (
    RDP_ORDERS,
    accountant_names,
    epsilon_of,
    get_accountant,
    register_accountant,
    unregister_accountant,
)
from keras_safe.accounting.checks import default_delta
from keras_safe.accounting.compute import compute_epsilon, noise_multiplier_for_epsilon
from keras_safe.accounting.group import group_epsilon, group_epsilon_of_segments
from keras_safe.accounting.schedule import PRIVACY_UNITS, SAMPLINGS, DPSchedule
from keras_safe.accounting.statement import privacy_statement

__all__ = [
    "PRIVACY_UNITS",
    "RDP_ORDERS",
    "SAMPLINGS",
    "DPSchedule",
    "accountant_names",
    "compute_epsilon",
    "default_delta",
    "epsilon_of",
    "get_accountant",
    "group_epsilon",
    "group_epsilon_of_segments",
    "noise_multiplier_for_epsilon",
    "privacy_statement",
    "register_accountant",
    "unregister_accountant",
]
