"""What keras_safe keeps on a model: whether it is private, the data settings read from `fit`, and
how variables without a per-example rule get their per-example gradients."""

import dataclasses

from keras_safe._validation import PrivacyError

__all__ = [
    "DataSettings",
    "current_schedule",
    "data_settings",
    "fallback_mode",
    "is_private",
    "set_data_settings",
    "set_fallback_mode",
    "set_private",
]

_PRIVATE = "_keras_safe_private"
_DATA = "_keras_safe_data"
_FALLBACK = "_keras_safe_fallback"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training data as `fit` sees it: examples, batch size, batches per epoch (None:
    unknown), and whether the batches are Poisson samples."""

    num_examples: int = None
    batch_size: int = None
    steps_per_epoch: int = None
    poisson: bool = False


def _set(model, name, value):
    # Past Keras's attribute tracking: these are plain Python settings, not layers or weights.
    object.__setattr__(model, name, value)


def is_private(model):
    """True once `make_private(model)` was called (also on a model loaded from such a file)."""
    return bool(getattr(model, _PRIVATE, False))


def set_private(model, private=True):
    _set(model, _PRIVATE, bool(private))


def data_settings(model):
    """The `DataSettings` of the model's current or last `fit` (None before any)."""
    return getattr(model, _DATA, None)


def set_data_settings(model, settings):
    """Records the data settings; the train function is rebuilt when they change."""
    if data_settings(model) != settings:
        _set(model, _DATA, settings)
        model.train_function = None


def fallback_mode(model):
    """How variables without a rule get per-example gradients ("vectorized", "loop" or None)."""
    return getattr(model, _FALLBACK, None)


def set_fallback_mode(model, mode):
    if fallback_mode(model) != mode:
        _set(model, _FALLBACK, mode)
        model.train_function = None


def current_schedule(model, dp):
    """The `DPSchedule` of `dp` on the model's data, which must give a known sampling rate.

    Raises:
        keras_safe._validation.PrivacyError: when neither `fit` nor the optimizer tells the
            number of examples and the batch size.
    """
    settings = data_settings(model) or DataSettings()
    schedule = dp.schedule(settings.num_examples, settings.batch_size, settings.steps_per_epoch)
    if not schedule.known:
        raise PrivacyError(
            "keras_safe cannot tell the sampling rate of this step (it needs the number of "
            "training examples and the expected batch size), so it cannot account for it. "
            "Fix: train with `fit` on arrays or on keras_safe.privacy.poisson_batches (keras_safe "
            "reads both there), or declare num_examples=... and batch_size=... on the DP "
            "optimizer."
        )
    return schedule
