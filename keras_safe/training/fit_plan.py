"""Before a private `fit`: read the data settings, check them against what was declared,
draw the batches (Poisson by default), calibrate the noise for the steps that will run, and
guard the run (budget, batch sizes, non-finite examples)."""

import dataclasses
import math
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError, fail, step_refusal
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.ledger import BUDGET_SPENT, get_ledger
from keras_safe.privacy.sampling import default_max_batch_size, epoch_batches, poisson_info
from keras_safe.training import distribution, ownership, preflight, state

__all__ = [
    "PrivacyGuard",
    "describe_data",
    "find_fit_arguments",
    "plan_fit",
    "poisson_fit_arguments",
    "require_known_examples",
    "set_num_examples",
    "wants_fixed_batches",
]

# Keras's default batch size for arrays.
_KERAS_BATCH_SIZE = 32


def _is_array_data(x):
    leaves = keras.tree.flatten(x)
    return bool(leaves) and all(
        isinstance(t, (np.ndarray, tf.Tensor)) or hasattr(t, "__array__") for t in leaves
    )


def is_array_data(x):
    """Whether `x` is arrays (what `fit` batches itself), not a dataset or generator."""
    return x is not None and not isinstance(x, tf.data.Dataset) and _is_array_data(x)


def _rows(x):
    return int(np.shape(keras.tree.flatten(x)[0])[0])


def _split_at(rows, validation_split):
    # Keras's rule for arrays in fit (train_validation_split in
    # keras/src/trainers/data_adapters/array_slicing.py): the last fraction validates.
    return int(math.floor(rows * (1.0 - validation_split)))


def _require_examples(rows, validation_split):
    if rows == 0:
        fail(
            "x",
            "0 examples",
            "non-empty training data"
            + (f" (after validation_split={validation_split:g})" if validation_split else ""),
            "pass at least one training example"
            + (", or a smaller validation_split." if validation_split else "."),
        )


def describe_data(x, batch_size=None, validation_split=0.0, steps_per_epoch=None, fixed=False):
    """The `DataSettings` `fit` will train with, as far as they can be known from `x`.

    Arrays: `num_examples` is the number of rows after `validation_split`, `batch_size` the one
    given to `fit` (Keras's default 32); `fixed`: Keras cuts them into fixed-size batches (the
    fixed-batch opt-in; a private `fit` otherwise samples Poisson batches from them).
    `poisson_batches`: what the dataset was built with. Anything else: unknown (None), unless
    the optimizer declares them.

    Raises:
        keras_safe._validation.ArgumentError: on arrays without a training example.
    """
    info = poisson_info(x)
    if info is not None:
        return state.DataSettings(
            info.num_examples,
            info.batch_size,
            steps_per_epoch or info.steps,
            poisson=True,
            padded=info.pad_to_multiple_of is None,
            seeded=info.seeded,
            examples_per_user=getattr(info, "examples_per_user", None),
        )
    if isinstance(x, tf.data.Dataset):
        cardinality = int(x.cardinality())
        known = steps_per_epoch or (cardinality if cardinality > 0 else None)
        return state.DataSettings(steps_per_epoch=known)
    if x is not None and _is_array_data(x):
        rows = _rows(x)
        if validation_split:
            rows = _split_at(rows, validation_split)
        _require_examples(rows, validation_split)
        batch = int(batch_size or _KERAS_BATCH_SIZE)
        batch = min(batch, rows)
        return state.DataSettings(
            rows,
            batch,
            steps_per_epoch or math.ceil(rows / batch),
            fixed=fixed,
            one_pass=fixed and steps_per_epoch is None,
        )
    return state.DataSettings(steps_per_epoch=steps_per_epoch)


def wants_fixed_batches(dp, shuffle):
    """Whether a private `fit` on arrays keeps Keras's fixed-size batches: the explicit opt-in
    (`sampling="shuffle"` on the DP optimizer, or `shuffle=False` / `"batch"` given to `fit`)."""
    return getattr(dp, "sampling", None) == "shuffle" or shuffle is False or shuffle == "batch"


def _class_weights(y, class_weight):
    """Per-example weights from `class_weight`, by Keras's rule for arrays
    (`class_weight_to_sample_weights` in keras/src/trainers/data_adapters/data_adapter_utils.py:
    the argmax of one-hot targets, else the rounded target; 1 for classes not listed)."""
    y = np.asarray(y)
    if y.ndim >= 2 and y.shape[-1] != 1:
        classes = np.argmax(y, axis=-1)
    else:
        classes = np.round(y.reshape(len(y), -1)[:, 0]).astype("int64")
    table = {int(k): float(v) for k, v in class_weight.items()}
    return np.asarray([table.get(int(c), 1.0) for c in classes.reshape(len(y))], "float32")


