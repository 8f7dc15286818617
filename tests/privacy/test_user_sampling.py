"""User-level Poisson sampling (`users=`): the batch layout a user-level train step reads, and
the law the user-level accountant assumes.

Layout: one slot of `examples_per_user` (k) consecutive rows per sampled user, their rows first
and weight-0 padding after, user id -1 exactly on the padding rows. Law: every user included
independently with probability q = batch_size / U at every step, whatever their number of rows;
from a sampled user a uniformly random subset of min(k, rows) of their rows, without
replacement. Every statistical check is at the 1e-7 level and sized to catch a q 5% off.

The expectations are derived here from the input arrays (row i carries the value i, so every
row of a batch names its source row), never from the sampler's own output.
"""

import itertools
import math
import types

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from keras_safe._validation import ArgumentError
from keras_safe.privacy import sampling
from keras_safe.privacy.sampling import epoch_batches, poisson_batches, poisson_info
from tests.statistical import ALPHA

K = 4
# 1,000 users with arbitrary, non-contiguous ids: 500 with one row, 500 with 50 rows.
SMALL, LARGE, LARGE_ROWS = 500, 500, 50
USERS_PER_STEP = 100
STEPS = 900


def _users(seed=0):
    """One user id per row, rows of a user scattered through the data."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(np.arange(10**6, 10**7), SMALL + LARGE, replace=False)
    users = np.concatenate([ids[:SMALL], np.repeat(ids[SMALL:], LARGE_ROWS)])
    return rng.permutation(users)


USERS = _users()
N = USERS.size
X = np.arange(N, dtype="float32")[:, None]  # row i carries i
Q = USERS_PER_STEP / (SMALL + LARGE)


def _slots(batch, k=K):
    """`(rows, weights, ids)` of a batch, reshaped to one row of `k` per slot."""
    x, _, weights, ids = (None if t is None else np.asarray(t) for t in batch)
    return x[:, 0].astype(int).reshape(-1, k), weights.reshape(-1, k), ids.reshape(-1, k)


def _check_layout(batch, users, k, rows_of=None):
    """Asserts the slot layout of one batch against the input `users` (`rows_of`: each user's
    number of rows); returns its slots' `(user id, source rows)` for the real slots."""
    if rows_of is None:
        rows_of = dict(zip(*np.unique(users, return_counts=True)))
    rows, weights, ids = _slots(batch, k)
    real = weights > 0
    # The padding rows are exactly the weight-0 rows, and come after a slot's real rows.
    np.testing.assert_array_equal(ids == -1, ~real)
    taken = real.sum(axis=1)
    np.testing.assert_array_equal(real, np.arange(k)[None, :] < taken[:, None])
    drawn = []
    for slot_rows, slot_ids, count in zip(rows, ids, taken):
        if count == 0:
            continue
        user = slot_ids[0]
        assert np.all(slot_ids[:count] == user)
        source = slot_rows[:count]
        # The rows are this user's rows of the input, distinct, as many as min(k, their rows).
        assert np.all(users[source] == user)
        assert len(set(source.tolist())) == count
        assert count == min(k, rows_of[user])
        drawn.append((int(user), source))
    sampled = [user for user, _ in drawn]
    assert len(set(sampled)) == len(sampled), "a user fills two slots of one batch"
    return drawn


def test_every_slot_holds_rows_of_one_user_then_padding():
    users = np.array([7, 3, 7, 9, 3, 7, 7, 7, 42, 3, 9, 7])
    x = np.arange(users.size, dtype="float32")[:, None]
    y = np.arange(users.size) * 10
    data = poisson_batches(x, y, batch_size=2, epochs=20, seed=5, users=users, examples_per_user=3)
    info = poisson_info(data)
    assert (info.num_examples, info.num_rows, info.examples_per_user) == (4, 12, 3)
    assert (info.batch_size, info.steps_per_epoch, info.steps) == (2, 2, 40)
    seen = set()
    for batch in data.as_numpy_iterator():
        assert len(batch) == 4
        xb, yb, wb, ids = batch
        assert ids.dtype == np.int64
        # Padded to max_batch_size slots of k rows; y follows x.
        assert xb.shape == (info.max_batch_size * 3, 1) and wb.shape == ids.shape == yb.shape
        np.testing.assert_array_equal(yb, xb[:, 0] * 10)
        for user, _ in _check_layout(batch, users, 3):
            seen.add(user)
    assert seen == {3, 7, 9, 42}


