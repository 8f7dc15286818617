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

Importing keras_safe imports neither Keras nor TensorFlow: the subpackages are loaded on first use
(`keras_safe.privacy`, `from keras_safe import privacy`, `import keras_safe.privacy` alike), so
the command line and the accounting start in a fraction of a second. The first subpackage that
needs Keras checks that Keras runs on the TensorFlow backend and loads all the others, which
registers keras_safe's serializable classes with Keras (`keras_safe._backend`); so does
`import keras_safe` after Keras was imported. To load a saved model in a new process, import
`keras` first, then `keras_safe` (or use any keras_safe subpackage before loading).

Example:
    >>> import keras_safe
    >>> keras_safe.accounting.default_delta(60000) < 1 / 60000
    True
"""

import importlib
import sys

from keras_safe import _backend
from keras_safe._version import __version__

_SUBPACKAGES = _backend.SUBPACKAGES

__all__ = [*_SUBPACKAGES, "__version__"]


def __getattr__(name):
    if name in _SUBPACKAGES:
        # import_module stores the subpackage in this module's namespace: loaded once.
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES))


# Every import of a Keras-using part of keras_safe checks the backend first, and the first one
# loads them all (registering their serializable classes with Keras). Where Keras is already
# loaded, that costs little and happens now: `import keras; import keras_safe` and then
# `keras.saving.load_model(...)` finds keras_safe's classes.
_backend.install_guard()
if sys.modules.get("keras") is not None:
    _backend.load_all()
