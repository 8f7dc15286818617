"""Before a private `fit`: read the data settings, check them against what was declared,
calibrate the noise for the steps that will run, and guard the run (budget, batch sizes,
non-finite examples)."""

import dataclasses
import math
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError, fail
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import get_ledger
from keras_safe.privacy.sampling import poisson_info
from keras_safe.training import distribution, state, verification

__all__ = [
    "PrivacyGuard",
    "describe_data",
    "find_fit_arguments",
    "plan_fit",
    "require_known_examples",
    "set_num_examples",
]

# Keras's default batch size for arrays.
_KERAS_BATCH_SIZE = 32


def _is_array_data(x):
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(
        isinstance(t, (np.ndarray, tf.Tensor)) or hasattr(t, "__array__") for t in leaves
    )


def describe_data(x, batch_size=None, validation_split=0.0, steps_per_epoch=None):
    """The `DataSettings` `fit` will train with, as far as they can be known from `x`.

    Arrays: `num_examples` is the number of rows after `validation_split`, `batch_size` the one
    given to `fit` (Keras's default 32). `poisson_batches`: what the dataset was built with.
    Anything else: unknown (None), unless the optimizer declares them.
    """
    info = poisson_info(x)
    if info is not None:
        return state.DataSettings(
            info.num_examples, info.batch_size, steps_per_epoch or info.steps, poisson=True
        )
    if isinstance(x, tf.data.Dataset):
        cardinality = int(x.cardinality())
        known = steps_per_epoch or (cardinality if cardinality > 0 else None)
        return state.DataSettings(steps_per_epoch=known)
    if x is not None and _is_array_data(x):
        rows = int(np.shape(keras.tree.flatten(x)[0])[0])
        if validation_split:
            rows = int(math.floor(rows * (1.0 - validation_split)))
        batch = int(batch_size or _KERAS_BATCH_SIZE)
        batch = min(batch, rows)
        return state.DataSettings(rows, batch, steps_per_epoch or math.ceil(rows / batch))
    return state.DataSettings(steps_per_epoch=steps_per_epoch)


def plan_fit(
    model,
    x=None,
    y=None,
    sample_weight=None,
    batch_size=None,
    epochs=1,
    initial_epoch=0,
    steps_per_epoch=None,
    validation_split=0.0,
    verbose=1,
):
    """Reads and checks the data settings of a private `fit`; returns its `PrivacyGuard`.

    The guard finishes the checks when training begins (after every callback's `set_model`,
    so `PrivacyBudget(num_examples=...)` can still fill in what the data does not tell):
    unknown sampling rate, microbatches that do not divide the batches, calibration of
    `target_epsilon` for the epochs that will run, a spent budget.

    Raises:
        keras_safe._validation.PrivacyError: no DP optimizer; under a `tf.distribute`
            strategy, data the distributed accounting cannot cover
            (`keras_safe.training.distribution.check_fit_data`).
        keras_safe._validation.ArgumentError: declared settings that differ from the data.
    """
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    if dp is None:
        raise PrivacyError(
            f"{model.name} was made private, but it is compiled with "
            f"{type(getattr(model, 'optimizer', None)).__name__}, which is not a keras_safe DP "
            "optimizer: fit would train without clipping and noise. Fix: compile with "
            "keras_safe.optimizers.DPSGD(...), DPAdam(...) or DPOptimizer(your_optimizer, ...)."
        )
    settings = describe_data(x, batch_size, validation_split, steps_per_epoch)
    schedule = dp.schedule(settings.num_examples, settings.batch_size, settings.steps_per_epoch)
    settings = state.DataSettings(
        schedule.num_examples, schedule.batch_size, settings.steps_per_epoch, settings.poisson
    )
    distribution.check_fit_data(model, x, settings)
    state.set_data_settings(model, settings)
    verification.ensure_verified(model, x, y, sample_weight)
    return PrivacyGuard(epochs=max(epochs - initial_epoch, 0), verbose=verbose)


