"""Models that run keras_safe's train step: `make_private` and the model classes it installs.

`make_private(model)` (and `keras_safe.security.make_robust`) switch a Sequential or functional
model to `SafeSequential` / `SafeFunctional`: the same model, with keras_safe's train step, a
`fit` that checks the data settings first, a `train_on_batch` that respects the budget, and the
privacy flag and stages in its config. So a saved private model loads as a private model, with
its privacy ledger (`load_model(..., compile=False)` included), in any process that imported
keras_safe. A subclassed model keeps its class; its instance gets the same methods (its ledger is
saved in the `.keras` file, but restored only where the class is rebuilt by keras_safe).
"""

import inspect
import types

import keras

from keras_safe._validation import PrivacyError, fail
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import get_ledger
from keras_safe.training import fit_plan, state, verification
from keras_safe.training.stages import get_stages, set_stages
from keras_safe.training.train_step import train_step

__all__ = ["SafeFunctional", "SafeSequential", "install", "make_private"]

_FUNCTIONAL = next(c for c in keras.Model.__subclasses__() if c.__name__ == "Functional")
_CONFIG_KEY = "keras_safe"
_GUARDED = "_keras_safe_guarded_fit"
_FIT_SIGNATURE = inspect.signature(keras.Model.fit)


def _export_state(model):
    return {
        "private": state.is_private(model),
        "stages": [keras.saving.serialize_keras_object(s) for s in get_stages(model)],
    }


def _import_state(model, saved):
    get_ledger(model, create=True)
    if not saved:
        return
    state.set_private(model, saved.get("private", False))
    stages = [keras.saving.deserialize_keras_object(s) for s in saved.get("stages", [])]
    set_stages(model, stages)


