"""Models that run keras_safe's train step: `make_private` and the model classes it installs.

`make_private(model)` (and `keras_safe.security.make_robust`) switch a model to a private class:
the same model, with keras_safe's train step, a `fit` that checks the data settings first and
samples Poisson batches from arrays, a `train_on_batch` that respects the budget, and the privacy
flag and stages in its config. Sequential and functional models become `SafeSequential` /
`SafeFunctional`; a subclassed model (or a subclass of Sequential or Model) becomes an instance
of a keras_safe subclass of its own class, saved as `keras_safe>PrivateModel`, whose loader
rebuilds the user's model from its own config and makes it private before Keras loads the
weights. So every private model saved to `.keras` loads as a private model, with its privacy
ledger (`load_model(..., compile=False)` included), in any process that imported keras_safe.

Keras internals this relies on (public behaviour, but not documented as API):

- `keras.saving.register_keras_serializable` records a class's name and the name's class in two
  tables, and registering a name again replaces its class (keras/src/saving/
  object_registration.py): every private subclass is registered under
  `keras_safe>PrivateModel`, then the loader again, so saving writes that name for any of them
  and loading finds the loader.
- `deserialize_keras_object` builds the object with `cls.from_config(config)` of the registered
  class, then calls `build_from_config` and `compile_from_config` on what it returned
  (keras/src/saving/serialization_lib.py), and `saving_lib` loads the weights by walking the
  attributes of that object (`_walk_saveable`, keras/src/saving/saving_lib.py): the ledger, an
  attribute of the model, is found there.
- `Model.fit` calls `model.train_function(iterator)` once per execution, after
  `make_train_function()` and `callbacks.on_train_begin()`, and returns `model.history`
  (keras/src/backend/tensorflow/trainer.py); see `fit_plan.PrivacyGuard`.
- A `tf.data.Dataset` given to `fit` is iterated afresh each epoch when `steps_per_epoch` is
  None (keras/src/trainers/epoch_iterator.py): the Poisson batches of `fit` on arrays.
"""

import inspect

import keras
import tensorflow as tf

from keras_safe._validation import PrivacyError, fail
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import get_ledger
from keras_safe.training import fit_plan, preflight, state
from keras_safe.training.stages import get_stages, set_stages
from keras_safe.training.train_step import train_step

__all__ = [
    "PrivateModel",
    "SafeFunctional",
    "SafeSequential",
    "install_train_step",
    "make_private",
]

# keras-internal: functional-class
_FUNCTIONAL = next(c for c in keras.Model.__subclasses__() if c.__name__ == "Functional")
_CONFIG_KEY = "keras_safe"
_MODEL_KEY = "model"
_FIT_SIGNATURE = inspect.signature(keras.Model.fit)
_PRIVATE_CLASSES = {}


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
    """Runs `fit` (the class's own) after `fit_plan.plan_fit` when the model is private.

    Arrays become Poisson batches (`fit_plan.poisson_fit_arguments`) unless the fixed-batch
    opt-in is given; a `tf.data.Dataset` is passed with `shuffle=False` (Keras would only warn
    that it ignores `shuffle`).
    """
    users = kwargs.pop("users", None)
    if not state.is_private(model):
        if users is not None:
            fail("users", "given", "given to a private model's fit", "call make_private first.")
        return fit(*args, **kwargs)
    bound = _FIT_SIGNATURE.bind(model, *args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("self")
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    x = params["x"]
    users = fit_plan.check_users(model, dp, params, users)  # None for example-level training
    if (
        dp is not None
        and fit_plan.is_array_data(x)
        and not fit_plan.wants_fixed_batches(dp, params["shuffle"])
    ):
        arrays = (x, params["y"], params["sample_weight"])
        params = fit_plan.poisson_fit_arguments(model, dp, params, users)
        # Verified on the arrays' first examples (a weighted sample may hold few of them).
        preflight.ensure_verified(model, *arrays)
    elif isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        params["shuffle"] = False
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
        shuffle=params["shuffle"],
    )
    callbacks = params["callbacks"]
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        fail("callbacks", callbacks, "a list of callbacks for a private model's fit")
    params["callbacks"] = [guard, *(callbacks or [])]
    state.safe_state(model).guarded = True
    try:
        return fit(**params)
    except tf.errors.OpError as error:
        refusal = fit_plan.refusal_of(error)
        if refusal is None:
            raise
        raise refusal from None
    finally:
        guard.restore()
        found = state.safe_state(model)
        found.guarded = found.fit_step = False