def require_known_examples():
    """Raises the error for a run whose number of training examples nobody can tell."""
    raise PrivacyError(
        "keras_safe cannot tell how many training examples there are, so it cannot compute "
        "epsilon. Fix: train with fit on arrays or on keras_safe.privacy.poisson_batches, or "
        "pass num_examples=... to PrivacyBudget or to the DP optimizer."
    )


def set_num_examples(model, num_examples):
    """Fills in (or checks) the number of examples of the model's data settings.

    Raises:
        keras_safe._validation.ArgumentError: when the data has another number of examples.
    """
    settings = state.data_settings(model) or state.DataSettings()
    if settings.num_examples is not None and settings.num_examples != num_examples:
        fail(
            "num_examples",
            num_examples,
            f"the number of examples fit trains on ({settings.num_examples})",
            "leave num_examples out (keras_safe counts the examples) or pass the right count.",
        )
    state.set_data_settings(model, dataclasses.replace(settings, num_examples=num_examples))


def _check_microbatches(groups, settings):
    if not groups:
        return
    if settings.poisson:
        raise PrivacyError(
            "num_microbatches with poisson_batches is not covered by the accounting: the "
            "microbatch analysis assumes an example's microbatch does not depend on the other "
            "examples, which Poisson batches do not give. Fix: leave num_microbatches out "
            "(per-example clipping) with poisson_batches."
        )
    n, b = settings.num_examples, settings.batch_size
    sizes = {b} if n is None or n % b == 0 else {b, n % b}
    bad = sorted(s for s in sizes if s % groups)
    if bad:
        raise PrivacyError(
            f"num_microbatches={groups} does not divide the batches fit will run (sizes "
            f"{sorted(sizes)}). Fix: choose a batch size divisible by num_microbatches, a "
            "training set whose last batch is too, or leave num_microbatches out."
        )


