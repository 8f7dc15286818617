"""keras_safe: model security and training-data privacy for Keras 3.

Subpackages:
    accounting: accountants, the DP-SGD schedule, epsilon, the privacy statement (no TensorFlow).
    privacy: per-example gradients, accounting and the privacy ledger, Poisson sampling, model
        checks (`make_private` and `dp_gradients` re-exported from `training`).
    optimizers: DP optimizers (`DPSGD`, `DPAdam`, `DPOptimizer`) and gradient clipping wrappers.
    layers: layers that are not preprocessing (weight noise, output defences).
    preprocessing: cleaning and normalising layers, leak-free splitting.
    callbacks: privacy budget, audits and gradient monitoring during `fit`.
    security: adversarial attacks and adversarial training.
    training: the one train step (make_private, dp_gradients).
    audit: membership inference audits, metrics and reports.
    testing: `assert_dp_matches_reference`, the one-example-at-a-time check of DP clipping.
"""

import keras as _keras

if _keras.backend.backend() != "tensorflow":
    raise ImportError(
        "keras_safe supports the TensorFlow backend of Keras 3 only, but Keras is running on "
        f"the '{_keras.backend.backend()}' backend. Fix: set the environment variable "
        "KERAS_BACKEND=tensorflow (or remove it) before importing keras, or set "
        '"backend": "tensorflow" in ~/.keras/keras.json.'
    )

from keras_safe import (  # noqa: E402
    accounting,
    audit,
    callbacks,
    layers,
    optimizers,
    preprocessing,
    privacy,
    security,
    testing,
    training,
)

__version__ = "0.2.0"

__all__ = [
    "accounting",
    "audit",
    "callbacks",
    "layers",
    "optimizers",
    "preprocessing",
    "privacy",
    "security",
    "testing",
    "training",
    "__version__",
]
