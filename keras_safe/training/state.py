"""What keras_safe keeps on a model (`SafeState`, one attribute), and the one place where a step
finds its schedule, the model's budget and its ledger segment.

Everything keras_safe remembers about a model lives in one `SafeState`, the model's attribute
`_keras_safe_state`, set past Keras's attribute tracking (`object.__setattr__`: it is neither a
layer nor a weight, and Keras's saving, which walks the model's attributes for `KerasSaveable`
objects, passes it by). What must be saved with the model is saved elsewhere: the privacy flag
and the stages in the model's config (`private_model`), the ledger (`keras_safe.privacy.ledger`,
an attribute of its own that saving does find). Nothing else of keras_safe is set on a model.
"""

import dataclasses
import warnings

import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.accounting.checks import check_delta, default_delta
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import get_ledger

__all__ = [
    "DataSettings",
    "SafeState",
    "current_schedule",
    "data_settings",
    "fallback_mode",
    "is_private",
    "budget_spent",
    "budget_stop",
    "ledger_slot",
    "require_dp_optimizer",
    "require_optimizer_budget",
    "safe_state",
    "retrace_if_needed",
    "set_data_settings",
    "step_mode",
    "step_settings",
    "set_fallback_mode",
    "set_private",
]

STATE_ATTRIBUTE = "_keras_safe_state"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The training data as `fit` sees it: examples, batch size, batches per epoch (None:
    unknown), and what is known of its batches: Poisson samples (`poisson`), or fixed-size
    batches (`fixed`: arrays in Keras's own batches), each epoch of which is one pass over the
    data (`one_pass`). `padded`: every batch has the same number of rows (Poisson samples
    padded to one size, so the number of rows says nothing of the data); `seeded`: the batches
    were drawn from a seed given by the user; `examples_per_user`: user-level batches (slots of
    that many rows, one user's examples each; `num_examples` and `batch_size` then count
    users), else None. `max_user_examples`: for example-level training on data whose user ids
    were given, the most examples one user has (for the user-level epsilon by group privacy).
    """

    num_examples: int = None
    batch_size: int = None
    steps_per_epoch: int = None
    poisson: bool = False
    fixed: bool = False
    one_pass: bool = False
    padded: bool = False
    seeded: bool = False
    examples_per_user: int = None
    max_user_examples: int = None


@dataclasses.dataclass(eq=False)
class SafeState:
    """Everything keras_safe keeps on one model (or on a callable an attack ran on).

    Attributes:
        private: `make_private` was called (saved in the model's config).
        stages: the `TrainingStage`s of its train step, in order (saved in its config).
        data: the `DataSettings` of its current or last private `fit`.
        fallback: how variables without a per-example rule get their per-example gradients
            (`"vectorized"`, `"loop"`, or None before verification).
        verified: what the model was verified with (`training.preflight`), or None.
        guarded: a private `fit` with its `PrivacyGuard` is running.
        fit_step: the running fit's own steps are being run (or traced) now: its train function,
            not a callback's or the user's call in between.
        traced_for: the `step_mode` the model's compiled train function was traced in (a
            `fit` on its data, or batches given by the caller), to rebuild it on a change.
        budget_stop: `(message, printed)` of a `fit` that stopped at the budget, or None.
        eager_step: `(key, function)`: the compiled private step eager calls run.
        attack_graphs: the compiled graphs of the evasion attacks run on it, by settings.
    """

    private: bool = False
    stages: tuple = ()
    data: DataSettings = None
    fallback: str = None
    verified: tuple = None
    guarded: bool = False
    fit_step: bool = False
    traced_for: tuple = None
    budget_stop: tuple = None
    eager_step: tuple = None
    attack_graphs: dict = dataclasses.field(default_factory=dict)


_NONE = SafeState()  # what a model without state reads as (never written)


def safe_state(model, create=True):
    """The model's `SafeState`; created empty on first use, or, with `create=False`, an empty
    state that is not stored (for reading only).

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> safe_state(model, create=False).private
        False
        >>> safe_state(model) is safe_state(model)
        True
    """
    found = getattr(model, STATE_ATTRIBUTE, None)
    if found is None:
        if not create:
            return _NONE
        found = SafeState()
        # Past Keras's attribute tracking: plain Python state, not a layer or a weight.
        # keras-internal: untracked-attribute
        object.__setattr__(model, STATE_ATTRIBUTE, found)
    return found


def is_private(model):
    """True once `make_private(model)` was called (also on a model loaded from such a file)."""
    return safe_state(model, create=False).private


def set_private(model, private=True):
    safe_state(model).private = bool(private)


def data_settings(model):
    """The `DataSettings` of the model's current or last `fit` (None before any)."""
    return safe_state(model, create=False).data


def set_data_settings(model, settings):
    """Records the data settings; the train function is rebuilt when they change."""
    found = safe_state(model)
    if found.data != settings:
        found.data = settings
        # keras-internal: train-function
        model.train_function = None


def step_settings(model):
    """The data settings a step of the model trains under now: those of the running private
    `fit`; None for batches given by the caller (`train_on_batch`, `dp_gradients`, a custom
    loop), which keras_safe cannot see drawn."""
    found = safe_state(model, create=False)
    return found.data if found.fit_step else None


def step_mode(model, dp):
    """What a traced step depends on beyond the model: the step's data settings, the DP
    settings (noise, clipping norm, microbatches, declared sampling), and the ledger it
    charges; a change of any rebuilds the step, so the step and the ledger agree."""
    settings = tuple(
        getattr(dp, name, None)
        for name in (
            "noise_multiplier",
            "l2_norm_clip",
            "num_microbatches",
            "sampling",
            "privacy_unit",
            "examples_per_user",
        )
    )
    return (step_settings(model), settings, id(get_ledger(model)))


def retrace_if_needed(model, dp):
    """Drops the model's compiled train function when it was traced in another `step_mode`
    (a `fit` before a `train_on_batch`, or the reverse): its schedule is a constant of it."""
    found = safe_state(model)
    if found.traced_for is not None and found.traced_for != step_mode(model, dp):
        found.traced_for = None
        # keras-internal: train-function
        if getattr(model, "train_function", None) is not None:
            model.make_train_function(force=True)


def fallback_mode(model):
    """How variables without a rule get per-example gradients ("vectorized", "loop" or None)."""
    return safe_state(model, create=False).fallback


def set_fallback_mode(model, mode):
    found = safe_state(model)
    if found.fallback != mode:
        found.fallback = mode
        # keras-internal: train-function
        model.train_function = None


def require_dp_optimizer(model):
    """The DP optimizer of a private model's optimizer chain.

    Raises:
        keras_safe._validation.PrivacyError: when the model has none (it would train without
            clipping and noise), naming the fix.
    """
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    if dp is None:
        raise PrivacyError(
            f"{model.name} was made private, but it is compiled with "
            f"{type(getattr(model, 'optimizer', None)).__name__}, which is not a keras_safe DP "
            "optimizer: it would train without clipping and noise. Fix: compile with "
            "keras_safe.optimizers.DPSGD(...), DPAdam(...) or DPOptimizer(your_optimizer, ...)."
        )
    return dp


def budget_spent(model, ledger, step=None):
    """The `PrivacyError` for a step the budget of `ledger` no longer allows (`step`: what one
    more step is, for the message)."""
    target, delta = ledger.budget()
    step = f" ({step})" if step else ""
    return PrivacyError(
        f"The privacy budget target_epsilon={target:g} (delta={delta:.3g}, "
        f"{ledger.accountant.upper()} accountant) of {model.name} is already spent: it stands "
        f"at epsilon={ledger.epsilon():.4f} after {ledger.steps} steps, and one more "
        f"step{step} would exceed it. No step was taken. Fix: stop training here, or raise the "
        "budget with keras_safe.privacy.get_ledger(model).set_budget(...) and state the larger "
        "epsilon."
    )


@tf.autograph.experimental.do_not_convert
def current_schedule(model, dp):
    """The `DPSchedule` of `dp` on the model's data, which must give a known sampling rate.

    Raises:
        keras_safe._validation.PrivacyError: when neither `fit` nor the optimizer tells the
            number of examples and the batch size.
    """
    settings = step_settings(model)
    if settings is None:
        # Batches given by the caller: amplification by sampling only where the optimizer
        # declares them Poisson samples; else each step is a Gaussian mechanism of its own.
        # The size of the data and the batch default to those of the model's last fit.
        last = data_settings(model) or DataSettings()
        settings = DataSettings(
            last.num_examples, last.batch_size, examples_per_user=last.examples_per_user
        )
        sampling = getattr(dp, "sampling", None) or "shuffle"
    else:
        # Known Poisson samples, Keras's fixed batches of arrays, or a pipeline keras_safe
        # cannot see drawn: Poisson only where the optimizer declares it.
        sampling = (
            "poisson"
            if settings.poisson
            else "shuffle"
            if settings.fixed
            else getattr(dp, "sampling", None) or "shuffle"
        )
    schedule = dp.schedule(
        settings.num_examples,
        settings.batch_size,
        settings.steps_per_epoch,
        sampling=sampling,
        one_pass_epochs=settings.one_pass,
        examples_per_user=settings.examples_per_user,
    )
    if not schedule.known:
        raise PrivacyError(
            "keras_safe cannot tell the sampling rate of this step (it needs the number of "
            "training examples and the expected batch size), so it cannot account for it. "
            "Fix: train with `fit` on arrays or on keras_safe.privacy.poisson_batches (keras_safe "
            "reads both there), or declare num_examples=... and batch_size=... on the DP "
            "optimizer."
        )
    return schedule


@tf.autograph.experimental.do_not_convert
def require_optimizer_budget(model, dp, num_examples):
    """Makes the DP optimizer's `target_epsilon` the model's budget (or checks that it is).

    Every `target_epsilon` is the model's lifetime budget, held by its ledger: the first one
    given sets it, a different one later is refused (`PrivacyLedger.require_budget`).

    Raises:
        keras_safe._validation.ArgumentError: a delta of `1/num_examples` or more, or a budget
            other than the model's.
    """
    ledger = get_ledger(model, create=True)
    if getattr(dp, "delta", None) is not None and num_examples is not None:
        check_delta(dp.delta, num_examples)
    if dp.target_epsilon is None:
        return ledger
    delta = dp.delta
    if delta is None and ledger.budget() is None and num_examples is not None:
        delta = default_delta(num_examples)
    ledger.require_budget(
        dp.target_epsilon,
        delta,
        getattr(dp, "accountant", None),
        source="the DP optimizer's target_epsilon",
    )
    return ledger


@tf.autograph.experimental.do_not_convert
def ledger_slot(model, dp, schedule):
    """`(ledger, slot)`: the model's ledger, with the optimizer's budget, and the segment of
    `schedule`, given the budget's gate (see `PrivacyLedger.activate`).

    Warns when the noise is zero: such a model is not private (epsilon is infinite).
    """
    ledger = require_optimizer_budget(model, dp, schedule.num_examples)
    if schedule.noise_multiplier == 0:
        warnings.warn(
            f"{model.name} trains with noise_multiplier=0: its steps add no noise, so it is not "
            "differentially private (epsilon is infinite). Fix: give a noise_multiplier above 0 "
            "or a target_epsilon.",
            stacklevel=3,
        )
    slot = ledger.slot(
        schedule.accounted_noise,
        schedule.accounted_rate,
        schedule.num_examples,
        dp.seeded or getattr(step_settings(model), "seeded", False),
        shuffled=not schedule.poisson,
        privacy_unit=schedule.privacy_unit,
    )
    return ledger, slot


def budget_stop(model, message=None, printed=False):
    """Records (with `message`) or returns and clears the message of a `fit` stopped at the
    budget: `(message, printed)`, or None."""
    found = safe_state(model)
    if message is not None:
        found.budget_stop = (message, printed)
        return None
    stop, found.budget_stop = found.budget_stop, None
    return stop