def check_users(model, dp, params, users):
    """Checks `fit`'s `users=` (one user id per row of the arrays) against the DP optimizer.

    With `privacy_unit="user"`: arrays need `users` (a dataset carries its ids itself: build it
    with `keras_safe.privacy.poisson_batches(..., users=...)`), and `examples_per_user` must be
    declared on the DP optimizer. With example-level privacy, `users` records in the model's
    ledger the most examples one user has, so that the privacy statement also gives the
    user-level epsilon by group privacy.

    Raises:
        keras_safe._validation.ArgumentError: naming `users` or `examples_per_user`.
    """
    x = params["x"]
    user_level = getattr(dp, "privacy_unit", "example") == "user"
    arrays = is_array_data(x)
    if users is None:
        if user_level and arrays:
            fail(
                "users",
                None,
                "one user id per row of x, since the DP optimizer has privacy_unit='user'",
                "pass fit(x, y, users=ids), or train on "
                "keras_safe.privacy.poisson_batches(x, y, users=ids, examples_per_user=k).",
            )
        return None
    if not arrays:
        fail(
            "users",
            "given with a dataset",
            "given with arrays only (a dataset's batches carry their user ids)",
            "build the dataset with keras_safe.privacy.poisson_batches(x, y, users=ids, "
            "examples_per_user=k), or pass arrays to fit.",
        )
    ids = np.asarray(users)
    rows = _rows(x)
    if ids.ndim != 1 or len(ids) != rows or not np.issubdtype(ids.dtype, np.integer):
        fail("users", f"shape {ids.shape}, dtype {ids.dtype}", f"{rows} integer ids, one per row")
    if user_level:
        if ids.min() < 0:
            fail(
                "users",
                f"ids down to {ids.min()}",
                "ids >= 0 (-1 marks padding rows in user-level batches)",
                "renumber them, for example with np.unique(ids, return_inverse=True)[1].",
            )
        if wants_fixed_batches(dp, params["shuffle"]):
            fail(
                "shuffle",
                params["shuffle"],
                "left to the private fit with privacy_unit='user' (it samples users)",
                "leave shuffle out (and sampling unset on the DP optimizer).",
            )
        if not dp.examples_per_user:
            fail(
                "examples_per_user",
                None,
                "declared on the DP optimizer with privacy_unit='user' for fit on arrays",
                "pass examples_per_user=k (the most examples of one user a step uses).",
            )
        return ids
    if params["validation_split"]:
        ids = ids[: _split_at(rows, params["validation_split"])]
    most = int(np.max(np.unique(ids, return_counts=True)[1]))
    get_ledger(model, create=True).record_user_examples(most)
    return None


def _user_sampling(dp, users):
    """`epoch_batches`' user-level arguments (none for example-level sampling)."""
    if users is None:
        return {}
    return {"users": users, "examples_per_user": dp.examples_per_user}


