"""The privacy ledger: what a model has spent, kept with the model and saved with it.

The spent budget belongs to the model and its training data, not to an optimizer instance: a
recompile, a new DP optimizer, `load_model(compile=False)` or a second `fit` must not restart the
count. The ledger is a table of *segments*, one per distinct (accounted noise multiplier, sampling
rate, number of examples, seeded noise) combination, each with the number of accounted steps
taken. The train step charges it in the graph, where the noise is drawn, so every noisy release
is counted (also under XLA and in custom loops); epsilon composes the segments with the
registered accountants (heterogeneous composition, `dp_accounting`).

The ledger's variables are saved in the model's `.keras` file (it is reachable from the model as
the attribute `_keras_safe_ledger`, outside `model.weights`). Only the explicit, named call
`ledger.reset()` clears it.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError, check_number
from keras_safe.accounting.accountants import check_accountant, epsilon_of
from keras_safe.accounting.compute import check_delta, default_delta

__all__ = ["LEDGER_ATTRIBUTE", "PrivacyLedger", "get_ledger"]

LEDGER_ATTRIBUTE = "_keras_safe_ledger"


def _close(a, b):
    return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


@keras.saving.register_keras_serializable(package="keras_safe")
class PrivacyLedger(keras.layers.Layer):
    """The privacy spent by a model: DP-SGD segments and their accounted steps.

    Get a model's ledger with `keras_safe.privacy.get_ledger(model)`; keras_safe's train step
    creates and charges it. Each row of `segments()` is one combination of accounted noise
    multiplier, sampling rate and training-set size with the steps taken at it.

    Args:
        capacity: the most distinct segments the ledger holds.

    Example:
        >>> ledger = PrivacyLedger()
        >>> slot = ledger.slot(noise_multiplier=1.5, sampling_rate=0.04, num_examples=10000)
        >>> for _ in range(3):
        ...     ledger.charge(slot)
        >>> ledger.steps
        3
        >>> ledger.epsilon(delta=1e-5) > 0
        True
    """

    def __init__(self, capacity=32, **kwargs):
        kwargs.setdefault("name", "privacy_ledger")
        super().__init__(trainable=False, **kwargs)
        self.capacity = int(check_number("capacity", capacity, low=1, integer=True))

        def weight(name, dtype, shape=(self.capacity,), aggregation="none"):
            return self.add_weight(
                shape=shape,
                dtype=dtype,
                initializer="zeros",
                trainable=False,
                aggregation=aggregation,
                name=name,
            )

        self._noise = weight("noise_multiplier", "float64")
        self._rate = weight("sampling_rate", "float64")
        self._examples = weight("num_examples", "int64")
        self._seeded = weight("seeded_noise", "int64")
        # Under a tf.distribute strategy every replica charges the global step it takes part
        # in, with the counts summed over the replicas (`charge`): the first replica's charge
        # is kept, so a global step counts once.
        self._steps = weight("steps", "int64", aggregation="only_first_replica")
        self._rows = weight("rows", "int64", aggregation="only_first_replica")
        self._used = weight("segments_used", "int64", ())
        self._nonfinite = weight(
            "nonfinite_examples", "int64", (), aggregation="only_first_replica"
        )
        self._budget = weight("budget", "float64", (2,))
        self.built = True
        self._cache = {}

    # -- writing (the train step) ----------------------------------------------------------------

    def slot(self, noise_multiplier, sampling_rate, num_examples, seeded=False):
        """The segment index for these settings, allocated if new.

        Runs eagerly even while a train function is being traced (the allocation happens once,
        at trace time); the returned index is then a constant of the traced step.

        Raises:
            PrivacyError: when the ledger is full.
        """
        noise, rate = float(noise_multiplier), float(sampling_rate)
        examples, seeded = int(num_examples), int(bool(seeded))
        with tf.init_scope():
            used = int(self._used.numpy())
            noises, rates = self._noise.numpy(), self._rate.numpy()
            counts, seeds = self._examples.numpy(), self._seeded.numpy()
            for i in range(used):
                if (
                    _close(noises[i], noise)
                    and _close(rates[i], rate)
                    and counts[i] == examples
                    and seeds[i] == seeded
                ):
                    return i
            if used >= self.capacity:
                raise PrivacyError(
                    f"The privacy ledger holds {self.capacity} distinct DP-SGD settings and is "
                    "full, so keras_safe cannot record this step. Fix: keep the noise, batch "
                    "size and training set fixed across fits, or build the ledger with a "
                    "larger capacity."
                )
            for variable, value in (
                (self._noise, noise),
                (self._rate, rate),
                (self._examples, examples),
                (self._seeded, seeded),
            ):
                array = variable.numpy()
                array[used] = value
                variable.assign(array)
            self._used.assign(used + 1)
        return used

    def charge(self, slot, rows=None):
        """Adds one accounted step to segment `slot` (graph-safe); `rows`: examples in it.

        Returns the update ops: the train step makes its release wait for them, so a step
        whose charge fails (a budget check, for example) releases nothing.

        Under a `tf.distribute` strategy every replica calls it for the global step, with the
        examples of its own part of the batch: the step counts once and the rows of all
        replicas are summed.
        """
        one_hot = tf.one_hot(slot, self.capacity, dtype=tf.int64)
        updates = [self._steps.assign_add(one_hot)]
        if rows is not None:
            updates.append(self._rows.assign_add(one_hot * _sum_over_replicas(rows)))
        return updates

    def record_nonfinite(self, count):
        """Counts examples dropped from a step because their gradient norm was not finite
        (under a strategy, every replica passes its own count; they are summed)."""
        self._nonfinite.assign_add(_sum_over_replicas(count))

    def reset(self):
        """Forgets everything spent, and the budget.

        The one way to clear a ledger, for a model that has not been trained on the data the
        ledger speaks of (for example a copy re-initialised from scratch).
        """
        for variable in self.weights:
            variable.assign(np.zeros(variable.shape, variable.dtype))
        self._cache.clear()

    def set_budget(self, target_epsilon, delta):
        """Sets the budget that training on this model may not exceed (saved with the model).

        keras_safe's `fit` stops before the step that would exceed it and `train_on_batch`
        refuses that step; `keras_safe.callbacks.PrivacyBudget(target_epsilon=...)` sets it.
        """
        self._budget.assign(np.array([float(target_epsilon), float(delta)]))

    def budget(self):
        """`(target_epsilon, delta)`, or None when no budget is set."""
        target, delta = keras.ops.convert_to_numpy(self._budget)
        return (float(target), float(delta)) if target > 0 else None

    def steps_within_budget(self, segment, accountant="rdp"):
        """How many more steps of `segment` `(noise, rate)` keep epsilon within the budget.

        Returns `math.inf` without a budget (or without noise cost) and 0 when even one more
        step would exceed it.
        """
        budget = self.budget()
        if budget is None:
            return math.inf
        target, delta = budget
        noise, rate = segment

        def within(steps):
            return self.epsilon(delta, accountant, extra=[(noise, rate, steps)]) <= target

        if not within(1):
            return 0
        low, high = 1, 2
        while within(high):
            if high >= 2**40:
                return math.inf
            low, high = high, 2 * high
        while high - low > 1:  # invariant: within(low) and not within(high)
            middle = (low + high) // 2
            low, high = (middle, high) if within(middle) else (low, middle)
        return low

    # -- reading ---------------------------------------------------------------------------------

    def segments(self):
        """The segments with steps, as dicts (noise_multiplier, sampling_rate, num_examples,
        seeded, steps, rows)."""
        used = int(keras.ops.convert_to_numpy(self._used))
        columns = [
            keras.ops.convert_to_numpy(v)[:used]
            for v in (
                self._noise,
                self._rate,
                self._examples,
                self._seeded,
                self._steps,
                self._rows,
            )
        ]
        return [
            {
                "noise_multiplier": float(noise),
                "sampling_rate": float(rate),
                "num_examples": int(n),
                "seeded": bool(seeded),
                "steps": int(steps),
                "rows": int(rows),
            }
            for noise, rate, n, seeded, steps, rows in zip(*columns)
            if steps > 0
        ]

    @property
    def steps(self):
        """Accounted steps taken so far (all segments)."""
        return int(np.sum(keras.ops.convert_to_numpy(self._steps)))

    @property
    def nonfinite_examples(self):
        """Examples dropped so far because their gradient norm was not finite."""
        return int(keras.ops.convert_to_numpy(self._nonfinite))

    @property
    def seeded(self):
        """Whether any step drew its noise from a user-given (reproducible) seed."""
        return any(s["seeded"] for s in self.segments())

    def default_delta(self):
        """`default_delta` of the smallest training set in the ledger (None when empty)."""
        sizes = [s["num_examples"] for s in self.segments()]
        return default_delta(min(sizes)) if sizes else None

    def epsilon(self, delta=None, accountant="rdp", extra=()):
        """Epsilon of everything spent (plus `extra` segments `(noise, rate, steps)`).

        Args:
            delta: the delta of the guarantee; defaults to `default_delta()`.
            accountant: a registered accountant name (`"rdp"`, `"pld"`).
            extra: planned segments to add (for "what if" questions, such as a budget check).

        Returns:
            Epsilon as a float (0.0 when nothing was spent).
        """
        segments = [
            (s["noise_multiplier"], s["sampling_rate"], s["steps"]) for s in self.segments()
        ]
        segments += [tuple(e) for e in extra]
        if not any(n > 0 for _, _, n in segments):
            return 0.0
        if delta is None:
            delta = self.default_delta()
            if delta is None:
                return math.inf
        delta = check_delta(delta)
        accountant = check_accountant(accountant)
        key = (tuple(segments), delta, accountant)
        if key not in self._cache:
            self._cache[key] = epsilon_of(segments, delta, accountant)
        return self._cache[key]

    def get_config(self):
        return {"capacity": self.capacity, "name": self.name}


def _sum_over_replicas(count):
    """An int64 count summed over the replicas in sync (unchanged outside a replica context)."""
    count = tf.cast(count, tf.int64)
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return count
    return context.all_reduce(tf.distribute.ReduceOp.SUM, count)


def get_ledger(model, create=False):
    """The privacy ledger of `model` (None when it has none and `create` is False).

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> get_ledger(model) is None
        True
        >>> get_ledger(model, create=True).steps
        0
    """
    ledger = getattr(model, LEDGER_ATTRIBUTE, None)
    if ledger is None and create:
        strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
        with strategy.scope():
            ledger = PrivacyLedger()
        # Set past Keras's attribute tracking: the ledger is not a layer of the model and its
        # variables are not model weights, but saving still finds it by the attribute.
        object.__setattr__(model, LEDGER_ATTRIBUTE, ledger)
    return ledger