def find_fit_arguments(model):
    """The arguments of the `fit` call running on `model` right now, or None.

    Used when keras_safe is installed from inside `fit` (by the `PrivacyBudget` callback), too
    late to see the call's arguments otherwise: it reads the caller's frame of `Model.fit`,
    whose parameter names are Keras's public API.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            names = (
                "x",
                "y",
                "sample_weight",
                "batch_size",
                "epochs",
                "initial_epoch",
                "steps_per_epoch",
            )
            found = {name: frame.f_locals.get(name) for name in names}
            found["validation_split"] = 0.0  # x is the training part already when it is split
            found["epochs"] = found["epochs"] or 1
            found["initial_epoch"] = found["initial_epoch"] or 0
            return found
        frame = frame.f_back
    return None


class PrivacyGuard(keras.callbacks.Callback):
    """Guards a private `fit` from the model's ledger: the budget, batch sizes, bad examples.

    - Budget: with a budget on the ledger (`PrivacyBudget(target_epsilon=...)` sets one), a
      `fit` whose first step would exceed it raises before any step, and a running `fit` stops
      before the step that would exceed it.
    - Batch sizes: the examples each step actually holds are counted in the graph; when the
      average is above the batch size the accounting used (beyond Poisson variation), the run
      stops with an error and the steps taken are charged again at the observed rate.
    - Non-finite examples: every epoch writes `nonfinite_examples` (examples dropped from their
      step because their gradient norm was not finite) into `logs`, and warns when it is not 0.
    """

    def __init__(self, epochs=1, verbose=1):
        super().__init__()
        self.epochs = epochs
        self.verbose = verbose

    def on_train_begin(self, logs=None):
        model = self.model
        dp = find_dp_optimizer(model.optimizer)
        self._schedule = state.current_schedule(model, dp)
        _check_microbatches(dp.num_microbatches, state.data_settings(model))
        dp.calibrate(self._schedule, self.epochs)
        self._schedule = state.current_schedule(model, dp)
        self._seeded = dp.seeded
        self._ledger = get_ledger(model, create=True)
        self._start_nonfinite = self._ledger.nonfinite_examples
        self._start_rows = self._rows_and_steps()
        self._checked_first = False
        self._taken = 0
        segment = self._schedule.segment(1)[:2]
        self._allowed = self._ledger.steps_within_budget(segment)
        if self._allowed == 0:
            target, delta = self._ledger.budget()
            raise PrivacyError(
                f"The privacy budget target_epsilon={target:g} (delta={delta:.3g}) of "
                f"{model.name} is already spent: it stands at epsilon="
                f"{self._ledger.epsilon(delta):.4f} after {self._ledger.steps} steps, and one "
                "more step would exceed it. No step was taken. Fix: stop training here, or "
                "raise the budget and state the larger epsilon."
            )

    def _rows_and_steps(self):
        for segment in self._ledger.segments():
            if self._matches(segment):
                return segment["rows"], segment["steps"]
        return 0, 0

    def _matches(self, segment):
        noise, rate, _ = self._schedule.segment(1)
        return (
            abs(segment["noise_multiplier"] - noise) <= 1e-12 * max(1.0, noise)
            and abs(segment["sampling_rate"] - rate) <= 1e-12
            and segment["num_examples"] == self._schedule.num_examples
            and segment["seeded"] == self._seeded
        )

    def on_train_batch_end(self, batch, logs=None):
        per_execution = int(getattr(self.model, "steps_per_execution", 1) or 1)
        self._taken += per_execution  # one accounted step per batch
        if not self._checked_first:
            self._checked_first = True
            self._check_batch_sizes(first=True)
        if self._allowed == math.inf or self.model.stop_training:
            return
        if self._taken + per_execution > self._allowed:
            self.model.stop_training = True
            target, delta = self._ledger.budget()
            if self.verbose:
                print(
                    f"\nkeras_safe: stopping training after {self._ledger.steps} noisy steps at "
                    f"epsilon={self._ledger.epsilon(delta):.4f} (delta={delta:.3g}): the next "
                    f"steps would exceed the budget target_epsilon={target:g}."
                )

    def on_epoch_end(self, epoch, logs=None):
        self._check_batch_sizes(first=False)
        dropped = self._ledger.nonfinite_examples - self._start_nonfinite
        if logs is not None:
            logs["nonfinite_examples"] = dropped
        if dropped:
            warnings.warn(
                f"keras_safe dropped {dropped} example(s) from their steps in this fit because "
                "their gradient norm was not finite (NaN or inf in the data or the loss). They "
                "were left out of the clipped sums; check the data (for example with "
                "keras_safe.preprocessing.InputGuard).",
                stacklevel=2,
            )

    def _check_batch_sizes(self, first):
        rows, steps = self._rows_and_steps()
        rows -= self._start_rows[0]
        steps -= self._start_rows[1]
        if steps <= 0:
            return
        expected = self._schedule.batch_size
        mean = rows / steps
        # Poisson batches vary around the expected size: allow 6.5 standard deviations.
        slack = 6.5 * math.sqrt(expected / steps) + (4.0 / steps if first else 0.0)
        if mean <= expected + slack:
            return
        observed = min(1.0, mean / self._schedule.num_examples)
        noise, rate, _ = self._schedule.segment(1)
        slot = self._ledger.slot(noise, observed, self._schedule.num_examples, self._seeded)
        for _ in range(steps):
            self._ledger.charge(slot)
        self.model.stop_training = True
        raise PrivacyError(
            f"The batches of this fit hold {mean:.1f} examples on average, but the accounting "
            f"assumed batch_size={expected} (sampling rate {rate:.4g}); epsilon would be "
            f"understated. Training stopped, and the {steps} steps taken were charged again at "
            f"the observed rate {observed:.4g}. Fix: declare the batch size the data really has "
            "on the DP optimizer, or train with fit on arrays or poisson_batches."
        )