def poisson_fit_arguments(model, dp, params, users=None):
    """The arguments of a private `fit` on arrays with the arrays replaced by Poisson batches.

    Every epoch of `fit` iterates `keras_safe.privacy.sampling.epoch_batches` once: `ceil(n /
    batch_size)` fresh Poisson samples (or `steps_per_epoch`) at rate `batch_size / n`, the
    batches the reported epsilon assumes. `validation_split` is taken from the arrays as Keras
    takes it (the last fraction), `class_weight` becomes per-example weights, and `shuffle` is
    set to False (the dataset shuffles by sampling, so Keras has nothing to shuffle). With
    `users` (user-level privacy), the batches sample users and lay out each sampled user's
    examples in a slot of `examples_per_user` rows (`keras_safe.privacy.epoch_batches`).

    Batches are not padded to one shape (a dynamic batch dimension, as fast as Keras's own
    batches) except under XLA (`model.jit_compile`) or a strategy with several replicas, where
    they are padded to the size a sample exceeds with probability below 1e-9; with
    `num_microbatches` a batch is padded to a multiple of it.

    Raises:
        keras_safe._validation.ArgumentError: empty arrays, or `class_weight` with
            `sample_weight`.
    """
    params = dict(params)
    x, y, weights = params["x"], params["y"], params["sample_weight"]
    split = params["validation_split"] or 0.0
    rows = _rows(x)
    if split:
        at = _split_at(rows, split)
        _require_examples(at, split)
        if at == rows:
            fail(
                "validation_split",
                split,
                f"large enough to leave one of the {rows} examples for validation",
                "pass a larger validation_split, or validation_data.",
            )
        if params["validation_data"] is None:

            def tail(part):
                return None if part is None else keras.tree.map_structure(lambda a: a[at:], part)

            params["validation_data"] = (tail(x), tail(y), tail(weights))

        def head(part):
            return None if part is None else keras.tree.map_structure(lambda a: a[:at], part)

        x, y, weights, users = head(x), head(y), head(weights), head(users)
        rows = at
    _require_examples(rows, split)
    if params["class_weight"] is not None:
        if weights is not None:
            fail(
                "class_weight",
                "given with sample_weight",
                "given alone",
                "fold the class weights into sample_weight, or pass only one of them.",
            )
        if y is None or len(keras.tree.flatten(y)) != 1:
            fail("class_weight", params["class_weight"], "used with a single target array")
        weights = _class_weights(keras.tree.flatten(y)[0], params["class_weight"])
    units = rows if users is None else len(np.unique(users))
    batch = min(int(params["batch_size"] or _KERAS_BATCH_SIZE), units)
    strategy = getattr(model, "distribute_strategy", None)
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1) or 1)
    groups = dp.num_microbatches
    physical = getattr(dp, "physical_batch_size", None)
    fixed_shape = replicas > 1 or bool(getattr(model, "jit_compile", False)) or bool(physical)
    multiple = None if fixed_shape else (groups or 1)
    max_rows = None
    if fixed_shape and groups and replicas == 1:
        max_rows = -(-default_max_batch_size(batch, rows) // groups) * groups
    if physical and users is None:
        # Chunks of physical_batch_size rows: the padded size rounded up to a multiple of it.
        max_rows = -(-default_max_batch_size(batch, rows) // physical) * physical
    params.update(
        # keras-internal: dataset-each-epoch
        x=epoch_batches(
            x,
            y,
            weights,
            batch_size=batch,
            steps_per_epoch=params["steps_per_epoch"],
            max_batch_size=max_rows,
            strategy=strategy if replicas > 1 else None,
            pad_to_multiple_of=multiple,
            **_user_sampling(dp, users),
        ),
        y=None,
        sample_weight=None,
        class_weight=None,
        batch_size=None,
        validation_split=0.0,
        validation_batch_size=params["validation_batch_size"] or params["batch_size"],
        steps_per_epoch=None,
        shuffle=False,
    )
    return params


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
    shuffle=True,
):
    """Reads and checks the data settings of a private `fit`; returns its `PrivacyGuard`.

    The guard finishes the checks when training begins (after every callback's `set_model`,
    so `PrivacyBudget(num_examples=...)` can still fill in what the data does not tell):
    unknown sampling rate, microbatches that do not divide the batches, the model's budget,
    calibration of `target_epsilon` for the epochs that will run, a spent budget.

    Arrays reach it only in Keras's own fixed-size batches (the opt-in of
    `wants_fixed_batches`, or a model made private inside a `fit` already running, by the
    `PrivacyBudget` callback); otherwise `private_fit` has replaced them by Poisson batches.

    Raises:
        keras_safe._validation.PrivacyError: no DP optimizer; Keras's shuffled batches without
            the opt-in; under a `tf.distribute` strategy, data the distributed accounting
            cannot cover (`keras_safe.training.distribution.check_fit_data`).
        keras_safe._validation.ArgumentError: declared settings that differ from the data.
    """
    dp = state.require_dp_optimizer(model)
    fixed = is_array_data(x)  # arrays reach here only in Keras's own batches
    if fixed and not wants_fixed_batches(dp, shuffle):
        raise PrivacyError(
            f"{model.name} became private inside a fit on arrays that had already started, so "
            "this fit would train on Keras's shuffled fixed-size batches, for which the usual "
            "(Poisson) epsilon is not a proof. Nothing was trained. Fix: call "
            "keras_safe.privacy.make_private(model) before fit (a private fit on arrays samples "
            "Poisson batches), or opt in to fixed-size batches, accounted without "
            "amplification, with sampling='shuffle' on the DP optimizer."
        )
    settings = describe_data(x, batch_size, validation_split, steps_per_epoch, fixed=fixed)
    schedule = dp.schedule(settings.num_examples, settings.batch_size, settings.steps_per_epoch)
    settings = dataclasses.replace(
        settings, num_examples=schedule.num_examples, batch_size=schedule.batch_size
    )
    distribution.check_fit_data(model, x, settings)
    state.set_data_settings(model, settings)
    preflight.ensure_verified(model, x, y, sample_weight)
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
    # Poisson batches are padded to a multiple of the microbatches (the step checks the
    # shape); microbatches of consecutive padded rows are accounted under zero-out adjacency.
    if not groups or settings.poisson:
        return
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
    # keras-internal: fit-frame
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
                "shuffle",
            )
            found = {name: frame.f_locals.get(name) for name in names}
            found["validation_split"] = 0.0  # x is the training part already when it is split
            found["epochs"] = found["epochs"] or 1
            found["initial_epoch"] = found["initial_epoch"] or 0
            return found
        frame = frame.f_back
    return None


