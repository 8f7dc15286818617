"""User-level canary audit: canary users with several examples, included or left out whole.

A user-level DP model must stay below its ledger's user-level epsilon (compared with
dp-accounting called directly, with users as the unit), an example-level DP model given user ids
below its group-privacy epsilon (Mironov 2017, Prop. 2, written out here), and a model without
DP that memorises its canary users must get a clearly positive bound. What each training run was
given is recorded from `fit` itself: the canary users' rows, their fresh ids and the base data.
"""

import math

import dp_accounting
import keras
import numpy as np
import pytest

from keras_safe.audit import canary_audit
from tests import dp_reference
from tests.audit.conftest import digits, make_mlp

PER_CANARY = 3
DELTA = 1e-4
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(rows=300, most=4, seed=0):
    """`rows` digits and their owners: users of 1 to `most` rows each, ids 0, 1, 2, ..."""
    x, y = digits()
    sizes = np.random.default_rng(seed).integers(1, most + 1, rows)
    return x[:rows], y[:rows], np.repeat(np.arange(rows), sizes)[:rows]


def _recording(make, runs):
    """A factory whose models record what each `fit` was given: `(model, x, y, users)`."""

    def factory():
        model = make()
        fit = model.fit

        def recorded_fit(x, y, **kwargs):
            runs.append((model, np.asarray(x), np.asarray(y), kwargs.get("users")))
            return fit(x, y, **kwargs)

        model.fit = recorded_fit
        return model

    return factory


def _dp_model(unit, noise=1.2):
    from keras_safe.optimizers import DPSGD
    from keras_safe.privacy import make_private

    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    user = dict(privacy_unit="user", examples_per_user=4) if unit == "user" else {}
    optimizer = DPSGD(
        learning_rate=0.5, l2_norm_clip=1.0, noise_multiplier=noise, delta=DELTA, **user
    )
    model.compile(optimizer=optimizer, loss=LOSS)
    return make_private(model)


def _user_rows(users, first):
    """The rows of each canary user (ids >= `first`), by id."""
    return {int(u): np.flatnonzero(users == u) for u in np.unique(users) if u >= first}


def _check_runs(runs, result, x, y, ids, reference=True):
    """The audited run holds the base data and the included canary users, each under a fresh
    id with PER_CANARY rows; the reference run holds the base data only; the scores of the
    included canary users are their mean loss drops, computed here from the trained models."""
    n, m = len(x), result.num_canaries
    (audited, ax, ay, a_ids), *rest = runs
    assert len(rest) == (1 if reference else 0)
    canaries = _user_rows(a_ids, ids.max() + 1)
    assert len(canaries) == result.included.sum()
    assert all(len(rows) == PER_CANARY for rows in canaries.values())
    base = np.setdiff1d(np.arange(len(ax)), np.concatenate(list(canaries.values())))
    assert len(base) == n - m * PER_CANARY  # mislabel: each canary row's original is removed
    # A base row keeps its owner: the same (x, id) pairs as in the data.
    owner = {x[i].tobytes(): ids[i] for i in range(n)}
    assert all(owner[ax[i].tobytes()] == a_ids[i] for i in base)
    for rows in canaries.values():  # canary rows are data rows with a wrong label
        for i in rows:
            same = (x == ax[i]).all(axis=1)
            assert same.any() and ay[i] not in y[same]
    drops = []
    for rows in canaries.values():
        loss = LOSS.__class__(from_logits=True, reduction=None)
        audited_loss = np.asarray(loss(ay[rows], audited(ax[rows])))
        if reference:
            ref_model, rx, _, r_ids = rest[0]
            assert len(rx) == len(base) and r_ids is not None and r_ids.max() <= ids.max()
            audited_loss = audited_loss - np.asarray(loss(ay[rows], ref_model(ax[rows])))
        drops.append(-audited_loss.mean())
    np.testing.assert_allclose(
        np.sort(drops), np.sort(result.scores[result.included]), rtol=1e-4, atol=1e-5
    )


