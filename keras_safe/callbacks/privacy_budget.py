"""`PrivacyBudget`: report the (epsilon, delta) a model has spent during `fit`, and set a budget."""

import keras

from keras_safe._validation import check_choice, check_number
from keras_safe.accounting import accountant_names, default_delta
from keras_safe.accounting.compute import check_delta, check_target
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import get_ledger
from keras_safe.training import fit_plan, make_private, state
from keras_safe.training.private_model import is_guarded

__all__ = ["PrivacyBudget"]


@keras.saving.register_keras_serializable(package="keras_safe")
class PrivacyBudget(keras.callbacks.Callback):
    """Reports the privacy a model has spent every epoch, and stops training at a budget.

    Adding the callback to `fit` is enough to train privately: it makes the model private
    (`keras_safe.privacy.make_private`) if it is not yet. The figures come from the model's
    privacy ledger (`keras_safe.privacy.get_ledger(model)`), which the train step charges at
    every noisy step and which is saved with the model: a second `fit`, a recompile with another
    DP optimizer, or a model saved and loaded again keeps counting, and steps taken with
    different noise, batch size or training set compose (heterogeneous accounting).

    Every epoch it writes `epsilon` and `delta` into `logs` (progress bar, `History`; list it
    before `CSVLogger` or `TensorBoard` so those see the figures too). Epsilon assumes Poisson
    sampling at rate `batch_size / num_examples` (see `keras_safe.privacy.privacy_statement` for
    what changes with shuffled batches).

    With `target_epsilon` it sets the model's budget (saved with the model): `fit` raises before
    the first step if the budget is spent, and stops before the step that would exceed it;
    `train_on_batch` refuses such a step too.

    What it needs, and from where:

    - `num_examples` and the batch size: read from `fit` (arrays, or
      `keras_safe.privacy.poisson_batches`). For other inputs, give `num_examples` here or on
      the DP optimizer, and the optimizer's `batch_size`. A `num_examples` that disagrees with
      the data is refused.
    - `delta`: this argument, else the optimizer's `delta`, else
      `keras_safe.privacy.default_delta(num_examples)` = `1 / num_examples**1.1` (printed once).
    - Microbatches and gradient accumulation are accounted by `keras_safe.privacy.DPSchedule`.

    Args:
        num_examples: number of training examples, when `fit` cannot count them.
        delta: the delta of (epsilon, delta)-DP, in (0, 1).
        target_epsilon: the privacy budget; None (default) only reports epsilon.
        accountant: `"rdp"` (Renyi DP), `"pld"` (privacy loss distributions, tighter and
            slower) or another registered accountant.
        verbose: 1 prints the delta rule, the stop message and the final epsilon; 0 is silent.

    Attributes:
        epsilon: the epsilon the model has spent (0.0 before training).
        steps: the accounted steps the model has taken (one per batch that drew noise).

    Raises:
        keras_safe._validation.ArgumentError: on invalid arguments, or a `num_examples` that
            disagrees with the data.
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
        >>> budget = keras_safe.callbacks.PrivacyBudget(delta=1e-3, verbose=0)
        >>> history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[budget], verbose=0)
        >>> budget.steps
        16
        >>> round(history.history["epsilon"][-1], 2) == round(budget.epsilon, 2) > 0
        True
    """

    def __init__(
        self,
        num_examples=None,
        delta=None,
        target_epsilon=None,
        accountant="rdp",
        verbose=1,
    ):
        super().__init__()
        self.num_examples = check_number(
            "num_examples", num_examples, low=1, integer=True, allow_none=True
        )
        self.delta = None if delta is None else check_delta(delta)
        self.target_epsilon = None if target_epsilon is None else check_target(target_epsilon)
        self.accountant = check_choice("accountant", accountant, accountant_names())
        self.verbose = check_choice("verbose", verbose, (0, 1, True, False))
        self.verbose = int(self.verbose)
        self._guard = None
        self._delta_used = None
        self._announced = False

    # -- Keras hooks ---------------------------------------------------------------------------

    def set_model(self, model):
        """Keeps the model, makes it private, and sets its budget.

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
            get_ledger(model, create=True).set_budget(self.target_epsilon, self._resolve_delta())

    def on_train_begin(self, logs=None):
        if self._guard is not None:
            self._guard.on_train_begin(logs)
        self._delta_used = self._resolve_delta()

    def on_train_batch_end(self, batch, logs=None):
        if self._guard is not None:
            self._guard.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self._guard is not None:
            self._guard.on_epoch_end(epoch, logs)
        if logs is not None:
            logs["epsilon"] = self.epsilon
            logs["delta"] = self._delta_used

    def on_train_end(self, logs=None):
        if self.verbose and self._delta_used is not None:
            print(
                f"PrivacyBudget: epsilon={self.epsilon:.4f} at delta={self._delta_used:.3g} "
                f"after {self.steps} noisy steps ({self.accountant.upper()} accountant, "
                "Poisson sampling)."
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
        return ledger.epsilon(self._resolve_delta(), self.accountant)

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
        model = getattr(self, "_model", None)
        return None if model is None else get_ledger(model)

    def _resolve_delta(self):
        if self.delta is not None:
            return self.delta
        dp = find_dp_optimizer(getattr(self.model, "optimizer", None))
        if dp is not None and dp.delta is not None:
            return dp.delta
        settings = state.data_settings(self.model)
        n = self.num_examples or (settings.num_examples if settings else None)
        if n is None and dp is not None:
            n = dp.num_examples
        if n is None:
            ledger = self._ledger()
            fallback = ledger.default_delta() if ledger is not None else None
            if fallback is not None:
                return fallback
            fit_plan.require_known_examples()
        delta = default_delta(n)
        if self.verbose and not self._announced:
            self._announced = True
            print(
                f"PrivacyBudget: delta not given; using delta = 1/n^1.1 = {delta:.3g} for "
                f"n = {n} training examples."
            )
        return delta
