"""The privacy ledger: what a model has spent and may spend, kept with the model and saved with it.

The spent budget belongs to the model and its training data, not to an optimizer instance: a
recompile, a new DP optimizer, `load_model(compile=False)` or a second `fit` must not restart the
count. The ledger is a table of *segments*, one per distinct (accounted noise multiplier,
accounted sampling rate, number of examples, seeded noise, shuffled batches) combination, each
with the noisy steps taken and the Gaussian mechanisms they count as (one per step for Poisson
batches, one per epoch begun for shuffled one-pass epochs: `keras_safe.accounting.DPSchedule`).
The train step charges it in the graph, where the noise is drawn, so every noisy release is
counted (also under XLA and in custom loops); epsilon composes the segments with the registered
accountants (heterogeneous composition, `dp_accounting`).

The ledger also holds the model's **budget**: a target epsilon, its delta and the accountant that
enforces it. Every `target_epsilon` (the DP optimizer's, `PrivacyBudget`'s) is this one lifetime
budget. The charge is gated in the step: a step that would take epsilon past the budget is
refused before its update (an error in `fit`, `train_on_batch` and custom loops; under XLA, where
TensorFlow drops assertions, the step's release is withheld and counted in `refused_steps`).
The host sets the gate (`limit`, one per segment) from the accountant: the segment in use may take
every further step the budget allows, the others none until they are used again.

The ledger's variables are saved in the model's `.keras` file (it is reachable from the model as
the attribute `_keras_safe_ledger`, outside `model.weights`; Keras's saving walks the model's
attributes). Only the explicit, named call `ledger.reset()` clears it.
"""

import math
import secrets

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import STEP_REFUSED, PrivacyError, check_number, fail
from keras_safe.accounting.accountants import check_accountant, epsilon_of
from keras_safe.accounting.checks import check_delta, check_target, default_delta
from keras_safe.accounting.statement import privacy_statement

__all__ = ["LEDGER_ATTRIBUTE", "PrivacyLedger", "get_ledger", "set_ledger"]

LEDGER_ATTRIBUTE = "_keras_safe_ledger"
# The gate of a segment nobody limits (no budget). Far below int64's end, so sums cannot wrap.
NO_LIMIT = 2**62
_NAME_LENGTH = 16  # the accountant's name, stored as character codes
# The variables of a ledger saved before the budget, the accountant and shuffled batches.
_LEGACY_VARIABLES = 9
# The variables of a ledger saved before the privacy unit was recorded (the unit: examples).
_BEFORE_UNITS = 18
# The variables of a ledger saved before its lineage was recorded.
_BEFORE_LINEAGE = 20
UNITS = ("example", "user")  # stored as 1 and 2; 0: no step charged yet

# How a step refused by the budget is told apart (no quote marks: TensorFlow escapes them).
BUDGET_SPENT = "the privacy budget in the privacy ledger of the model does not allow it"
BUDGET_MESSAGE = (
    f"{STEP_REFUSED}{BUDGET_SPENT}: one more step "
    "would take epsilon past target_epsilon (or the steps of the budget were given to a "
    "training run with other DP settings since this step was traced). Nothing was applied "
    "or charged. "
    "Fix: stop training here (fit stops by itself at the budget), or raise the budget "
    "explicitly with keras_safe.privacy.get_ledger(model).set_budget(...) and state the larger "
    "epsilon."
)


def _close(a, b):
    return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))


class Charge(list):
    """The update ops of one charge (a list, so a step can wait for them) and `allowed`: a
    boolean tensor, False when the budget refused the step."""

    def __init__(self, updates, allowed):
        super().__init__(updates)
        self.allowed = allowed