def test_user_level_dp_model_stays_below_its_user_level_epsilon():
    x, y, ids = _data()
    runs = []
    result = canary_audit(
        _recording(lambda: _dp_model("user"), runs),
        x,
        y,
        num_canaries=40,
        users=ids,
        examples_per_canary=PER_CANARY,
        fit_kwargs={"epochs": 2, "batch_size": 8},
        delta=DELTA,
        seed=0,
    )
    assert result.privacy_unit == "user" and result.num_canaries == 40
    _check_runs(runs, result, x, y, ids)
    # The ledger counts users: the data's users left after the canaries were taken out, and
    # the included canary users; 2 epochs of ceil(U / 8) steps at rate 8 / U.
    users = len(np.unique(runs[0][3]))
    assert users == len(np.unique(runs[1][3])) + result.included.sum()
    expected = dp_reference.epsilon(1.2, 8 / users, 2 * math.ceil(users / 8), DELTA)
    assert result.accountant_epsilon == pytest.approx(expected, rel=1e-6)
    assert result.epsilon_lower_bound <= result.accountant_epsilon, str(result)
    assert result.within_accountant_bound
    assert "40 canary users of 3 example(s)" in str(result)
    assert "accountant user-level epsilon" in str(result)
    figures = result.to_dict()
    assert figures["privacy_unit"] == "user" and figures["examples_per_canary"] == PER_CANARY


def _group_epsilon(noise, rate, steps, k, delta):
    """Mironov 2017, Prop. 2: a group of k <= 2**c examples is (a, 3**c * rdp(2**c * a))-RDP
    at orders a >= 2; then dp-accounting's conversion to (epsilon, delta)."""
    c = math.ceil(math.log2(k))
    orders = [a for a in dp_reference.ORDERS if a >= 2]
    accountant = dp_accounting.rdp.RdpAccountant([2**c * a for a in orders])
    step = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, steps))
    return dp_accounting.rdp.compute_epsilon(orders, [3**c * r for r in accountant.rdp], delta)[0]


def test_example_level_dp_model_is_held_against_its_group_privacy_epsilon():
    x, y, ids = _data(most=2)
    runs = []
    result = canary_audit(
        _recording(lambda: _dp_model("example", noise=2.0), runs),
        x,
        y,
        num_canaries=30,
        users=ids,
        examples_per_canary=PER_CANARY,
        reference=False,
        fit_kwargs={"epochs": 1, "batch_size": 32},
        delta=DELTA,
        seed=1,
    )
    _check_runs(runs, result, x, y, ids, reference=False)
    rows = len(runs[0][1])  # the canary users have the most rows: 3
    group = _group_epsilon(2.0, 32 / rows, math.ceil(rows / 32), PER_CANARY, DELTA)
    one = dp_reference.epsilon(2.0, 32 / rows, math.ceil(rows / 32), DELTA)
    assert result.accountant_epsilon == pytest.approx(group, rel=1e-6)
    assert result.accountant_epsilon > 2 * one
    assert result.epsilon_lower_bound <= result.accountant_epsilon, str(result)


def test_memorising_model_exceeds_a_user_level_claim_of_one():
    """Without DP, random canary users (3 noise inputs each, random labels) trained on for
    many epochs are told apart from the left-out ones: the user-level audit can fail."""
    x, y, ids = _data(rows=300)
    result = canary_audit(
        make_mlp,
        x,
        y,
        num_canaries=80,
        canary_type="random",
        users=ids,
        examples_per_canary=PER_CANARY,
        fit_kwargs={"epochs": 15, "batch_size": 16},
        seed=0,
    )
    assert result.privacy_unit == "user" and result.accountant_epsilon is None
    assert result.epsilon_lower_bound > 1.0, str(result)
    assert result.auc > 0.9
    assert "empirical user-level epsilon >=" in str(result)


def test_errors_name_the_argument():
    x, y, ids = _data(rows=60)
    with pytest.raises(ValueError, match="`users`.*examples_per_canary=3"):
        canary_audit(make_mlp, x, y, num_canaries=4, examples_per_canary=3)
    with pytest.raises(ValueError, match="examples_per_canary"):
        canary_audit(make_mlp, x, y, num_canaries=4, users=ids, examples_per_canary=0)
    with pytest.raises(ValueError, match="`users`.*60 ids"):
        canary_audit(make_mlp, x, y, num_canaries=4, users=ids[:-1])
    with pytest.raises(ValueError, match="`users`.*integer"):
        canary_audit(make_mlp, x, y, num_canaries=4, users=ids.astype("float32"))
    # 60 rows hold at most 19 canary users of 3 mislabelled rows.
    with pytest.raises(ValueError, match="num_canaries.*3 per canary user"):
        canary_audit(make_mlp, x, y, num_canaries=20, users=ids, examples_per_canary=3)
    with pytest.raises(ValueError, match="fit_kwargs"):
        canary_audit(make_mlp, x, y, num_canaries=4, users=ids, fit_kwargs={"users": ids})
    # A user-level DP model needs the ids; refused before any training.
    runs = []
    with pytest.raises(ValueError, match="`users`.*privacy_unit='user'"):
        canary_audit(_recording(lambda: _dp_model("user"), runs), x, y, num_canaries=4)
    assert runs == []
