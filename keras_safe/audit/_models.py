"""Models an audit trains itself (shadow models, canary runs) and the delta an audit reports at."""

import keras

from keras_safe._validation import fail
from keras_safe.privacy.ledger import get_ledger

__all__ = ["audit_delta", "check_model_factory", "compiled_model"]


def check_model_factory(model_factory, purpose):
    """Checks that `model_factory` is a callable that makes models (not a model itself).

    Raises:
        ArgumentError: if it is not callable, or is a model.
    """
    if not callable(model_factory) or isinstance(model_factory, keras.Model):
        fail(
            "model_factory",
            model_factory,
            f"a zero-argument function returning a new compiled model, for {purpose}",
            "pass model_factory=make_model (the function, not a model), trained the same way "
            "as the audited model.",
        )


def compiled_model(model_factory):
    """A new model from `model_factory`, which must come compiled.

    Raises:
        ArgumentError: if the model is not compiled.
    """
    model = model_factory()
    if getattr(model, "optimizer", None) is None:
        fail(
            "model_factory",
            model_factory,
            "a function returning a compiled model, but its model is not compiled",
            "call model.compile(optimizer=..., loss=...) inside the factory.",
        )
    return model


def audit_delta(model):
    """The delta an audit of `model` reports at: its privacy guarantee's (the ledger's budget
    delta, else `keras_safe.accounting.default_delta` of its training set), else 1e-5 for a
    model that never trained privately.

    Example:
        >>> import keras
        >>> audit_delta(keras.Sequential())
        1e-05
    """
    ledger = get_ledger(model)
    delta = ledger.delta() if ledger is not None and ledger.steps else None
    return float(delta) if delta else 1e-5
