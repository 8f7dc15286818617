"""User-level DP-SGD through the public API: `privacy_unit="user"` on the DP optimizer,
`make_private`, `dp_gradients(..., users=ids)`, the compiled train step on batches
`(x, y, sample_weight, user_ids)`, and `fit(x, y, users=ids)`.

A user-level batch is laid out in slots of `examples_per_user` (k) rows, one user's examples per
slot and padding rows of weight 0 (id -1). The guarantee covers one user with all of their
examples only if every slot's weighted rows share one id, no user fills two slots and the batch
holds no more users than the accountant charges; every other batch must be refused with nothing
applied and nothing charged. Epsilon is compared with dp-accounting called directly, with the
users as the unit (Charles et al. 2024, "Fine-Tuning Large Language Models with User-Level
Differential Privacy").
"""

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.callbacks import PrivacyBudget
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import dp_gradients, get_ledger, make_private, poisson_batches
from keras_safe.privacy.sampling import default_max_batch_size
from tests.dp_reference import ORDERS

K, USERS, PER_STEP, NOISE, DELTA = 2, 40, 4, 1.1, 1e-3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers
# Three slots: user 5 (two rows), user 7 (one row and a padding row), user 9 (two rows).
GOOD = (5, 5, 7, -1, 9, 9)
# Refused or not, a step must release nothing but through these messages.
REFUSAL = r"Nothing was (applied|trained)"
# Batches that do not fit the slot layout at all (refused, with TensorFlow's reshape error
# where keras_safe gives no clearer one).
UNCLEAR = (PrivacyError, ValueError, tf.errors.InvalidArgumentError)


def _optimizer(unit="user", **dp):
    settings = dict(
        learning_rate=0.5,
        l2_norm_clip=1.0,
        noise_multiplier=NOISE,
        num_examples=USERS,
        batch_size=PER_STEP,
    )
    if unit == "user":
        settings.update(privacy_unit="user", examples_per_user=K)
    settings.update(dp)
    return DPSGD(**settings)


def _model(unit="user", inputs=(4,), **dp):
    model = keras.Sequential([keras.Input(inputs), L.Dense(2)])
    model.compile(optimizer=_optimizer(unit, **dp), loss=LOSS)
    return make_private(model)


def _batch(owners, weights=None, seed=0):
    """`(x, y, w, ids)` with one row per entry of `owners` (-1: padding); weight 1 on the rows
    of a user and 0 on padding rows unless `weights` are given."""
    ids = np.asarray(owners, "int64")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(ids), 4)).astype("float32")
    y = rng.integers(0, 2, len(ids))
    w = (ids >= 0).astype("float32") if weights is None else np.asarray(weights, "float32")
    return x, y, w, ids


def _slots(count, seed=1):
    """A batch of `count` full slots, one user each."""
    return _batch(np.repeat(np.arange(count), K), seed=seed)


def _weights(model):
    return [np.array(v) for v in model.trainable_variables]


def _compiled_step(model, batch):
    """One step of the model's compiled train function (the step `fit` runs), which applies
    the update; `batch` is `(x, y, w, ids)` (without ids when they are None)."""
    model.make_train_function()
    if batch[-1] is None:
        batch = batch[:-1]
    data = tuple(None if t is None else tf.constant(t) for t in batch)
    model.train_function(iter([data]))


def _assert_refused(model, batch, match=REFUSAL, errors=(PrivacyError,)):
    """`dp_gradients` and the compiled train step both refuse `batch`; the ledger charges
    nothing and the weights do not move."""
    ledger = get_ledger(model)
    steps, before = ledger.steps, _weights(model)
    x, y, w, ids = batch
    with pytest.raises(errors, match=match):  # match None: any message
        dp_gradients(model, x, y, w, users=ids)
    assert ledger.steps == steps
    # In the compiled step an in-step refusal is the failed assertion's error.
    with pytest.raises((*errors, tf.errors.InvalidArgumentError), match=match):
        _compiled_step(model, batch)
    assert ledger.steps == steps
    for a, b in zip(before, _weights(model)):
        np.testing.assert_array_equal(a, b)