@keras.saving.register_keras_serializable(package="keras_safe")
class PrivacyLedger(keras.layers.Layer):
    """The privacy a model spent and may spend: DP-SGD segments, their steps and the budget.

    Get a model's ledger with `keras_safe.privacy.get_ledger(model)`; keras_safe's train step
    creates and charges it. Each row of `segments()` is one combination of accounted noise
    multiplier, sampling rate, training-set size and sampling (Poisson or shuffled) with the
    steps taken at it.

    Args:
        capacity: the most distinct segments the ledger holds.

    Example:
        >>> ledger = PrivacyLedger()
        >>> slot = ledger.slot(noise_multiplier=1.5, sampling_rate=0.04, num_examples=10000)
        >>> for _ in range(3):
        ...     _ = ledger.charge(slot)
        >>> ledger.steps
        3
        >>> ledger.set_budget(target_epsilon=3.0, delta=1e-5)
        >>> ledger.budget(), ledger.epsilon() <= 3.0
        ((3.0, 1e-05), True)
    """

    def __init__(self, capacity=32, **kwargs):
        kwargs.setdefault("name", "privacy_ledger")
        super().__init__(trainable=False, **kwargs)
        self.capacity = int(check_number("capacity", capacity, low=1, integer=True))

        def weight(name, dtype, shape=(self.capacity,), aggregation="none", initializer="zeros"):
            return self.add_weight(
                shape=shape,
                dtype=dtype,
                initializer=initializer,
                trainable=False,
                aggregation=aggregation,
                name=name,
            )

        first = "only_first_replica"
        # The order is the saved layout: the first nine are those of ledgers saved before the
        # budget's accountant and shuffled batches were recorded (`load_own_variables`).
        self._noise = weight("noise_multiplier", "float64")
        self._rate = weight("sampling_rate", "float64")
        self._examples = weight("num_examples", "int64")
        self._seeded = weight("seeded_noise", "int64")
        # Under a tf.distribute strategy every replica charges the global step it takes part
        # in, with the counts summed over the replicas (`charge`): the first replica's charge
        # is kept, so a global step counts once.
        self._steps = weight("steps", "int64", aggregation=first)
        self._rows = weight("rows", "int64", aggregation=first)
        self._used = weight("segments_used", "int64", ())
        self._nonfinite = weight("nonfinite_examples", "int64", (), aggregation=first)
        self._budget = weight("budget", "float64", (2,))
        self._accountant = weight("budget_accountant", "int64", (_NAME_LENGTH,))
        self._shuffled = weight("shuffled", "int64")
        self._events = weight("mechanisms", "int64", aggregation=first)
        self._limit = weight("limit", "int64", initializer=keras.initializers.Constant(NO_LIMIT))
        # Steps of a shuffled epoch still covered by its first step's mechanism (> 0), an epoch
        # granted but not begun (< 0: minus its steps), or none (0).
        self._epoch_left = weight("epoch_left", "int64", aggregation=first)
        self._refused = weight("refused_steps", "int64", (), aggregation=first)
        # Pure epsilon-DP releases of statistics computed from the training data (DP-adapted
        # preprocessing layers), each recorded once under its release's identifier.
        self._release_ids = weight("statistics_release_ids", "int64")
        self._release_epsilon = weight("statistics_release_epsilon", "float64")
        self._releases_used = weight("statistics_releases_used", "int64", ())
        # The unit of privacy of every segment (one ledger, one unit), and for example-level
        # training on data whose user ids were given, the most examples of one user.
        self._unit = weight("privacy_unit", "int64", ())
        self._user_examples = weight("max_user_examples", "int64", ())
        # A random number drawn when the ledger is created and saved with it: the ledgers
        # loaded from one saved ledger share it, ledgers created apart do not (`lineage`).
        self._lineage = weight("lineage", "int64", ())
        with tf.init_scope():
            self._lineage.assign(secrets.randbits(62) + 1)
        self.built = True
        self._cache = {}
        self._active = None

    # -- writing (the train step) ----------------------------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def slot(
        self,
        noise_multiplier,
        sampling_rate,
        num_examples,
        seeded=False,
        shuffled=False,
        privacy_unit="example",
    ):
        """The segment index for these settings, allocated if new, and given the budget's gate.

        Runs eagerly even while a train function is being traced (the allocation happens once,
        at trace time); the returned index is then a constant of the traced step.
        `privacy_unit`: what `num_examples` counts and the guarantee covers (`"example"` or
        `"user"`); a ledger holds one unit.

        Raises:
            PrivacyError: when the ledger is full, or holds steps of the other unit.
        """
        noise, rate = float(noise_multiplier), float(sampling_rate)
        examples, seeded, shuffled = int(num_examples), int(bool(seeded)), int(bool(shuffled))
        self._require_unit(privacy_unit)
        with tf.init_scope():
            used = int(self._used.numpy())
            noises, rates = self._noise.numpy(), self._rate.numpy()
            counts, seeds = self._examples.numpy(), self._seeded.numpy()
            kinds = self._shuffled.numpy()
            index = None
            for i in range(used):
                if (
                    _close(noises[i], noise)
                    and _close(rates[i], rate)
                    and counts[i] == examples
                    and seeds[i] == seeded
                    and kinds[i] == shuffled
                ):
                    index = i
                    break
            if index is None:
                if used >= self.capacity:
                    raise PrivacyError(
                        f"The privacy ledger holds {self.capacity} distinct DP-SGD settings and "
                        "is full, so keras_safe cannot record this step. Fix: keep the noise, "
                        "batch size and training set fixed across fits, or build the ledger "
                        "with a larger capacity."
                    )
                for variable, value in (
                    (self._noise, noise),
                    (self._rate, rate),
                    (self._examples, examples),
                    (self._seeded, seeded),
                    (self._shuffled, shuffled),
                ):
                    _set_entry(variable, used, value)
                self._used.assign(used + 1)
                index = used
            self.activate(index)
        return index

    def _require_unit(self, privacy_unit):
        if privacy_unit not in UNITS:
            fail("privacy_unit", privacy_unit, f"one of {UNITS}")
        held = self.privacy_unit
        if held is not None and held != privacy_unit:
            raise PrivacyError(
                f"This model's privacy ledger holds (or was set up for) steps that protect one "
                f"{held}, and this step protects one {privacy_unit}: their guarantees do not "
                "compose into one statement, so keras_safe does not mix them. Nothing was "
                f"trained. Fix: train with privacy_unit='{held}' as before, or train a fresh "
                "model (get_ledger(model).reset() clears the unit of a ledger whose model never "
                "trained on the data)."
            )
        with tf.init_scope():
            self._unit.assign(UNITS.index(privacy_unit) + 1)

    @property
    def privacy_unit(self):
        """What the ledger's guarantee covers: `"example"` or `"user"` (None before any
        step; ledgers saved before units were recorded hold examples)."""
        unit = int(_read(self._unit))
        if unit:
            return UNITS[unit - 1]
        return "example" if self.steps else None

    def record_user_examples(self, count):
        """Records that one user has up to `count` examples in the data of example-level
        training (the largest count given so far is kept): the statement then also gives the
        user-level epsilon by group privacy."""
        count = int(check_number("count", count, low=1, integer=True))
        with tf.init_scope():
            self._user_examples.assign(max(count, int(_read(self._user_examples))))
        self._cache.clear()

    @property
    def max_user_examples(self):
        """The most examples of one user recorded (`record_user_examples`), else None."""
        return int(_read(self._user_examples)) or None

    def activate(self, slot):
        """Gives segment `slot` every further step the budget allows (the other segments
        none, until they are activated again); a no-op when it is active already."""
        if self._active != slot:
            self._active = slot
            self.refresh_limits()

    @tf.autograph.experimental.do_not_convert
    def charge(self, slot, rows=None, in_epoch=True):
        """Adds one step to segment `slot` (graph-safe), gated by the budget; `rows`: examples;
        `in_epoch`: the step may belong to a shuffled epoch's grant (`open_epoch`); a step of
        batches the caller gave (False) is always a mechanism of its own and leaves the grant.

        Returns a `Charge`: the update ops (the train step makes its release wait for them, so
        a step whose charge fails releases nothing) and `allowed`, a boolean tensor the step
        uses to withhold its release where assertions do not run (XLA). A step the budget
        refuses raises an `InvalidArgumentError` whose message starts with
        `keras_safe._validation.STEP_REFUSED`; it charges nothing.

        Under a `tf.distribute` strategy every replica calls it for the global step, with the
        examples of its own part of the batch: the step counts once and the rows of all
        replicas are summed.
        """
        one_hot = tf.one_hot(slot, self.capacity, dtype=tf.int64)
        events = tf.gather(tf.convert_to_tensor(self._events), slot)
        limit = tf.gather(tf.convert_to_tensor(self._limit), slot)
        left = tf.gather(tf.convert_to_tensor(self._epoch_left), slot)
        new_mechanism = left <= 0  # a step outside a shuffled epoch already counted
        if not in_epoch:
            new_mechanism = tf.constant(True)
        allowed = tf.logical_or(tf.logical_not(new_mechanism), events < limit)
        check = tf.debugging.Assert(allowed, [BUDGET_MESSAGE])
        with tf.control_dependencies([check]):
            taken = tf.cast(allowed, tf.int64)
            counted = one_hot * taken
            next_left = tf.where(left < 0, -left - 1, tf.maximum(left - 1, 0))
            if not in_epoch:
                next_left = left
            updates = [
                self._steps.assign_add(counted),
                self._events.assign_add(counted * tf.cast(new_mechanism, tf.int64)),
                self._epoch_left.assign_add(counted * (next_left - left)),
                self._refused.assign_add(1 - taken),
            ]
            if rows is not None:
                updates.append(self._rows.assign_add(counted * _sum_over_replicas(rows)))
        return Charge(updates, allowed)

    @tf.autograph.experimental.do_not_convert
    def record_nonfinite(self, count):
        """Counts examples dropped from a step because their gradient norm was not finite
        (under a strategy, every replica passes its own count; they are summed)."""
        self._nonfinite.assign_add(_sum_over_replicas(count))

    def open_epoch(self, slot, steps):
        """Grants the next `steps` steps of shuffled segment `slot` one mechanism: they are one
        pass over the data (each example in at most one of their batches), as an epoch of
        `fit` on arrays. Host only; `close_epoch` withdraws what is left of the grant."""
        with tf.init_scope():
            _set_entry(self._epoch_left, slot, -int(steps) if int(steps) > 1 else 0)

    def close_epoch(self, slot):
        """Ends a shuffled epoch: the next step of `slot` counts as a mechanism of its own."""
        with tf.init_scope():
            _set_entry(self._epoch_left, slot, 0)

    def reset(self):
        """Forgets everything spent, and the budget.

        The one way to clear a ledger, for a model that has not been trained on the data the
        ledger speaks of (for example a copy re-initialised from scratch). Its `lineage` stays.
        """
        for variable in self.weights:
            if variable is self._lineage:
                continue
            variable.assign(np.zeros(variable.shape, variable.dtype))
        self._limit.assign(np.full(self.capacity, NO_LIMIT, "int64"))
        self._cache.clear()
        self._active = None

    # -- the budget ------------------------------------------------------------------------------

    def set_budget(self, target_epsilon, delta=None, accountant=None):
        """Sets or changes the model's budget (saved with the model): the explicit call.

        Every `target_epsilon` keras_safe is given (the DP optimizer's, `PrivacyBudget`'s) means
        this one budget for the model's whole life, and must agree with it; this call is how a
        budget is raised (or lowered) on purpose. Training never takes a step past it: `fit`
        stops before that step, and `train_on_batch`, `dp_gradients` and custom loops refuse it.

        Args:
            target_epsilon: the total epsilon the model may spend.
            delta: its delta; defaults to the current budget's, else `default_delta` of the
                smallest training set in the ledger. Must be below `1/num_examples`.
            accountant: the accountant that enforces it; defaults to the current budget's, else
                `"rdp"`.

        Raises:
            ArgumentError: on a bad value, or no delta where the ledger cannot derive one.
        """
        target = check_target(target_epsilon)
        current = self.budget()
        if delta is None:
            delta = current[1] if current else self.default_delta()
            if delta is None:
                fail(
                    "delta",
                    None,
                    "given (the ledger has no steps to derive the default delta from)",
                    "pass delta=..., for example "
                    "keras_safe.accounting.default_delta(num_examples).",
                )
        delta = check_delta(delta, self._smallest_set())
        if accountant is None:
            accountant = self.accountant
        accountant = check_accountant(accountant)
        with tf.init_scope():
            self._budget.assign(np.array([target, delta]))
            codes = np.zeros(_NAME_LENGTH, "int64")
            codes[: len(accountant)] = [ord(c) for c in accountant[:_NAME_LENGTH]]
            self._accountant.assign(codes)
        # Every segment is closed until one is used again (`slot`, `activate`), which gives it
        # what the new budget allows: the accountant's search runs only where a step is coming.
        self._active = None
        self.refresh_limits()

    def require_budget(self, target_epsilon, delta=None, accountant=None, source="target_epsilon"):
        """Sets the budget if the model has none; else checks that `target_epsilon` (and
        `delta`, `accountant` when given) are the model's budget.

        A model has one budget: two different ones (the DP optimizer's and `PrivacyBudget`'s, or
        a new one for a model whose file holds one) are refused; `set_budget` changes it.

        Raises:
            ArgumentError: naming `target_epsilon`, `delta` or `accountant` on a conflict.
        """
        current = self.budget()
        if current is None:
            self.set_budget(target_epsilon, delta, accountant)
            return
        target = check_target(target_epsilon)
        theirs = {"target_epsilon": current[0], "delta": current[1], "accountant": self.accountant}
        mine = {"target_epsilon": target, "delta": delta, "accountant": accountant}
        for name, value in mine.items():
            if value is None:
                continue
            same = value == theirs[name] if name == "accountant" else _close(value, theirs[name])
            if not same:
                fail(
                    name,
                    value,
                    f"the model's budget ({name}={theirs[name]!r}, in its privacy ledger: "
                    f"{source} may not set another one; a model has one budget for its whole "
                    "life)",
                    f"give {name}={theirs[name]!r} or leave it out; to change the budget on "
                    "purpose, call keras_safe.privacy.get_ledger(model).set_budget(...) and "
                    "state the new epsilon.",
                )

    def budget(self):
        """`(target_epsilon, delta)`, or None when no budget is set."""
        target, delta = _read(self._budget)
        return (float(target), float(delta)) if target > 0 else None

    @property
    def accountant(self):
        """The accountant of the budget (`"rdp"` when none was set)."""
        codes = _read(self._accountant)
        name = "".join(chr(int(c)) for c in codes if c > 0)
        return name or "rdp"

    def refresh_limits(self):
        """Sets the in-step gate from the budget: the active segment may take every further
        step the budget allows, the others none (host only)."""
        with tf.init_scope():
            limits = np.full(self.capacity, NO_LIMIT, "int64")
            if self.budget() is not None:
                events = _read(self._events)
                limits[:] = events
                used = int(_read(self._used))
                if self._active is not None and self._active < used:
                    more = self._events_within_budget(self._active)
                    limits[self._active] = min(NO_LIMIT, events[self._active] + more)
            self._limit.assign(limits)

    def steps_left(self, slot):
        """Mechanisms segment `slot` may still take (`math.inf` without a budget)."""
        if self.budget() is None:
            return math.inf
        self.activate(slot)
        limit = int(_read(self._limit)[slot])
        return max(0, limit - int(_read(self._events)[slot]))

    def steps_within_budget(self, segment, accountant=None):
        """How many more mechanisms of `segment` `(noise, rate)` keep epsilon within budget
        (`math.inf` without a budget, 0 when not even one)."""
        if self.budget() is None:
            return math.inf
        noise, rate = segment
        return self._search(lambda k: [*self._rows_for_accounting(), (noise, rate, k)], accountant)

    def _events_within_budget(self, slot):
        rows = self._rows_for_accounting(all_slots=True)

        def with_more(k):
            return [(n, q, e + k if i == slot else e) for i, (n, q, e) in enumerate(rows)]

        return self._search(with_more)

    def _search(self, segments_with, accountant=None):
        """The largest k with epsilon(segments_with(k)) within the budget (binary search)."""
        target, delta = self.budget()
        accountant = check_accountant(accountant or self.accountant)

        def within(k):
            return self._epsilon_of(segments_with(k), delta, accountant) <= target

        if not within(1):
            return 0
        low, high = 1, 2
        if accountant != "rdp":
            # PLD (or another accountant) is never above RDP here: start from the RDP answer.
            rdp = self._search(segments_with, "rdp")
            low, high = max(1, rdp), max(2, 2 * rdp)
        while within(high):
            if high >= NO_LIMIT // 4:
                return NO_LIMIT // 4
            low, high = high, 2 * high
        while high - low > 1:  # invariant: within(low) and not within(high)
            middle = (low + high) // 2
            low, high = (middle, high) if within(middle) else (low, middle)
        return low

    # -- reading ---------------------------------------------------------------------------------

    def _columns(self):
        used = int(_read(self._used))
        return used, [
            _read(v)[:used]
            for v in (
                self._noise,
                self._rate,
                self._examples,
                self._seeded,
                self._steps,
                self._rows,
                self._shuffled,
                self._events,
            )
        ]

    def segments(self):
        """The segments with steps, as dicts: `noise_multiplier` and `sampling_rate` (as
        accounted), `num_examples`, `seeded`, `shuffled`, `steps` (noisy steps), `events`
        (Gaussian mechanisms accounted) and `rows` (examples trained on)."""
        _, columns = self._columns()
        return [
            {
                "noise_multiplier": float(noise),
                "sampling_rate": float(rate),
                "num_examples": int(n),
                "seeded": bool(seeded),
                "shuffled": bool(shuffled),
                "steps": int(steps),
                "events": int(events),
                "rows": int(rows),
            }
            for noise, rate, n, seeded, steps, rows, shuffled, events in zip(*columns)
            if steps > 0
        ]

    def _rows_for_accounting(self, all_slots=False):
        _, columns = self._columns()
        noise, rate, events = columns[0], columns[1], columns[7]
        return [
            (float(s), float(q), int(e))
            for s, q, e in zip(noise, rate, events)
            if all_slots or e > 0
        ]

    @property
    def steps(self):
        """Noisy steps taken so far (all segments)."""
        return int(np.sum(_read(self._steps)))

    @property
    def refused_steps(self):
        """Steps the budget refused inside the step (under XLA their release was withheld)."""
        return int(_read(self._refused))

    @property
    def nonfinite_examples(self):
        """Examples dropped so far because their gradient norm was not finite."""
        return int(_read(self._nonfinite))

    @property
    def lineage(self):
        """A random number drawn when this ledger was created and saved with it: ledgers loaded
        from one saved ledger (or from its saves) share it; two ledgers created apart share it
        with probability 2**-62."""
        return int(_read(self._lineage))

    @property
    def seeded(self):
        """Whether any step drew its noise from a user-given (reproducible) seed."""
        return any(s["seeded"] for s in self.segments())

    def _smallest_set(self):
        sizes = [s["num_examples"] for s in self.segments() if s["num_examples"] > 0]
        return min(sizes) if sizes else None

    def default_delta(self):
        """`keras_safe.accounting.default_delta` of the smallest training set in the ledger
        (None when empty)."""
        n = self._smallest_set()
        return default_delta(n) if n else None

    def delta(self):
        """The delta of this model's guarantee: the budget's, else `default_delta()`."""
        budget = self.budget()
        return budget[1] if budget else self.default_delta()

    def epsilon(self, delta=None, accountant=None, extra=()):
        """Epsilon of everything spent (plus `extra` segments `(noise, rate, mechanisms)`).

        Args:
            delta: the delta of the guarantee, below `1/num_examples`; defaults to `delta()`
                (the budget's, else the default rule).
            accountant: a registered accountant name; defaults to the budget's (`"rdp"`).
            extra: planned segments to add (for "what if" questions).

        Returns:
            Epsilon as a float (0.0 when nothing was spent).
        """
        segments = [*self._rows_for_accounting(), *[tuple(e) for e in extra]]
        if not any(n > 0 for _, _, n in segments):
            return self.statistics_epsilon
        if delta is None:
            delta = self.delta()
            if delta is None:
                return math.inf
        delta = check_delta(delta, self._smallest_set())
        return self._epsilon_of(segments, delta, check_accountant(accountant or self.accountant))

    def _epsilon_of(self, segments, delta, accountant):
        segments = [(s, q, e) for s, q, e in segments if e > 0]
        key = (tuple(segments), delta, accountant)
        if key not in self._cache:
            self._cache[key] = epsilon_of(segments, delta, accountant)
        # Pure epsilon-DP releases compose with the (epsilon, delta) of DP-SGD by adding their
        # epsilons (basic composition; Dwork & Roth 2014, Theorem 3.16).
        return self._cache[key] + self.statistics_epsilon

    # -- statistics released from the training data -------------------------------------------

    @tf.autograph.experimental.do_not_convert
    def record_statistics(self, release_id, epsilon):
        """Records a pure `epsilon`-DP release of statistics of the training data (once per
        `release_id`: recording the same release again changes nothing); returns whether it
        was new.

        Raises:
            PrivacyError: when the ledger holds `capacity` releases already.
        """
        release_id, epsilon = int(release_id), float(epsilon)
        used = int(_read(self._releases_used))
        if release_id in _read(self._release_ids)[:used].tolist():
            return False
        if used >= self.capacity:
            raise PrivacyError(
                f"The privacy ledger holds {self.capacity} releases of statistics and is full. "
                "Fix: adapt fewer preprocessing layers with dp_epsilon, or build the ledger "
                "with a larger capacity."
            )
        with tf.init_scope():
            _set_entry(self._release_ids, used, release_id)
            _set_entry(self._release_epsilon, used, epsilon)
            self._releases_used.assign(used + 1)
        self._cache.clear()
        return True

    @property
    def statistics_epsilon(self):
        """The epsilon of the statistics releases recorded (`record_statistics`), summed."""
        used = int(_read(self._releases_used))
        return float(np.sum(_read(self._release_epsilon)[:used]))

    def statement(self, delta=None, accountant=None):
        """`keras_safe.accounting.privacy_statement(ledger=self)`: what the model spent, in
        words."""
        return privacy_statement(ledger=self, delta=delta, accountant=accountant)

    # -- saving ----------------------------------------------------------------------------------

    def load_own_variables(self, store):
        """Loads the ledger, also from files saved before the budget's accountant and shuffled
        batches were recorded (nine variables: every step then counted as a mechanism)."""
        variables = self.weights
        if len(store.keys()) == _LEGACY_VARIABLES:
            for i, variable in enumerate(variables[:_LEGACY_VARIABLES]):
                variable.assign(store[f"{i}"])
            self._events.assign(_read(self._steps))
        elif len(store.keys()) == _BEFORE_UNITS:  # saved before units: every step an example's
            for i, variable in enumerate(variables[:_BEFORE_UNITS]):
                variable.assign(store[f"{i}"])
            self._unit.assign(1 if int(np.sum(_read(self._steps))) else 0)
            self._user_examples.assign(0)
        elif len(store.keys()) == _BEFORE_LINEAGE:  # its lineage stays the one drawn here
            for i, variable in enumerate(variables[:_BEFORE_LINEAGE]):
                variable.assign(store[f"{i}"])
        else:
            super().load_own_variables(store)
        self._cache.clear()
        self._active = None  # the saved gate holds until a segment is used (`activate`)

    def get_config(self):
        return {"capacity": self.capacity, "name": self.name}


def _read(variable):
    """A variable's value as a NumPy array, also while a step is being traced (host side)."""
    with tf.init_scope():
        return np.array(variable.numpy())


def _set_entry(variable, index, value):
    array = _read(variable).copy()
    array[index] = value
    variable.assign(array)


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
        # Created eagerly even while a step is being traced: its variables outlive the trace.
        with tf.init_scope(), strategy.scope():
            ledger = PrivacyLedger()
        set_ledger(model, ledger)
    return ledger


def set_ledger(model, ledger):
    """Makes `ledger` the privacy ledger `model` charges and saves (the one place it is set)."""
    # Set past Keras's attribute tracking: the ledger is not a layer of the model and its
    # variables are not model weights, but saving still finds it by the attribute.
    # keras-internal: untracked-attribute, saved-attribute
    object.__setattr__(model, LEDGER_ATTRIBUTE, ledger)
