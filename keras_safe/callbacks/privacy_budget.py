"""`PrivacyBudget`: report the (epsilon, delta) a model has spent during `fit`, and its budget."""

import keras

from keras_safe._validation import check_choice, check_number, fail
from keras_safe.accounting import accountant_names, default_delta
from keras_safe.accounting.checks import check_delta, check_target
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import get_ledger
from keras_safe.training import fit_plan, state
from keras_safe.training.private_model import is_guarded, make_private

__all__ = ["PrivacyBudget"]


@keras.saving.register_keras_serializable(package="keras_safe")
class PrivacyBudget(keras.callbacks.Callback):
    """Reports the privacy a model has spent every epoch, and stops training at its budget.

    Adding the callback to `fit` makes the model private (`keras_safe.privacy.make_private`)
    if it is not yet; call `make_private(model)` before `fit` on arrays, so that `fit` samples
    Poisson batches (a model made private inside a `fit` on arrays already running would train
    on Keras's fixed-size batches, which needs the opt-in below). The figures come from the
    model's privacy ledger (`keras_safe.privacy.get_ledger(model)`), which the train step
    charges at every noisy step and which is saved with the model: a second `fit`, a recompile
    with another DP optimizer, or a model saved and loaded again keeps counting, and steps taken
    with different noise, batch size or training set compose (heterogeneous accounting).

    Every epoch it writes `epsilon`, `delta` and `poisson_sampled` into `logs` (progress bar,
    `History`; list it before `CSVLogger` or `TensorBoard` so those see the figures too).
    `poisson_sampled` is 1 when every step the ledger holds was Poisson-sampled (epsilon with
    amplification by sampling at rate `batch_size / num_examples`), 0 when some were
    fixed-size batches (the opt-in: `sampling="shuffle"` on the DP optimizer or
    `fit(shuffle=False)`), accounted without amplification: one Gaussian mechanism per epoch
    begun (see `keras_safe.accounting.privacy_statement`).

    `target_epsilon` is the model's budget for its whole life, saved in its ledger with its
    delta and accountant: one model has one budget, so a DP optimizer with another
    `target_epsilon` is refused (change a budget on purpose with
    `get_ledger(model).set_budget(...)`). `fit` raises before the first step if the budget is
    spent, and stops (returning its `History`) before the step that would exceed it, whatever
    `steps_per_execution` is; `train_on_batch` and custom loops refuse such a step too.

    What it needs, and from where:

    - `num_examples` and the batch size: read from `fit` (arrays, or
      `keras_safe.privacy.poisson_batches`). For other inputs, give `num_examples` here or on
      the DP optimizer, and the optimizer's `batch_size`. A `num_examples` that disagrees with
      the data is refused.
    - `delta`: this argument, else the model's budget's, else the optimizer's `delta`, else
      `keras_safe.accounting.default_delta(num_examples)` = `1 / num_examples**1.1` (printed once).
      A delta of `1 / num_examples` or more is refused.
    - `accountant`: this argument, else the budget's (the one the user chose enforces it).
    - Microbatches and gradient accumulation are accounted by `keras_safe.accounting.DPSchedule`.

    Args:
        num_examples: number of training examples, when `fit` cannot count them.
        delta: the delta of (epsilon, delta)-DP, in (0, 1/num_examples).
        target_epsilon: the model's privacy budget; None (default) only reports epsilon.
        accountant: `"rdp"` (Renyi DP), `"pld"` (privacy loss distributions, tighter and
            slower) or another registered accountant; None (default): the budget's, else
            `"rdp"`.
        verbose: 1 prints the delta rule, the stop message and the final epsilon; 0 is silent.

    Attributes:
        epsilon: the epsilon the model has spent (0.0 before training).
        steps: the noisy steps the model has taken.

    Raises:
        keras_safe._validation.ArgumentError: on invalid arguments, a `num_examples` that
            disagrees with the data, or a budget other than the model's.
        keras_safe._validation.PrivacyError: at the start of `fit` when the model has no DP
            optimizer, its sampling rate cannot be known, or the budget is already spent.

    Example:
        >>> import keras, numpy as np, keras_safe
        >>> x = np.random.rand(256, 4).astype("float32")
        >>> y = np.random.randint(0, 2, 256)
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model.compile(
        ...     optimizer=keras_safe.optimizers.DPSGD(
        ...         learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1),
        ...     loss="sparse_categorical_crossentropy")
        >>> model = keras_safe.privacy.make_private(model)
        >>> budget = keras_safe.callbacks.PrivacyBudget(delta=1e-3, verbose=0)
        >>> history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[budget], verbose=0)
        >>> budget.steps
        16
        >>> round(history.history["epsilon"][-1], 2) == round(budget.epsilon, 2) > 0
        True
        >>> history.history["poisson_sampled"][-1]
        1.0
    """

    def __init__(
        self,
        num_examples=None,
        delta=None,
        target_epsilon=None,
        accountant=None,
        verbose=1,
    ):
        super().__init__()
        self.num_examples = check_number(
            "num_examples", num_examples, low=1, integer=True, allow_none=True
        )
        self.delta = None if delta is None else check_delta(delta, self.num_examples)
        self.target_epsilon = None if target_epsilon is None else check_target(target_epsilon)
        if accountant is not None:
            accountant = check_choice("accountant", accountant, accountant_names())
        self.accountant = accountant
        self.verbose = check_choice("verbose", verbose, (0, 1, True, False))
        self.verbose = int(self.verbose)
        self._guard = None
        self._delta_used = None
        self._announced = False

    # -- Keras hooks ---------------------------------------------------------------------------

    def set_model(self, model):
        """Keeps the model, makes it private, and sets (or checks) its budget.

        When the model becomes private only here, inside a `fit` already running, the callback
        reads that `fit`'s data settings itself and guards the run as a private `fit` would.
        """
        super().set_model(model)
        was_private = state.is_private(model)
        make_private(model)
        self._guard = None
        if not (was_private and is_guarded(model)):
            arguments = fit_plan.find_fit_arguments(model)
            if arguments is not None:
                self._guard = fit_plan.plan_fit(model, verbose=self.verbose, **arguments)
                self._guard.set_model(model)
        if self.num_examples is not None:
            fit_plan.set_num_examples(model, self.num_examples)
        if self.target_epsilon is not None:
            dp = find_dp_optimizer(getattr(model, "optimizer", None))
            theirs = getattr(dp, "target_epsilon", None)
            if theirs is not None and abs(theirs - self.target_epsilon) > 1e-12 * theirs:
                fail(
                    "target_epsilon",
                    self.target_epsilon,
                    f"the DP optimizer's target_epsilon ({theirs:g}) too: a model has one budget "
                    "for its whole life",
                    "give target_epsilon to one of them only (the DP optimizer's calibrates the "
                    "noise for it, PrivacyBudget's stops training at it), or the same value to "
                    "both; to change a model's budget on purpose, call "
                    "keras_safe.privacy.get_ledger(model).set_budget(...).",
                )
            get_ledger(model, create=True).require_budget(
                self.target_epsilon,
                self._resolve_delta(),
                self.accountant,
                source="PrivacyBudget(target_epsilon=...)",
            )

    def on_train_begin(self, logs=None):
        if self._guard is not None:
            self._guard.on_train_begin(logs)
        self._delta_used = self._resolve_delta()

    def on_epoch_begin(self, epoch, logs=None):
        if self._guard is not None:
            self._guard.on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if self._guard is not None:
            self._guard.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._guard is not None:
            self._guard.on_epoch_end(epoch, logs)
        if logs is not None:
            logs["epsilon"] = self.epsilon
            logs["delta"] = self._delta_used
            logs["poisson_sampled"] = 0.0 if self._fixed_steps() else 1.0

    def on_train_end(self, logs=None):
        if self._guard is not None:
            self._guard.on_train_end(logs)
        stop = state.budget_stop(self.model)
        if self.verbose and stop is not None and not stop[1]:
            print(stop[0])
        if self.verbose and self._delta_used is not None:
            print(
                f"PrivacyBudget: epsilon={self.epsilon:.4f} at delta={self._delta_used:.3g} "
                f"after {self.steps} noisy steps ({self._accountant().upper()} accountant, "
                f"{self._sampling_label()}; unit of privacy: {self._unit_label()})."
            )

    # -- figures ---------------------------------------------------------------------------

    @property
    def steps(self):
        """Accounted steps the model has taken (one per batch that drew noise)."""
        ledger = self._ledger()
        return 0 if ledger is None else ledger.steps

    @property
    def epsilon(self):
        """The epsilon the model has spent (0.0 before any noisy step)."""
        ledger = self._ledger()
        if ledger is None or ledger.steps == 0:
            return 0.0
        return ledger.epsilon(self._resolve_delta(), self._accountant())

    def _accountant(self):
        if self.accountant is not None:
            return self.accountant
        ledger = self._ledger()
        return ledger.accountant if ledger is not None else "rdp"

    def _fixed_steps(self):
        ledger = self._ledger()
        segments = ledger.segments() if ledger is not None else []
        return sum(s["steps"] for s in segments if s["shuffled"])

    def _sampling_label(self):
        fixed = self._fixed_steps()
        if not fixed:
            return "Poisson sampling"
        if fixed == self.steps:
            return "fixed-size batches, no amplification: one Gaussian mechanism per epoch"
        return (
            f"{fixed} of the steps in fixed-size batches, accounted without amplification; "
            "the others Poisson-sampled"
        )

    def get_config(self):
        return {
            "num_examples": self.num_examples,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    # -- internals ---------------------------------------------------------------------------

    def _ledger(self):
        model = getattr(self, "_model", None)  # keras-internal: callback-model
        return None if model is None else get_ledger(model)

    def _resolve_delta(self):
        ledger = self._ledger()
        n = self._num_examples()
        if self.delta is not None:
            return check_delta(self.delta, n)
        budget = ledger.budget() if ledger is not None else None
        if budget is not None:
            return budget[1]
        dp = find_dp_optimizer(getattr(self.model, "optimizer", None))
        if dp is not None and dp.delta is not None:
            return check_delta(dp.delta, n)
        if n is None:
            fallback = ledger.default_delta() if ledger is not None else None
            if fallback is not None:
                return fallback
            fit_plan.require_known_examples()
        delta = default_delta(n)
        if self.verbose and not self._announced:
            self._announced = True
            print(
                f"PrivacyBudget: delta not given; using delta = 1/n^1.1 = {delta:.3g} for "
                f"n = {n} "
                + ("users." if self._unit_label().startswith("one user") else "training examples.")
            )
        return delta

    def _unit_label(self):
        ledger = self._ledger()
        if ledger is not None and ledger.privacy_unit == "user":
            return "one user (all of their examples)"
        dp = find_dp_optimizer(getattr(self.model, "optimizer", None))
        if getattr(dp, "privacy_unit", None) == "user":
            return "one user (all of their examples)"
        return "one training example"

    def _num_examples(self):
        settings = state.data_settings(self.model)
        n = self.num_examples or (settings.num_examples if settings else None)
        if n is None:
            dp = find_dp_optimizer(getattr(self.model, "optimizer", None))
            n = getattr(dp, "num_examples", None)
        return n
