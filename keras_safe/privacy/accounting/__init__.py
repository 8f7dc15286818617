"""Privacy accounting: accountants, the DP-SGD schedule, the model's ledger, the statement.

- `accountants`: RDP and PLD (and any registered one) composing DP-SGD segments.
- `compute`: `compute_epsilon`, `noise_multiplier_for_epsilon`, `default_delta`.
- `schedule`: `DPSchedule`, the one place where microbatches, gradient accumulation and the
  sampling rate enter the accountant.
- `ledger`: `PrivacyLedger`, what a model has spent, saved with the model.
- `statement`: `privacy_statement`, the guarantee in plain language.
"""

from keras_safe.privacy.accounting.accountants import (
    RDP_ORDERS,
    accountant_names,
    epsilon_of,
    register_accountant,
)
from keras_safe.privacy.accounting.compute import (
    compute_epsilon,
    default_delta,
    noise_multiplier_for_epsilon,
)
from keras_safe.privacy.accounting.ledger import PrivacyLedger, get_ledger
from keras_safe.privacy.accounting.schedule import DPSchedule
from keras_safe.privacy.accounting.statement import privacy_statement

__all__ = [
    "RDP_ORDERS",
    "DPSchedule",
    "PrivacyLedger",
    "accountant_names",
    "compute_epsilon",
    "default_delta",
    "epsilon_of",
    "get_ledger",
    "noise_multiplier_for_epsilon",
    "privacy_statement",
    "register_accountant",
]