def _trained(model, batch):
    """One eager step through `dp_gradients`: verifies the model, charges one step."""
    x, y, w, ids = batch
    grads = dp_gradients(model, x, y, w, users=ids)
    model.optimizer.apply(grads, model.trainable_variables)


def _reference_epsilon(rate, steps):
    accountant = dp_accounting.rdp.RdpAccountant(ORDERS)
    event = dp_accounting.GaussianDpEvent(NOISE)
    if rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(DELTA)


# -- accounting --------------------------------------------------------------------------------


def test_user_level_steps_are_accounted_over_users():
    declared = _model(sampling="poisson")
    caller = _model()  # batches the caller gave: each step a Gaussian mechanism of its own
    for model in (declared, caller):
        for step in range(3):
            _trained(model, _batch(GOOD, seed=step))
    ledger = get_ledger(declared)
    assert ledger.steps == 3
    assert ledger.privacy_unit == "user"
    assert [s["num_examples"] for s in ledger.segments()] == [USERS]
    assert ledger.epsilon(DELTA) == pytest.approx(_reference_epsilon(PER_STEP / USERS, 3))
    assert get_ledger(caller).epsilon(DELTA) == pytest.approx(_reference_epsilon(1.0, 3))
    statement = " ".join(ledger.statement(delta=DELTA).split())
    assert "one user (all of their examples)" in statement
    assert "add-or-remove-one-user" in statement


def test_noise_free_gradients_are_the_clipped_user_sums_over_the_expected_users():
    model = _model(noise_multiplier=0.0, l2_norm_clip=2.0)
    x, y, w, ids = _batch((5, 5, 7, -1, 9, 9, 3, -1), weights=(1, 2, 1, 0, 0.5, 1, 3, 0))
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        grads = dp_gradients(model, x, y, w, users=ids)
    # Reference: each user alone, the weighted sum of their per-example losses.
    per_example = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    expected = [np.zeros(v.shape) for v in model.trainable_variables]
    norms = []
    for user in (5, 7, 9, 3):
        rows = ids == user
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(per_example(y[rows], model(x[rows])) * w[rows])
        g = [np.asarray(t, "float64") for t in tape.gradient(loss, model.trainable_variables)]
        norms.append(np.sqrt(sum(np.sum(t**2) for t in g)))
        expected = [e + min(1.0, 2.0 / norms[-1]) * t for e, t in zip(expected, g)]
    assert min(norms) < 2.0 < max(norms)  # some users clipped, some not
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(got), want / PER_STEP, rtol=1e-4, atol=1e-7)


# -- refused batches ---------------------------------------------------------------------------