def test_pad_to_multiple_of_counts_slots_and_one_leaves_no_empty_slot():
    users = np.arange(40) // 2
    x = np.arange(40, dtype="float32")[:, None]
    for multiple in (1, 3):
        data = poisson_batches(
            x, None, batch_size=5, epochs=10, seed=1, users=users, examples_per_user=2,
            pad_to_multiple_of=multiple,
        )  # fmt: skip
        for batch in data.as_numpy_iterator():
            assert batch[1] is None
            drawn = _check_layout(batch, users, 2)
            slots = batch[0].shape[0] // 2
            assert batch[0].shape[0] == slots * 2
            if multiple == 1:
                assert slots == len(drawn)
            else:
                assert slots % 3 == 0 and slots - len(drawn) < 3 and slots >= 3


def test_user_weights_and_per_token_weights_are_masked_on_padding():
    users = np.array([1, 1, 1, 2, 5, 5])
    x = np.arange(6, dtype="float32")[:, None]
    tokens = np.arange(12, dtype="float32").reshape(6, 2) + 1
    data = poisson_batches(
        x, None, tokens, batch_size=2, epochs=5, seed=3, users=users, examples_per_user=2
    )
    for xb, _, wb, ids in data.as_numpy_iterator():
        assert wb.shape == (xb.shape[0], 2)
        real = ids >= 0
        np.testing.assert_array_equal(wb[real], tokens[xb[real, 0].astype(int)])
        assert np.all(wb[~real] == 0)


@pytest.fixture(scope="module")
def draws():
    """Per step: the sampled users and their drawn rows, over STEPS fresh steps."""
    data = epoch_batches(
        X, None, batch_size=USERS_PER_STEP, steps_per_epoch=STEPS, users=USERS,
        examples_per_user=K, pad_to_multiple_of=1,
    )  # fmt: skip
    rows_of = dict(zip(*np.unique(USERS, return_counts=True)))
    return [_check_layout(batch, USERS, K, rows_of) for batch in data.as_numpy_iterator()]


def _assert_binomial(count, trials, q):
    """Asserts `count` ~ Binomial(trials, q) at level ALPHA, with an interval narrow enough that
    a rate 5% off falls outside it with probability above 1 - ALPHA."""
    low, high = stats.binom.ppf(ALPHA / 2, trials, q), stats.binom.isf(ALPHA / 2, trials, q)
    assert stats.binom.isf(ALPHA / 2, trials, 0.95 * q) < low, "too few steps for the check"
    assert high < stats.binom.ppf(ALPHA / 2, trials, 1.05 * q), "too few steps for the check"
    assert low <= count <= high, f"{count} inclusions, expected {trials * q:g} in [{low}, {high}]"


def test_every_user_is_included_with_probability_q_whatever_their_rows(draws):
    assert len(draws) == STEPS
    rows = dict(zip(*np.unique(USERS, return_counts=True)))
    included = {1: 0, LARGE_ROWS: 0}
    per_user = dict.fromkeys(rows, 0)
    for step in draws:
        for user, _ in step:
            included[rows[user]] += 1
            per_user[user] += 1
    # The users of one row and the users of 50 rows: each group at rate q.
    _assert_binomial(included[1], SMALL * STEPS, Q)
    _assert_binomial(included[LARGE_ROWS], LARGE * STEPS, Q)
    # Every user's own count: Binomial(STEPS, q) (Bonferroni over the users).
    level = ALPHA / len(per_user)
    counts = np.array(list(per_user.values()))
    assert stats.binom.ppf(level / 2, STEPS, Q) <= counts.min()
    assert counts.max() <= stats.binom.isf(level / 2, STEPS, Q)


def test_users_per_step_vary_as_a_binomial(draws):
    sizes = np.array([len(step) for step in draws], "float64")
    users = SMALL + LARGE
    statistic = (sizes.size - 1) * sizes.var(ddof=1) / (users * Q * (1 - Q))
    dof = sizes.size - 1
    assert stats.chi2.ppf(ALPHA / 2, dof) < statistic < stats.chi2.isf(ALPHA / 2, dof)


def test_the_rows_of_a_sampled_user_are_a_uniform_subset(draws):
    # Each row's place among its user's rows (in input order), for the users of 50 rows.
    place = np.empty(N, int)
    for user in np.unique(USERS):
        mine = np.flatnonzero(USERS == user)
        place[mine] = np.arange(mine.size)
    singles = np.zeros(LARGE_ROWS)
    pairs = np.zeros((LARGE_ROWS, LARGE_ROWS))
    for step in draws:
        for _, source in step:
            if source.size < K:
                continue
            where = np.sort(place[source])
            singles[where] += 1
            for i, j in itertools.combinations(where, 2):
                pairs[i, j] += 1
    # Each row, and each pair of rows, is as likely as any other (a uniform k-subset); a
    # window of consecutive rows or a subset drawn with replacement fails the pairs.
    assert stats.chisquare(singles).pvalue > ALPHA
    upper = pairs[np.triu_indices(LARGE_ROWS, 1)]
    assert upper.sum() == singles.sum() * (K - 1) / 2
    assert stats.chisquare(upper).pvalue > ALPHA


