"""Models an audit trains itself (shadow models, canary runs) and the delta of an audited model."""

import keras

from keras_safe._validation import fail
from keras_safe.privacy import find_dp_optimizer

__all__ = ["check_model_factory", "compiled_model", "default_delta"]


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


def default_delta(model):
    """The delta of the model's DP optimizer, else 1e-5.

    Example:
        >>> import keras
        >>> default_delta(keras.Sequential())
        1e-05
    """
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    delta = getattr(dp, "delta", None) if dp is not None else None
    return float(delta) if delta else 1e-5