ATTACKS = {
    # Users 5 and 6 share the first slot: clipped together, one of them could move the sum 2C.
    "two_users_in_one_slot": _batch((5, 6, 7, -1, 9, 9)),
    # User 5 fills the first slot and half of the second: two clipped vectors for one user.
    "one_user_in_two_slots": _batch((5, 5, 5, -1, 9, 9)),
    # A weighted row without a user (-1) beside user 5.
    "weighted_row_without_a_user": _batch((5, -1, 7, -1, 9, 9), weights=(1, 1, 1, 0, 1, 1)),
    # A negative weight is a real row: user 6 is in user 5's slot.
    "negative_weight_counts": _batch((5, 6, 7, -1, 9, 9), weights=(1, -1, 1, 0, 1, 1)),
    # A NaN weight is a real row too.
    "nan_weight_counts": _batch((5, 6, 7, -1, 9, 9), weights=(1, np.nan, 1, 0, 1, 1)),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_batches_that_break_the_slot_layout_are_refused(attack):
    model = _model()
    _trained(model, _batch(GOOD))
    _assert_refused(model, ATTACKS[attack], match="keras_safe refused this step")


def test_a_batch_of_more_users_than_charged_is_refused():
    model = _model()
    _trained(model, _slots(PER_STEP))  # as many users as declared: accepted
    _assert_refused(model, _slots(PER_STEP + 1), match="more users than the accounting allows")
    # An empty slot is no user, but a slot of negative weight is one.
    x, y, w, ids = _slots(PER_STEP + 1)
    w[-K:] = 0.0
    _trained(model, (x, y, w, ids))
    w[-K:] = -1.0
    _assert_refused(model, (x, y, w, ids), match="more users than the accounting allows")
    assert get_ledger(model).steps == 2


def test_declared_poisson_batches_may_hold_up_to_the_poisson_bound_of_users():
    model = _model(sampling="poisson")
    limit = default_max_batch_size(PER_STEP, USERS)  # exceeded with probability below 1e-9
    assert PER_STEP < limit < USERS
    _trained(model, _slots(limit))
    _assert_refused(model, _slots(limit + 1), match="more users than the accounting allows")
    assert get_ledger(model).steps == 1


def test_a_padding_row_may_carry_another_users_id():
    """Only weighted rows count: user 6's id on user 5's padding row is no second user."""
    model = _model()
    batch = _batch((5, 6, 7, 7, 9, -1), weights=(1, 0, 1, 1, 1, 0))
    _trained(model, batch)
    before = _weights(model)
    _compiled_step(model, batch)
    assert get_ledger(model).steps == 2
    assert any(np.any(a != b) for a, b in zip(before, _weights(model)))


def test_a_user_level_step_without_ids_or_weights_is_refused():
    model = _model()
    _trained(model, _batch(GOOD))
    x, y, w, ids = _batch(GOOD)
    _assert_refused(model, (x, y, w, None), match="no user ids")
    _assert_refused(model, (x, y, None, ids), match="no sample weights")


def test_ids_given_to_an_example_level_model_are_refused():
    model = _model(unit="example", batch_size=6)
    x, y, w, ids = _batch(GOOD)
    _trained(model, (x, y, w, None))
    _assert_refused(model, (x, y, w, ids), match="protects one example")


def test_a_ledger_holds_one_unit():
    x, y, w, ids = _batch(GOOD)
    example = _model(unit="example", batch_size=6)
    _trained(example, (x, y, w, None))
    example.compile(optimizer=_optimizer("user"), loss=LOSS)
    make_private(example)
    _assert_refused(example, (x, y, w, ids), match="not mix them")
    assert get_ledger(example).privacy_unit == "example"

    user = _model()
    _trained(user, (x, y, w, ids))
    user.compile(optimizer=_optimizer("example", batch_size=6), loss=LOSS)
    make_private(user)
    _assert_refused(user, (x, y, w, None), match="not mix them")
    assert get_ledger(user).privacy_unit == "user"


# -- what an attacker might try next -----------------------------------------------------------


def test_per_token_weights_mixing_users_on_one_token_are_refused():
    """Weights `[B, T]`: user 6's row in user 5's slot has weight on its last token only."""
    model = keras.Sequential([keras.Input((3, 4)), L.Dense(2)])
    model.compile(optimizer=_optimizer(), loss=LOSS)
    make_private(model)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 4)).astype("float32")
    y = rng.integers(0, 2, (4, 3))
    ids = np.array([5, 6, 7, 7])
    mixed = np.array([[1, 1, 1], [0, 0, 1], [1, 1, 1], [1, 1, 0]], "float32")
    fine = mixed.copy()
    fine[1] = 0.0
    _trained(model, (x, y, fine, ids))
    _assert_refused(model, (x, y, mixed, ids), match="keras_safe refused this step")