def test_epoch_batches_draw_fresh_users_and_rows_at_every_pass():
    users = np.arange(200) // 4
    x = np.arange(200, dtype="float32")[:, None]
    data = epoch_batches(x, None, batch_size=10, users=users, examples_per_user=2)
    info = poisson_info(data)
    assert info.fresh_each_iteration and not info.seeded and info.steps == 5
    first = [b[0][:, 0] for b in data.as_numpy_iterator()]
    again = [b[0][:, 0] for b in data.as_numpy_iterator()]
    assert len(first) == len(again) == 5
    assert not all(np.array_equal(a, b) for a, b in zip(first, again))


def test_a_seed_reproduces_the_batches_and_another_seed_changes_them():
    users = np.arange(200) // 4

    def batches(seed):
        data = poisson_batches(
            np.arange(200, dtype="float32")[:, None], None, batch_size=10, epochs=2, seed=seed,
            users=users, examples_per_user=3,
        )  # fmt: skip
        assert poisson_info(data).seeded
        return [np.concatenate([b[0][:, 0], b[3]]) for b in data.as_numpy_iterator()]

    same, twin, other = batches(11), batches(11), batches(12)
    assert len(same) == 10
    assert all(np.array_equal(a, b) for a, b in zip(same, twin))
    assert not all(np.array_equal(a, b) for a, b in zip(same, other))


@pytest.mark.parametrize(
    "kwargs, name, words",
    [
        ({"users": np.arange(10)}, "examples_per_user", "examples_per_user=16"),
        ({"users": np.arange(10), "examples_per_user": 0}, "examples_per_user", ">= 1"),
        ({"users": np.arange(10), "examples_per_user": 2.5}, "examples_per_user", "integer"),
        ({"examples_per_user": 2}, "examples_per_user", "users="),
        ({"users": np.arange(9), "examples_per_user": 2}, "users", "of shape (10,)"),
        ({"users": np.arange(10) / 2, "examples_per_user": 2}, "users", "integer user ids"),
        ({"users": np.arange(10) - 1, "examples_per_user": 2}, "users", "non-negative"),
        ({"users": np.arange(10) // 5, "examples_per_user": 2}, "batch_size", "users"),
        (
            {"users": np.arange(10), "examples_per_user": 2, "max_batch_size": 3},
            "max_batch_size",
            "users",
        ),
        (
            {
                "users": np.arange(10),
                "examples_per_user": 2,
                "strategy": types.SimpleNamespace(num_replicas_in_sync=2),
            },
            "strategy",
            "one replica",
        ),
    ],
)
def test_wrong_user_arguments_are_refused_naming_them(kwargs, name, words):
    x = np.zeros((10, 1), "float32")
    with pytest.raises(ArgumentError) as error:
        poisson_batches(x, None, batch_size=3, seed=0, **kwargs)
    assert str(error.value).startswith(f"`{name}`") and words in str(error.value)


def test_without_users_the_batches_stay_example_level():
    x = np.arange(100, dtype="float32")[:, None]
    data = poisson_batches(x, np.zeros(100), batch_size=10, epochs=1, seed=0)
    info = poisson_info(data)
    assert info.examples_per_user is None and info.num_rows == info.num_examples == 100
    assert info.steps == math.ceil(100 / 10)
    for batch in data.as_numpy_iterator():
        assert len(batch) == 3 and batch[0].shape == (info.max_batch_size, 1)
        assert batch[2].shape == (info.max_batch_size,)
    unpadded = epoch_batches(x, np.zeros(100), batch_size=10, pad_to_multiple_of=1)
    assert all(len(batch) == 2 for batch in unpadded.as_numpy_iterator())


@pytest.mark.parametrize("multiple", [None, 3])
def test_a_batch_of_more_users_than_max_batch_size_stops_instead_of_dropping_users(
    multiple, monkeypatch
):
    # Accept any max_batch_size at build time, so that a sample of ~50 users meets 10 slots.
    monkeypatch.setattr(sampling, "MAX_OVERFLOW_PROBABILITY", 1.0)
    data = poisson_batches(
        np.zeros((100, 1), "float32"), None, batch_size=50, seed=0, users=np.arange(100),
        examples_per_user=1, max_batch_size=10, pad_to_multiple_of=multiple,
    )  # fmt: skip
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_batch_size=10 users"):
        next(iter(data))