def private_train_on_batch(model, train_on_batch, *args, **kwargs):
    """`train_on_batch` that refuses, on a private model, a step the budget does not allow."""
    if not state.is_private(model):
        return train_on_batch(*args, **kwargs)
    found = state.safe_state(model)
    if found.guarded:
        # Inside a running fit (from a callback): the caller's batch gets a step of its own,
        # traced for batches the caller gives; the fit's step is put back after it.
        # keras-internal: train-function
        fit_function, fit_traced = model.train_function, found.traced_for
        model.train_function = None  # keras-internal: train-function
        try:
            return _private_train_on_batch(model, train_on_batch, *args, **kwargs)
        finally:
            model.train_function = fit_function  # keras-internal: train-function
            found.traced_for = fit_traced
    return _private_train_on_batch(model, train_on_batch, *args, **kwargs)


def _private_train_on_batch(model, train_on_batch, *args, **kwargs):
    dp = state.require_dp_optimizer(model)
    state.retrace_if_needed(model, dp)  # a step traced in a fit accounts for the fit's data
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
    preflight.ensure_verified(
        model,
        bound.arguments["x"],
        bound.arguments.get("y"),
        bound.arguments.get("sample_weight"),
    )
    ledger, slot = state.ledger_slot(model, dp, schedule)
    ledger.close_epoch(slot)  # one batch given by the caller: a mechanism of its own
    if ledger.steps_left(slot) < 1:
        raise state.budget_spent(model, ledger)
    refused = ledger.refused_steps
    try:
        result = train_on_batch(*args, **kwargs)
    except tf.errors.OpError as error:
        refusal = fit_plan.refusal_of(error)
        if refusal is None:
            raise
        raise refusal from None
    if ledger.refused_steps > refused:
        raise PrivacyError(
            "The privacy budget in the model's ledger refused this step (its release was "
            "withheld inside the compiled step). Fix: stop training, or raise the budget with "
            "keras_safe.privacy.get_ledger(model).set_budget(...) and state the larger epsilon."
        )
    return result


def is_guarded(model):
    """True while a private `fit` of `model` runs with its `PrivacyGuard`."""
    return state.safe_state(model, create=False).guarded


class _SafeMethods:
    """The methods keras_safe adds to every private model class."""

    def fit(self, *args, **kwargs):
        return private_fit(self, super().fit, *args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        return private_train_on_batch(self, super().train_on_batch, *args, **kwargs)


class _SafeModel(_SafeMethods):
    """The methods of `SafeSequential` and `SafeFunctional`."""

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


class _PrivateSubclass(_SafeMethods):
    """The methods of the private subclass of a user's model class (see `_private_class`).

    It serializes as `keras_safe>PrivateModel`: the keras_safe state and the user's model as
    Keras would serialize it (its class and its own `get_config`).
    """

    _user_class = None  # the user's class

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return PrivateModel.from_config(config, custom_objects=custom_objects)

    def get_config(self):
        base = type(self)._user_class
        inner = base.get_config(self)
        return {
            _CONFIG_KEY: _export_state(self),
            _MODEL_KEY: {
                "module": base.__module__,
                "class_name": base.__name__,
                "config": keras.saving.serialize_keras_object(inner),
                "registered_name": keras.saving.get_registered_name(base),
            },
        }


@keras.saving.register_keras_serializable(package="keras_safe", name="PrivateModel")
class PrivateModel:
    """The loader of a private subclassed model saved to `.keras` (`keras_safe>PrivateModel`).

    Its `from_config` rebuilds the user's model from the saved config (the user's class must be
    registered or given in `custom_objects`, as for any subclassed model), makes it private and
    creates its ledger; Keras then builds it, compiles it and loads its weights and ledger.
    """

    def get_config(self):  # a registered class needs one; instances are never made
        return {}

    # keras-internal: load-order
    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config[_MODEL_KEY], custom_objects=custom_objects
        )
        install_train_step(model)
        _import_state(model, config.get(_CONFIG_KEY))
        return model