@pytest.mark.parametrize("rows", [4, 8], ids=["fewer", "more"])
def test_ids_of_another_length_than_the_batch_are_refused(rows):
    model = _model()
    _trained(model, _batch(GOOD))
    x, y, w, _ = _batch(GOOD)
    ids = np.repeat(np.arange(rows // K), K)
    _assert_refused(model, (x, y, w, ids), match="one id per row of x")


def test_a_batch_of_partial_slots_is_refused():
    model = _model()
    _trained(model, _batch(GOOD))
    x, y, w, ids = _batch((5, 5, 7, -1, 9))
    _assert_refused(model, (x, y, w, ids), match=None, errors=UNCLEAR)


def test_float_ids_are_refused():
    """Ids 5.2 and 5.7 name two users; truncated to 5 they would be clipped together (and a
    float32 id above 2**24 is already rounded onto its neighbour's)."""
    model = _model()
    _trained(model, _batch(GOOD))
    x, y, w, _ = _batch(GOOD)
    ids = np.array([5.2, 5.7, 7, -1, 9, 9], "float32")
    _assert_refused(model, (x, y, w, ids), match="integer")


def test_user_level_settings_are_checked_at_construction():
    with pytest.raises(ArgumentError, match="num_microbatches"):
        _optimizer("user", num_microbatches=2)
    with pytest.raises(ArgumentError, match="examples_per_user"):
        _optimizer("example", examples_per_user=K)
    with pytest.raises(ArgumentError, match="privacy_unit"):
        _optimizer("example", privacy_unit="person")
    with pytest.raises(ArgumentError, match="examples_per_user"):
        _optimizer("user", examples_per_user=0)


# -- saving ------------------------------------------------------------------------------------


def test_a_saved_user_level_model_stays_user_level(tmp_path):
    model = _model()
    _trained(model, _batch(GOOD))
    model.save(tmp_path / "user.keras")
    loaded = keras.saving.load_model(tmp_path / "user.keras")
    ledger = get_ledger(loaded)
    assert ledger.privacy_unit == "user" and ledger.steps == 1
    config = loaded.optimizer.get_config()
    assert config["privacy_unit"] == "user" and config["examples_per_user"] == K
    x, y, w, ids = _batch(GOOD)
    _assert_refused(loaded, (x, y, w, None), match="no user ids")
    _trained(loaded, (x, y, w, ids))
    assert ledger.steps == 2


# -- fit ---------------------------------------------------------------------------------------


def _user_data(seed=0):
    """60 rows of 20 users, 1 to 6 rows each."""
    rng = np.random.default_rng(seed)
    ids = 100 + rng.integers(0, 20, 60)
    x = rng.normal(size=(60, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32"), ids


def test_fit_with_user_ids_trains_at_the_user_level(capsys):
    x, y, ids = _user_data()
    model = _model(num_examples=None, batch_size=None)
    before = _weights(model)
    budget = PrivacyBudget(delta=DELTA)
    model.fit(
        x, y, users=ids, batch_size=PER_STEP, epochs=1, steps_per_epoch=2, verbose=0,
        callbacks=[budget],
    )  # fmt: skip
    assert "unit of privacy: one user (all of their examples)" in capsys.readouterr().out
    ledger = get_ledger(model)
    assert ledger.steps == 2 and ledger.privacy_unit == "user"
    segments = ledger.segments()
    assert [s["num_examples"] for s in segments] == [len(np.unique(ids))]
    assert segments[0]["sampling_rate"] == pytest.approx(PER_STEP / len(np.unique(ids)))
    assert any(np.any(a != b) for a, b in zip(before, _weights(model)))


def test_fit_of_an_example_level_model_with_user_ids_states_group_privacy():
    x, y, ids = _user_data()
    most = int(np.max(np.unique(ids, return_counts=True)[1]))
    model = _model(unit="example", num_examples=None, batch_size=None)
    model.fit(x, y, users=ids, batch_size=6, epochs=1, steps_per_epoch=2, verbose=0)
    ledger = get_ledger(model)
    assert ledger.privacy_unit == "example" and ledger.max_user_examples == most
    statement = " ".join(ledger.statement().split())
    assert "group privacy" in statement
    assert f"up to {most} examples" in statement


def test_fit_on_arrays_of_a_user_level_model_needs_the_ids():
    x, y, _ = _user_data()
    model = _model(num_examples=None, batch_size=None)
    with pytest.raises(ArgumentError, match="users"):
        model.fit(x, y, batch_size=PER_STEP, epochs=1, steps_per_epoch=1, verbose=0)
    assert get_ledger(model).steps == 0


def test_fit_on_user_level_poisson_batches():
    x, y, ids = _user_data()
    model = _model(num_examples=None, batch_size=None)
    data = poisson_batches(x, y, users=ids, examples_per_user=K, batch_size=PER_STEP)
    model.fit(data, epochs=1, verbose=0)
    ledger = get_ledger(model)
    assert ledger.steps == 5 and ledger.privacy_unit == "user"
    assert [s["num_examples"] for s in ledger.segments()] == [len(np.unique(ids))]


# -- what padding rows hold -------------------------------------------------------------------


def _released(model, batch):
    x, y, w, ids = batch
    return np.concatenate([np.ravel(g) for g in dp_gradients(model, x, y, w, users=ids)])


@pytest.mark.parametrize("poison", [np.nan, np.inf, 1e20])
def test_padding_rows_cannot_change_a_slot(poison):
    """A padding row repeats some example's data (the sampler gathers row 0 there): whatever it
    holds, the slot it pads releases the same (without the fix, a non-finite value dropped the
    whole slot, so the owner of row 0 moved other users' slots)."""
    model = _model(noise_multiplier=0.0)
    _trained(model, _batch(GOOD))
    clean = _batch(GOOD)
    x, y, w, ids = _batch(GOOD)
    x[3] = poison  # the padding row of user 7's slot
    np.testing.assert_allclose(_released(model, (x, y, w, ids)), _released(model, clean), 1e-6)
    assert get_ledger(model).nonfinite_examples == 0


def test_padding_rows_cannot_change_a_microbatch():
    """The same at example level: microbatches put padding rows beside real examples."""
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    model.compile(
        optimizer=DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=0.0, num_microbatches=2,
            num_examples=40, batch_size=4,
        ),
        loss=LOSS,
    )  # fmt: skip
    model = make_private(model)
    x, y, w, _ = _batch((1, 2, 3, -1))
    clean = [np.array(g) for g in dp_gradients(model, x, y, w)]
    x[3] = np.nan
    poisoned = [np.array(g) for g in dp_gradients(model, x, y, w)]
    for a, b in zip(clean, poisoned):
        np.testing.assert_allclose(a, b, 1e-6)


def test_a_weighted_row_with_a_negative_id_is_refused():
    """-1 marks padding; a row with weight under it (or any negative id) would be a user no
    other slot is checked against, so one person could fill it and a slot of their own."""
    model = _model()
    _trained(model, _batch(GOOD))
    x, y, w, ids = _batch((5, 5, -1, -1, 9, 9), weights=[1, 1, 1, 1, 1, 1])
    _assert_refused(model, (x, y, w, ids), match="negative user id")
    x, y, w, ids = _batch((5, 5, -3, -3, 9, 9), weights=[1, 1, 1, 1, 1, 1])
    _assert_refused(model, (x, y, w, ids), match="negative user id")


def test_an_unseeded_dataset_draws_new_users_at_every_pass():
    """Each pass of fit over a `poisson_batches` dataset must be a fresh sample, as the ledger
    charges it; a seeded dataset repeats itself (and its steps are marked seeded)."""
    x, y, ids = _user_data()

    def passes(seed):
        data = poisson_batches(x, y, users=ids, examples_per_user=K, batch_size=PER_STEP, seed=seed)
        return [np.concatenate([b[3].numpy() for b in data]) for _ in range(2)]

    first, second = passes(None)
    assert not np.array_equal(first, second)
    first, second = passes(7)
    np.testing.assert_array_equal(first, second)
