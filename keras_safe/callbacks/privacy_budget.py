"""`PrivacyBudget`: track the (epsilon, delta) spent by DP-SGD during `fit` and enforce a budget."""

from __future__ import annotations

import math

import keras

from keras_safe.privacy import accounting

# Beyond this many noisy updates the budget is treated as never running out.
_MAX_SEARCH_STEPS = 2**40


def _as_int(value):
    return int(keras.ops.convert_to_numpy(value))


@keras.saving.register_keras_serializable(package="keras_safe")
class PrivacyBudget(keras.callbacks.Callback):
    """Reports the privacy spent by DP-SGD every epoch and stops training at a budget.

    Adding the callback to `fit` is enough to train privately: it installs keras_safe's DP
    train step (`keras_safe.privacy.make_private`) on the model. It reads the DP settings from
    the model's DP optimizer (`keras_safe.optimizers.DPSGD`, `DPAdam` or `DPOptimizer`, also
    inside other optimizer wrappers) and counts the noisy updates actually taken from the
    optimizer's `iterations` (Keras counts one iteration per update, also with gradient
    accumulation). Those are saved with the model, so a second `fit`, or a model
    saved mid-training and loaded again, keeps counting: the epsilon never silently restarts
    from zero. With `gradient_accumulation_steps=k` on the optimizer, one noisy update spans
    `k` batches, each Poisson sampled on its own and adding `1/sqrt(k)` of the noise: an
    example can appear in several of them, so each update is accounted as `k` steps at
    sampling rate `batch_size / num_examples` with noise multiplier `/ sqrt(k)`.

    Every epoch it writes `epsilon` and `delta` into `logs`, so they appear in the progress
    bar and `History`; list `PrivacyBudget` before `CSVLogger` or `TensorBoard` in `callbacks`
    so those see the figures too. Epsilon is computed for Poisson sampling with sampling rate
    `batch_size / num_examples` (see `keras_safe.privacy.privacy_statement` for what changes
    with shuffled batches).

    With `target_epsilon`, it computes once per `fit` the largest number of noisy updates
    whose epsilon stays within the target (a bisection on the number of steps), then after
    each batch stops training (`model.stop_training = True`, with a message) when the next
    batch would go past it. A `fit` started with the budget already spent raises instead of
    taking a step.

    What it infers, and from where:

    - `num_examples`: this argument, else the optimizer's `num_examples`; it is required (a
      count inferred from `fit` would be wrong for `poisson_batches`, whose one `fit` epoch
      spans several passes over the data).
    - `batch_size`: the optimizer's `batch_size` (the expected batch size). Keras does not
      tell callbacks the batch size, so it must be set on the optimizer (use the value given
      to `fit`).
    - `delta`: this argument, else the optimizer's `delta`, else
      `keras_safe.privacy.default_delta(num_examples)` = `1 / num_examples**1.1`, printed once.
    - Microbatching: with the optimizer's `num_microbatches` smaller than `batch_size`, each
      clipped gradient is a mean over several examples and removing one example can move it
      by twice the clipping norm, so the accountant uses half the noise multiplier (as TF
      Privacy's statement does; "How to DP-fy ML", Ponomareva et al. 2023, Sec. 5.6).

    Args:
        num_examples: number of training examples; see above for the default.
        delta: the delta of (epsilon, delta)-DP, in (0, 1); see above for the default.
        target_epsilon: the privacy budget; training stops before exceeding it. None (default)
            only reports epsilon.
        accountant: `"rdp"` (Renyi DP) or `"pld"` (privacy loss distributions, tighter and
            slower).
        verbose: 1 prints the delta rule, inferred settings, the stop message and the final
            epsilon; 0 is silent.

    Attributes:
        epsilon: the epsilon spent so far by the model's optimizer (0.0 before training).
        steps: the noisy updates taken so far.

    Raises:
        ValueError: on invalid arguments, or (at the start of `fit`) when the model has no
            DP optimizer or the batch size / number of examples cannot be determined.
        RuntimeError: at the start of `fit` when `target_epsilon` is already spent.

    Example:
        >>> import keras, numpy as np, keras_safe
        >>> x = np.random.rand(256, 4).astype("float32")
        >>> y = np.random.randint(0, 2, 256)
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model.compile(
        ...     optimizer=keras_safe.optimizers.DPSGD(
        ...         learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1, batch_size=32),
        ...     loss="sparse_categorical_crossentropy")
        >>> budget = keras_safe.callbacks.PrivacyBudget(num_examples=256, delta=1e-3,
        ...                                             verbose=0)
        >>> history = model.fit(x, y, batch_size=32, epochs=2, callbacks=[budget], verbose=0)
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
        if num_examples is not None:
            num_examples = accounting._positive_int(
                "num_examples", num_examples, "pass the number of training examples, or None."
            )
        if delta is not None:
            delta = accounting._check_delta(delta)
        if target_epsilon is not None:
            target_epsilon = accounting._check_target(target_epsilon)
        self.num_examples = num_examples
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.accountant = accounting._check_accountant(accountant)
        if verbose not in (0, 1, True, False):
            raise ValueError(f"`verbose` must be 0 or 1, got {verbose!r}.")
        self.verbose = int(verbose)
        self._settings = None
        self._epsilon_cache = {}
        self._max_steps_cache = {}
        self._announced = set()
        self._max_steps = None
        self._stop_announced = False

    # -- Keras hooks ---------------------------------------------------------------------------

    def set_model(self, model):
        """Keeps the model and installs keras_safe's DP train step on it.

        A model with its own `train_step` keeps it (it computes its gradients with
        `keras_safe.privacy.dp_gradients`; a DP optimizer refuses any other gradients).
        """
        from keras_safe.privacy import make_private

        super().set_model(model)
        if type(model).train_step is keras.Model.train_step:
            make_private(model)

    def on_train_begin(self, logs=None):
        self._settings = self._resolve_settings()
        self._stop_announced = False
        self._max_steps = None
        if self.target_epsilon is None:
            return
        self._max_steps = self._compute_max_steps()
        steps = self.steps
        after = self._updates_after_next_execution()
        if after > self._max_steps:
            raise RuntimeError(
                f"PrivacyBudget: the budget target_epsilon={self.target_epsilon:g} is already "
                f"spent: {steps} noisy steps give epsilon={self._epsilon_for(steps):.4f} and "
                f"continuing to {after} steps would give {self._epsilon_for(after):.4f} "
                f"(delta={self._settings['delta']:.3g}). No step was taken. "
                "Fix: stop training here, or raise target_epsilon and state the larger "
                "epsilon."
            )

    def on_train_batch_end(self, batch, logs=None):
        if self._max_steps is None or self._stop_announced:
            return
        after = self._updates_after_next_execution()
        if after > self._max_steps:
            self.model.stop_training = True
            self._stop_announced = True
            steps = self.steps
            if self.verbose:
                more = after - steps
                what = "one more step" if more == 1 else f"the next {more} steps (one execution)"
                print(
                    f"\nPrivacyBudget: stopping training after {steps} noisy steps at "
                    f"epsilon={self._epsilon_for(steps):.4f} (delta="
                    f"{self._settings['delta']:.3g}): {what} would reach epsilon="
                    f"{self._epsilon_for(after):.4f}, above target_epsilon="
                    f"{self.target_epsilon:g}."
                )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["epsilon"] = self.epsilon
        logs["delta"] = self._settings["delta"] if self._settings else self._current_delta()

    def on_train_end(self, logs=None):
        if self.verbose and self._settings is not None:
            print(
                f"PrivacyBudget: epsilon={self.epsilon:.4f} at delta="
                f"{self._settings['delta']:.3g} after {self.steps} noisy steps "
                f"({self.accountant.upper()} accountant, Poisson sampling rate "
                f"{self._settings['sampling_rate']:.4g}, noise multiplier "
                f"{self._settings['noise_multiplier']:g})."
            )

    # -- public figures --------------------------------------------------------------------

    @property
    def steps(self):
        """The number of noisy updates the model's DP optimizer has applied."""
        optimizer = self._dp_optimizer(required=False)
        if optimizer is None:
            return 0
        return self._updates(optimizer)

    @property
    def epsilon(self):
        """The epsilon spent so far (0.0 before any noisy update)."""
        steps = self.steps
        if steps == 0:
            return 0.0
        if self._settings is None:
            self._settings = self._resolve_settings()
        return self._epsilon_for(steps)

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

    def _dp_optimizer(self, required=True):
        from keras_safe.privacy import find_dp_optimizer

        model = getattr(self, "_model", None)
        optimizer = getattr(model, "optimizer", None) if model is not None else None
        found = find_dp_optimizer(optimizer) if optimizer is not None else None
        if found is None and required:
            raise ValueError(
                "PrivacyBudget needs a model compiled with a keras_safe DP optimizer, got "
                f"{type(optimizer).__name__ if optimizer is not None else 'no optimizer'}. Fix: "
                "compile with keras_safe.optimizers.DPSGD(...), DPAdam(...) or "
                "DPOptimizer(your_optimizer, ...)."
            )
        return found

    @staticmethod
    def _accumulation(optimizer):
        steps = getattr(optimizer, "accumulation_steps", None)
        if steps is None:
            inner = optimizer
            while hasattr(inner, "inner_optimizer"):
                inner = inner.inner_optimizer
            steps = getattr(inner, "gradient_accumulation_steps", None)
        return int(steps or 1)

    def _updates(self, optimizer):
        iterations = optimizer.iterations
        count = _as_int(iterations)
        accumulation = self._accumulation(optimizer)
        if accumulation > 1 and isinstance(iterations, keras.Variable):
            # Keras versions whose `iterations` counts batches rather than updates.
            count //= accumulation
        return count

    def _say_once(self, key, message):
        if self.verbose and key not in self._announced:
            self._announced.add(key)
            print(message)

    def _current_delta(self):
        return self._resolve_settings()["delta"]

    def _resolve_settings(self):
        optimizer = self._dp_optimizer()
        batch_size = getattr(optimizer, "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "PrivacyBudget needs the expected batch size to compute epsilon, and Keras does "
                "not pass it to callbacks. Fix: give the DP optimizer batch_size=... (the "
                "batch_size you pass to fit), e.g. DPSGD(..., batch_size=64)."
            )
        accumulation = self._accumulation(optimizer)
        num_examples = self.num_examples or getattr(optimizer, "num_examples", None)
        if num_examples is None:
            num_examples = self._infer_num_examples(batch_size)
        noise = getattr(optimizer, "noise_multiplier", None)
        if noise is None:
            raise ValueError(
                "PrivacyBudget: the DP optimizer has no noise_multiplier. Fix: give it "
                "noise_multiplier=... or target_epsilon=..."
            )
        microbatches = getattr(optimizer, "num_microbatches", None)
        effective_noise = float(noise)
        if microbatches is not None and microbatches < batch_size:
            effective_noise = effective_noise / 2.0
            self._say_once(
                ("microbatching", microbatches, batch_size),
                f"PrivacyBudget: {microbatches} microbatches per batch of {batch_size}: each "
                "clipped gradient averages several examples, so one example can move it by "
                f"twice the clipping norm; accounting with noise multiplier {noise:g} / 2 = "
                f"{effective_noise:g}.",
            )
        delta = self.delta or getattr(optimizer, "delta", None)
        if delta is None:
            delta = accounting.default_delta(num_examples)
            self._say_once(
                ("delta", num_examples),
                f"PrivacyBudget: delta not given; using delta = 1/n^1.1 = {delta:.3g} for "
                f"n = {num_examples} training examples.",
            )
        delta = accounting._check_delta(delta)
        # With k accumulated batches, each batch is Poisson sampled on its own and adds 1/sqrt(k)
        # of the noise, so one example can appear in several batches of an update. Releasing
        # every batch's noisy sum would reveal at least as much, so each update is accounted
        # as k steps at rate batch_size / n with noise multiplier / sqrt(k) (post-processing).
        if accumulation > 1:
            effective_noise = effective_noise / math.sqrt(accumulation)
        sampling_rate = min(1.0, batch_size / num_examples)
        return {
            "noise_multiplier": float(noise),
            "effective_noise": effective_noise,
            "sampling_rate": sampling_rate,
            "num_examples": int(num_examples),
            "delta": float(delta),
            "accumulation": accumulation,
        }

    def _infer_num_examples(self, batch_size):
        raise ValueError(
            "PrivacyBudget needs the number of training examples, and cannot infer it safely "
            "from fit (with keras_safe.privacy.poisson_batches one fit epoch spans several "
            "passes over the data). Fix: pass num_examples=... to PrivacyBudget or to the DP "
            "optimizer."
        )

    def _key(self):
        s = self._settings
        return (
            s["effective_noise"],
            s["sampling_rate"],
            s["accumulation"],
            s["delta"],
            self.accountant,
        )

    def _epsilon_for(self, steps):
        if self._settings is None:
            self._settings = self._resolve_settings()
        key = (*self._key(), int(steps))
        if key not in self._epsilon_cache:
            s = self._settings
            self._epsilon_cache[key] = accounting._epsilon(
                s["effective_noise"],
                s["sampling_rate"],
                int(steps) * s["accumulation"],
                s["delta"],
                self.accountant,
            )
        return self._epsilon_cache[key]

    def _compute_max_steps(self):
        """Largest number of noisy updates whose epsilon is at most `target_epsilon`."""
        key = (*self._key(), self.target_epsilon)
        if key in self._max_steps_cache:
            return self._max_steps_cache[key]
        target = self.target_epsilon
        if self._epsilon_for(1) > target:
            result = 0
        else:
            low, high = 1, 2
            while self._epsilon_for(high) <= target:
                if high >= _MAX_SEARCH_STEPS:
                    result = math.inf
                    break
                low, high = high, high * 2
            else:
                while high - low > 1:  # invariant: eps(low) <= target < eps(high)
                    middle = (low + high) // 2
                    if self._epsilon_for(middle) <= target:
                        low = middle
                    else:
                        high = middle
                result = low
        self._max_steps_cache[key] = result
        return result

    def _updates_after_next_execution(self):
        """Upper bound on the noisy updates taken once the next `fit` execution has run.

        One execution runs `steps_per_execution` batches; with gradient accumulation over
        `k` batches it completes at most `ceil(steps_per_execution / k)` updates.
        """
        optimizer = self._dp_optimizer()
        per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        accumulation = self._settings["accumulation"]
        return self._updates(optimizer) + -(-per_execution // accumulation)