class FitStep:
    """A private fit's compiled step, as the fit leaves it on the model.

    The step's schedule (the fit's data, its sampling rate) is a constant of its trace. Within
    a fit it runs as it is; called outside one (`model.train_function(...)` by hand), the
    model's step is traced again for batches the caller gives, and that step runs instead.
    """

    def __init__(self, model, raw):
        self.model, self.raw = model, raw

    def __call__(self, iterator):
        model = self.model
        if not state.safe_state(model).fit_step:
            state.retrace_if_needed(model, find_dp_optimizer(model.optimizer))
            function = model.train_function  # keras-internal: train-function
            if function is not self:
                return function(iterator)
        return self.raw(iterator)


class PrivacyGuard(keras.callbacks.Callback):
    """Guards a private `fit` from the model's ledger: the budget, batch sizes, bad examples.

    - Budget: the DP optimizer's `target_epsilon` and `PrivacyBudget(target_epsilon=...)` are
      the model's one lifetime budget, in its ledger. A `fit` that cannot take a step within it
      raises before any step; the noise of a `target_epsilon` is calibrated for what is left.
      Inside the step the ledger's gate refuses the step that would exceed the budget (whatever
      `steps_per_execution` is); the guard turns that refusal into a clean stop: `fit` returns
      its `History` with a message.
    - Fixed-size batches (the opt-in): each epoch is one pass over the data, granted one
      mechanism in the ledger at its start.
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
        self._wrapped = None

    def on_train_begin(self, logs=None):
        found = state.safe_state(self.model)
        found.guarded = True
        # The schedule and the traced step of this fit's own steps, which train on its data.
        found.fit_step = True
        try:
            self._begin()
        finally:
            found.fit_step = False

    def _begin(self):
        model = self.model
        dp = find_dp_optimizer(model.optimizer)
        ownership.settle_ledger(model)  # weights shared or copied in since the last step
        settings = state.data_settings(model)
        _check_microbatches(dp.num_microbatches, settings)
        schedule = state.current_schedule(model, dp)
        ledger = state.require_optimizer_budget(model, dp, schedule.num_examples)
        budget = ledger.budget()
        delta = budget[1] if budget else None
        accountant = ledger.accountant if budget else None
        dp.calibrate(schedule, self.epochs, _prior(ledger), delta, accountant)
        self._schedule = state.current_schedule(model, dp)
        self._ledger, self._slot = state.ledger_slot(model, dp, self._schedule)
        self._seeded = dp.seeded or bool(settings and settings.seeded)
        self._start_nonfinite = self._ledger.nonfinite_examples
        self._start_refused = self._ledger.refused_steps
        self._start_rows = self._rows_and_steps()
        self._checked_first = False
        self._stopped = False
        state.budget_stop(model)  # forget an earlier fit's stop
        self._last_logs = None
        self._xla = bool(getattr(model, "jit_compile", False))
        if self._ledger.steps_left(self._slot) < 1:
            raise state.budget_spent(model, self._ledger, self._schedule.label)
        # The step traced for the noise just calibrated, this fit's data and its ledger.
        state.retrace_if_needed(model, dp)
        # Keras's fit calls `model.train_function(iterator)` once per execution, after
        # `make_train_function()` and `on_train_begin` (keras/src/backend/tensorflow/trainer.py,
        # `fit`): wrapping it here turns the ledger's in-step refusal into a clean stop.
        # keras-internal: train-function
        self._wrapped = model.train_function
        model.train_function = self._guarded  # keras-internal: train-function

    def _guarded(self, iterator):
        # Only the fit's own steps train on its data; a callback's train_on_batch or
        # dp_gradients in between is a step on batches the caller gave.
        found = state.safe_state(self.model)
        found.fit_step = True
        try:
            logs = self._wrapped(iterator)
        except tf.errors.InvalidArgumentError as error:
            if BUDGET_SPENT not in (getattr(error, "message", None) or str(error)):
                raise
            return self._stop_at_budget()
        finally:
            found.fit_step = False
        if self._xla and self._ledger.refused_steps > self._start_refused:
            # Under XLA the assertion does not run: the ledger withheld the release instead.
            return self._stop_at_budget(logs)
        self._last_logs = logs
        return logs

    def _stop_at_budget(self, logs=None):
        model = self.model
        model.stop_training = True
        if not self._stopped:
            target, delta = self._ledger.budget()
            message = (
                f"keras_safe: stopping training after {self._ledger.steps} noisy steps at "
                f"epsilon={self._ledger.epsilon():.4f} (delta={delta:.3g}): the next step would "
                f"exceed the budget target_epsilon={target:g}."
            )
            if self.verbose:
                print("\n" + message)
            state.budget_stop(model, message, printed=bool(self.verbose))
        self._stopped = True
        if logs is None:
            logs = self._last_logs
        return logs if logs is not None else model.get_metrics_result()

    def restore(self):
        """Puts back the train function `on_train_begin` wrapped, and ends the fit: a shuffled
        epoch it left unfinished grants no later step (of a custom loop, say) its mechanism."""
        ledger = getattr(self, "_ledger", None)
        if ledger is not None and self._schedule.epoch_grant > 1:
            ledger.close_epoch(self._slot)
        if self.model is not None:
            found = state.safe_state(self.model)
            found.guarded = found.fit_step = False
        # keras-internal: train-function
        if self._wrapped is not None and getattr(self.model, "train_function", None) == (
            self._guarded
        ):
            # Left on the model for the next fit; called by hand outside one, it is traced
            # again for batches the caller gives.
            raw = getattr(self._wrapped, "raw", self._wrapped)
            self.model.train_function = FitStep(self.model, raw)  # keras-internal: train-function
        self._wrapped = None

    def on_train_end(self, logs=None):
        self.restore()

    def _rows_and_steps(self):
        for segment in self._ledger.segments():
            if self._matches(segment):
                return segment["rows"], segment["steps"]
        return 0, 0

    def _matches(self, segment):
        noise, rate, _ = self._schedule.accounted_segment(1)
        return (
            abs(segment["noise_multiplier"] - noise) <= 1e-12 * max(1.0, noise)
            and abs(segment["sampling_rate"] - rate) <= 1e-12
            and segment["num_examples"] == self._schedule.num_examples
            and segment["seeded"] == self._seeded
            and segment["shuffled"] == (not self._schedule.poisson)
        )

    def on_epoch_begin(self, epoch, logs=None):
        grant = self._schedule.epoch_grant
        if grant > 1:
            self._ledger.open_epoch(self._slot, grant)

    def on_train_batch_end(self, batch, logs=None):
        if not self._checked_first:
            self._checked_first = True
            self._check_batch_sizes(first=True)

    def on_epoch_end(self, epoch, logs=None):
        if self._schedule.epoch_grant > 1:
            self._ledger.close_epoch(self._slot)
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
        if self._schedule.user_level:
            return  # rows are examples, the sampling counts users: checked in the step
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
        noise = self._schedule.accounted_noise
        slot = self._ledger.slot(noise, observed, self._schedule.num_examples, self._seeded)
        for _ in range(steps):
            self._ledger.charge(slot)
        self.model.stop_training = True
        raise PrivacyError(
            f"The batches of this fit hold {mean:.1f} examples on average, but the accounting "
            f"assumed batch_size={expected} (sampling rate {self._schedule.sampling_rate:.4g}); "
            f"epsilon would be understated. Training stopped, and the {steps} steps taken were "
            f"charged again at the observed rate {observed:.4g}. Fix: declare the batch size "
            "the data really has on the DP optimizer, or train with fit on arrays or "
            "poisson_batches."
        )


def _prior(ledger):
    """The ledger's segments as the accountant composes them."""
    return [(s["noise_multiplier"], s["sampling_rate"], s["events"]) for s in ledger.segments()]


def refusal_of(error):
    """The `PrivacyError` for a TensorFlow error that a keras_safe check raised inside a step
    (`keras_safe._validation.step_refusal`), or None."""
    if isinstance(error, tf.errors.OpError):
        return step_refusal(error)
    return None