def _private_class(base):
    """The keras_safe subclass of the user's model class `base` (one per class, cached)."""
    cls = _PRIVATE_CLASSES.get(base)
    if cls is not None:
        return cls
    attributes = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_user_class": base,
    }
    if base.train_step is keras.Model.train_step:
        # A class with its own train_step keeps it (it calls dp_gradients).
        attributes["train_step"] = _SafeModel.train_step
    cls = type(base.__name__, (_PrivateSubclass, base), attributes)
    # Saved under the loader's name; registering the loader again keeps the name's class the
    # loader (registration overwrites; see the module docstring).
    # keras-internal: registration-replaces
    keras.saving.register_keras_serializable(package="keras_safe", name="PrivateModel")(cls)
    keras.saving.register_keras_serializable(package="keras_safe", name="PrivateModel")(
        PrivateModel
    )
    _PRIVATE_CLASSES[base] = cls
    return cls


def install_train_step(model):
    """Gives `model` keras_safe's train step, checked `fit` and ledger; returns `model`.

    Sequential and functional models switch to `SafeSequential` / `SafeFunctional`; any other
    model class (subclassed models, subclasses of Sequential or Model) to a keras_safe subclass
    of its own class, so the settings and the ledger are saved with the model and restored by
    `keras.saving.load_model`. A model whose class defines its own `train_step` keeps that step
    (it computes its gradients with `keras_safe.privacy.dp_gradients`).
    """
    if not isinstance(model, keras.Model):
        fail("model", type(model).__name__, "a keras.Model")
    if isinstance(model, _SafeMethods):
        get_ledger(model, create=True)
        return model
    cls = type(model)
    if cls is keras.Sequential:
        # keras-internal: class-swap
        model.__class__ = SafeSequential
    elif cls is _FUNCTIONAL:
        # keras-internal: class-swap
        model.__class__ = SafeFunctional
    else:
        # keras-internal: class-swap
        model.__class__ = _private_class(cls)
    get_ledger(model, create=True)
    # keras-internal: train-function
    model.train_function = None
    return model


def _check_ledger_restored(model):
    """Refuses a model whose DP optimizer applied more updates than its ledger counts: the
    ledger saved with it was not restored (for example weights loaded into a model built from
    code, or a file written before keras_safe restored the ledger of every model class)."""
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    if dp is None or not dp.built:
        return
    ledger = get_ledger(model, create=True)
    updates = int(keras.ops.convert_to_numpy(dp.iterations))
    if updates > ledger.steps + ledger.refused_steps:
        raise PrivacyError(
            f"{model.name}'s DP optimizer has applied {updates} noisy updates, but its privacy "
            f"ledger holds {ledger.steps} steps: the ledger saved with the model was not "
            "restored, and a fresh one would understate epsilon. Nothing was changed. Fix: load "
            "the model with keras.saving.load_model(path) in a process that imported "
            "keras_safe (it restores the ledger of every private model), or call "
            "make_private(model) before loading its weights with model.load_weights(path)."
        )


def make_private(model):
    """Makes `model` train with DP-SGD: keras_safe's train step, checked `fit`, a privacy ledger.

    Call it once, on a Sequential, functional or subclassed model, and compile the model with a
    DP optimizer (`keras_safe.optimizers.DPSGD`, `DPAdam`, `DPOptimizer(...)`), before or after.
    It is idempotent and returns the same model object. From then on:

    - `fit` on arrays samples Poisson batches (the batches the reported epsilon assumes; the
      fixed-size batches Keras would cut are an explicit opt-in: `sampling="shuffle"` on the DP
      optimizer, or `shuffle=False` given to `fit`, accounted without amplification); `fit`
      reads the number of examples and the batch size from the data (arrays or
      `keras_safe.privacy.poisson_batches`), refuses declared settings that disagree with them,
      calibrates `target_epsilon` for the steps that will really run, and stops at the budget;
    - every step clips per example, adds the DP optimizer's noise and charges the model's
      privacy ledger (`keras_safe.privacy.get_ledger(model)`), which holds the budget and is
      saved with the model;
    - training with an optimizer that is not a DP optimizer raises instead of training without
      privacy;
    - the model saved to `.keras` loads as a private model, ledger included, in any process that
      imported keras_safe, whatever its class.

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
        keras_safe._validation.PrivacyError: if the model's DP optimizer applied updates its
            ledger does not hold (a ledger that was not restored).

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
    if not isinstance(model, keras.Model):
        fail("model", type(model).__name__, "a keras.Model")
    if not state.is_private(model):
        _check_ledger_restored(model)
    install_train_step(model)
    if not state.is_private(model):
        state.set_private(model, True)
        # keras-internal: train-function
        model.train_function = None
    return model