def private_fit(model, fit, *args, **kwargs):
    """Runs `fit` (the class's own) after `fit_plan.plan_fit` when the model is private."""
    if not state.is_private(model):
        return fit(*args, **kwargs)
    bound = _FIT_SIGNATURE.bind(model, *args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("self")
    guard = fit_plan.plan_fit(
        model,
        x=params["x"],
        y=params["y"],
        sample_weight=params["sample_weight"],
        batch_size=params["batch_size"],
        epochs=params["epochs"],
        initial_epoch=params["initial_epoch"],
        steps_per_epoch=params["steps_per_epoch"],
        validation_split=params["validation_split"],
        verbose=0 if params["verbose"] == 0 else 1,
    )
    callbacks = params["callbacks"]
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        fail("callbacks", callbacks, "a list of callbacks for a private model's fit")
    params["callbacks"] = [guard, *(callbacks or [])]
    object.__setattr__(model, _GUARDED, True)
    try:
        return fit(**params)
    finally:
        object.__setattr__(model, _GUARDED, False)


def private_train_on_batch(model, train_on_batch, *args, **kwargs):
    """`train_on_batch` that refuses, on a private model, a step the budget does not allow."""
    if state.is_private(model):
        dp = find_dp_optimizer(getattr(model, "optimizer", None))
        if dp is None:
            fit_plan.plan_fit(model)  # raises the error naming the fix
        schedule = state.current_schedule(model, dp)
        if dp.needs_calibration:
            fail(
                "target_epsilon",
                dp.target_epsilon,
                "calibrated before train_on_batch",
                "declare num_examples, batch_size and epochs on the DP optimizer (it then "
                "calibrates the noise), or give noise_multiplier.",
            )
        bound = inspect.signature(keras.Model.train_on_batch).bind(model, *args, **kwargs)
        verification.ensure_verified(
            model,
            bound.arguments["x"],
            bound.arguments.get("y"),
            bound.arguments.get("sample_weight"),
        )
        ledger = get_ledger(model, create=True)
        if ledger.steps_within_budget(schedule.segment(1)[:2]) < 1:
            target, delta = ledger.budget()
            raise PrivacyError(
                f"The privacy budget target_epsilon={target:g} (delta={delta:.3g}) of "
                f"{model.name} is already spent (epsilon={ledger.epsilon(delta):.4f}); this "
                "step would exceed it. No step was taken. Fix: stop training, or raise the "
                "budget and state the larger epsilon."
            )
    return train_on_batch(*args, **kwargs)


def is_guarded(model):
    """True while a private `fit` of `model` runs with its `PrivacyGuard`."""
    return bool(getattr(model, _GUARDED, False))


class _SafeModel:
    """The methods keras_safe adds to a model (mixed into the model classes below)."""

    def fit(self, *args, **kwargs):
        return private_fit(self, super().fit, *args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        return private_train_on_batch(self, super().train_on_batch, *args, **kwargs)

    def train_step(self, data):
        return train_step(self, data)

    def get_config(self):
        config = super().get_config()
        config[_CONFIG_KEY] = _export_state(self)
        return config


@keras.saving.register_keras_serializable(package="keras_safe")
class SafeSequential(_SafeModel, keras.Sequential):
    """A `keras.Sequential` model running keras_safe's train step (see `make_private`)."""

    def __init__(self, layers=None, trainable=True, name=None):
        super().__init__(layers=layers, trainable=trainable, name=name)
        get_ledger(self, create=True)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        saved = config.pop(_CONFIG_KEY, None)
        model = super().from_config(config, custom_objects=custom_objects)
        _import_state(model, saved)
        return model


@keras.saving.register_keras_serializable(package="keras_safe")
class SafeFunctional(_SafeModel, _FUNCTIONAL):
    """A functional `keras.Model` running keras_safe's train step (see `make_private`)."""

    def __init__(self, inputs, outputs, name=None, **kwargs):
        saved = kwargs.pop(_CONFIG_KEY, None)
        super().__init__(inputs, outputs, name=name, **kwargs)
        _import_state(self, saved)


def install(model):
    """Gives `model` keras_safe's train step, checked `fit` and ledger; returns `model`.

    Sequential and functional models switch to `SafeSequential` / `SafeFunctional` (so the
    settings are saved with the model); a subclassed model keeps its class and its instance gets
    the methods. A model whose class defines its own `train_step` keeps that step (it computes
    its gradients with `keras_safe.privacy.dp_gradients`).
    """
    if not isinstance(model, keras.Model):
        fail("model", type(model).__name__, "a keras.Model")
    if isinstance(model, (SafeSequential, SafeFunctional)) or getattr(model, "_keras_safe", False):
        return model
    cls = type(model)
    if cls is keras.Sequential:
        model.__class__ = SafeSequential
    elif cls is _FUNCTIONAL:
        model.__class__ = SafeFunctional
    else:
        fit, train_on_batch = model.fit, model.train_on_batch
        patches = {
            "fit": lambda self, *a, **k: private_fit(self, fit, *a, **k),
            "train_on_batch": lambda self, *a, **k: private_train_on_batch(
                self, train_on_batch, *a, **k
            ),
        }
        if cls.train_step is keras.Model.train_step:
            patches["train_step"] = train_step
        for name, function in patches.items():
            object.__setattr__(model, name, types.MethodType(function, model))
        object.__setattr__(model, "_keras_safe", True)
    get_ledger(model, create=True)
    model.train_function = None
    return model


def make_private(model):
    """Makes `model` train with DP-SGD: keras_safe's train step, checked `fit`, a privacy ledger.

    Call it once, on a Sequential, functional or subclassed model, and compile the model with a
    DP optimizer (`keras_safe.optimizers.DPSGD`, `DPAdam`, `DPOptimizer(...)`), before or after.
    It is idempotent and returns the same model object. From then on:

    - `fit` reads the number of examples and the batch size from the data (arrays or
      `keras_safe.privacy.poisson_batches`), refuses declared settings that disagree with them,
      calibrates `target_epsilon` for the steps that will really run, and stops at the budget;
    - every step clips per example, adds the DP optimizer's noise and charges the model's
      privacy ledger (`keras_safe.privacy.get_ledger(model)`), which is saved with the model;
    - training with an optimizer that is not a DP optimizer raises instead of training without
      privacy;
    - a Sequential or functional model saved to `.keras` loads as a private model, ledger
      included, in any process that imported keras_safe.

    A model whose class defines its own `train_step` keeps it; inside it, compute gradients
    with `keras_safe.privacy.dp_gradients(self, x, y, sample_weight)` and apply them with
    `self.optimizer.apply(grads, self.trainable_variables)` (the DP optimizer applies nothing
    else).

    Args:
        model: a `keras.Model`.

    Returns:
        `model`, private.

    Raises:
        keras_safe._validation.ArgumentError: if `model` is not a Keras model.

    Example:

    >>> import keras, numpy as np, keras_safe
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_safe.optimizers.DPSGD(
    ...     learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0), loss="mse")
    >>> model = keras_safe.privacy.make_private(model)
    >>> keras_safe.privacy.make_private(model) is model
    True
    >>> _ = model.fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=4, verbose=0)
    >>> keras_safe.privacy.get_ledger(model).steps
    2
    """
    install(model)
    if not state.is_private(model):
        state.set_private(model, True)
        model.train_function = None
    return model
