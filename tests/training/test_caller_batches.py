"""Batches keras_safe did not draw: what they are charged, and what they may hold.

`fit` on arrays and `poisson_batches` draw Poisson samples keras_safe can vouch for. A batch
given by the caller (`train_on_batch`, `dp_gradients`, a custom loop) could be anything, so it
is a Gaussian mechanism of its own (no amplification by sampling) unless the DP optimizer
declares `sampling="poisson"`; a fit's shuffled epoch cut short grants no later step; batches
drawn from a user's seed are marked; rows of any nonzero weight count as examples; and where
the number of rows is private (Poisson batches without padding) the forward pass may not
compute with it. Epsilon is compared with dp-accounting called directly.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import dp_gradients, get_ledger, make_private, poisson_batches
from tests.dp_reference import dp_sgd_epsilon
from tests.dp_reference import epsilon as reference_epsilon

RNG = np.random.default_rng(27)
N, B, NOISE, DELTA = 200, 10, 1.1, 1e-3
X = RNG.normal(size=(N, 4)).astype("float32")
Y = (X[:, 0] > 0).astype("int32")
L = keras.layers


def _model(*layers, **dp):
    settings = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE)
    settings.update(dp)
    model = keras.Sequential([keras.Input((4,)), *layers, L.Dense(2)])
    model.compile(
        optimizer=DPSGD(**settings),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return make_private(model)


def _custom_steps(model, steps):
    for i in range(steps):
        rows = slice(i * B, (i + 1) * B)
        if i % 2:
            model.train_on_batch(X[rows], Y[rows])
        else:
            grads = dp_gradients(model, X[rows], Y[rows])
            model.optimizer.apply(grads, model.trainable_variables)


def test_caller_batches_are_charged_without_amplification_unless_declared_poisson():
    model = _model(num_examples=N, batch_size=B)
    _custom_steps(model, 4)
    ledger = get_ledger(model)
    assert ledger.steps == 4
    assert ledger.epsilon(DELTA) == pytest.approx(reference_epsilon(NOISE, 1.0, 4, DELTA))
    # Declared Poisson samples: the caller's statement, accounted at rate B / N.
    declared = _model(num_examples=N, batch_size=B, sampling="poisson")
    _custom_steps(declared, 4)
    expected = reference_epsilon(NOISE, B / N, 4, DELTA)
    assert get_ledger(declared).epsilon(DELTA) == pytest.approx(expected)
    assert expected < 0.5 * ledger.epsilon(DELTA)


def test_a_step_after_a_poisson_fit_is_charged_as_a_caller_batch():
    model = _model()
    model.fit(X, Y, batch_size=B, epochs=1, verbose=0)
    ledger = get_ledger(model)
    fitted = ledger.steps
    model.train_on_batch(X[:B], Y[:B])  # the fit's compiled step is not reused for it
    assert ledger.steps == fitted + 1
    reference = dp_sgd_epsilon([(NOISE, B / N, fitted), (NOISE, 1.0, 1)], DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(reference)
    # ... and the next fit traces its own step again, charged at the fit's rate.
    model.fit(X, Y, batch_size=B, epochs=1, verbose=0)
    assert ledger.steps > fitted + 1


class StopAt(keras.callbacks.Callback):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.batch:
            raise KeyboardInterrupt


def _assert_the_grant_ends_with_the_fit(model):
    """After a shuffled fit cut short at its second step, three dp_gradients steps: one
    mechanism for the epoch begun, one for each caller step."""
    ledger = get_ledger(model)
    assert ledger.steps == 2
    for i in range(3):
        grads = dp_gradients(model, X[i * B : (i + 1) * B], Y[i * B : (i + 1) * B])
        model.optimizer.apply(grads, model.trainable_variables)
    assert ledger.steps == 5
    assert ledger.epsilon(DELTA) == pytest.approx(reference_epsilon(NOISE, 1.0, 4, DELTA))


def test_a_shuffled_epoch_cut_short_grants_no_later_step():
    # A shuffled epoch of fit is one mechanism for all of its steps (each example in one of
    # them); interrupted after 2 of its 20 steps, the grant must not cover 3 custom steps.
    model = _model(sampling="shuffle")
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, batch_size=B, epochs=1, verbose=0, callbacks=[StopAt(1)])
    _assert_the_grant_ends_with_the_fit(model)


def test_batches_drawn_from_a_users_seed_are_marked_in_the_ledger_and_statement():
    seeded = _model()
    seeded.fit(poisson_batches(X, Y, batch_size=B, epochs=1, seed=3), verbose=0)
    assert get_ledger(seeded).seeded
    assert "seed given by the user" in get_ledger(seeded).statement(DELTA)
    secret = _model()
    secret.fit(poisson_batches(X, Y, batch_size=B, epochs=1), verbose=0)
    assert not get_ledger(secret).seeded


def test_rows_of_negative_weight_count_as_examples():
    model = _model(num_examples=N, batch_size=B)
    weights = np.where(np.arange(2 * B) % 2 == 0, 1.0, -1.0).astype("float32")
    before = [np.array(v) for v in model.trainable_weights]
    # 2B rows enter the clipped sum (a negative weight flips a gradient, it does not drop it).
    with pytest.raises(PrivacyError, match="more examples than the accounting allows"):
        model.train_on_batch(X[: 2 * B], Y[: 2 * B], sample_weight=weights)
    for b, v in zip(before, model.trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))
    assert get_ledger(model).steps == 0
    # Weights of 0 (padding) do not count: B real rows in 2B are a batch of B.
    zeros = np.where(np.arange(2 * B) < B, 1.0, 0.0).astype("float32")
    model.train_on_batch(X[: 2 * B], Y[: 2 * B], sample_weight=zeros)
    assert get_ledger(model).steps == 1


class BatchSizeShift(L.Layer):
    """Moves every example by the number of rows: one example's presence moves the others."""

    def call(self, x, training=False):
        b = tf.cast(tf.shape(x)[0], x.dtype)
        return x + 3.0 * b * tf.constant([1.0, -1.0, 0.5, 0.0]) if training else x


def test_the_number_of_rows_of_a_poisson_batch_is_private():
    # The attack is real: adding one row moves the output of every other row.
    layer = BatchSizeShift()
    a = np.array(layer(tf.constant(X[:B]), training=True))
    b = np.array(layer(tf.constant(X[: B + 1]), training=True))
    assert np.abs(a - b[:B]).max() > 1.0
    model = _model(BatchSizeShift())
    with pytest.raises(PrivacyError, match="number of examples in the batch"):
        model.fit(X, Y, batch_size=B, epochs=1, verbose=0)  # unpadded Poisson batches
    assert get_ledger(model).steps == 0
    declared = _model(BatchSizeShift(), num_examples=N, batch_size=B, sampling="poisson")
    with pytest.raises(PrivacyError, match="number of examples in the batch"):
        dp_gradients(declared, X[:B], Y[:B])
    # Padded to one size, the number of rows is public: the same layer trains.
    padded = _model(BatchSizeShift())
    padded.fit(poisson_batches(X, Y, batch_size=B, epochs=1), verbose=0)
    assert get_ledger(padded).steps > 0


def test_sparse_inputs_are_refused_with_the_fix_at_every_entry_point():
    # Row-wise proofs, counts and clipping follow dense rows: a sparse batch centred inside the
    # model would otherwise hide its mixing behind the SparseTensor's components.
    inputs = keras.Input((4,), sparse=True)
    model = keras.Model(inputs, L.Dense(2)(L.Dense(3)(inputs)))
    model.compile(
        optimizer=DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE, num_examples=N,
            batch_size=B,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )  # fmt: skip
    model = make_private(model)
    x = tf.sparse.from_dense(tf.constant(X[:B]))
    for call in (
        lambda: dp_gradients(model, x, Y[:B]),
        lambda: model.train_on_batch(x, Y[:B]),
        lambda: keras_safe.training.verify_model(model, x, Y[:B]),
    ):
        with pytest.raises(PrivacyError, match="sparse or ragged.*Fix: make the inputs dense"):
            call()
    assert get_ledger(model) is None or get_ledger(model).steps == 0


def test_a_noise_multiplier_changed_between_fits_is_used_and_charged():
    # Zero data and a zero-initialised layer: each step's update is the noise / batch alone.
    n, batch, width = 400, 20, 1024
    x, y = np.zeros((n, width), "float32"), np.zeros((n, 1), "float32")
    model = keras.Sequential([keras.Input((width,)), L.Dense(1, kernel_initializer="zeros")])
    model.compile(
        optimizer=DPSGD(learning_rate=1.0, l2_norm_clip=1.0, noise_multiplier=2.0), loss="mse"
    )
    model = make_private(model)

    def one_step_noise():
        before = model.get_weights()[0].copy()
        model.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=1, verbose=0)
        return float(np.std(model.get_weights()[0] - before)) * batch

    assert one_step_noise() == pytest.approx(2.0, rel=0.15)
    model.optimizer.noise_multiplier = 0.5
    assert one_step_noise() == pytest.approx(0.5, rel=0.15)  # the step was traced again
    noises = [s["noise_multiplier"] for s in get_ledger(model).segments()]
    assert noises == [2.0, 0.5]


class OneExampleEachBatch(keras.callbacks.Callback):
    """Trains on the same example between the fit's batches: train_on_batch, then
    dp_gradients (a caller's steps, whatever the fit samples)."""

    def __init__(self, steps=3):
        super().__init__()
        self.steps, self.taken = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        if self.taken >= 2 * self.steps:
            return
        self.taken += 1
        if self.taken <= self.steps:
            self.model.train_on_batch(X[:1], Y[:1])
        else:
            grads = dp_gradients(self.model, X[:1], Y[:1])
            self.model.optimizer.apply(grads, self.model.trainable_variables)


def test_steps_a_callback_takes_inside_a_poisson_fit_are_caller_batches():
    model = _model()
    model.fit(X, Y, batch_size=B, epochs=1, verbose=0, callbacks=[OneExampleEachBatch()])
    ledger = get_ledger(model)
    fit_steps = N // B
    assert ledger.steps == fit_steps + 6
    expected = dp_sgd_epsilon([(NOISE, B / N, fit_steps), (NOISE, 1.0, 6)], DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(expected)


def test_a_privacy_budget_fit_cut_short_leaves_no_fit_accounting_behind():
    # PrivacyBudget makes the model private inside fit; an error ends the fit without
    # on_train_end. The caller's steps after it must still be caller batches.
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    model.compile(
        optimizer=DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    budget = keras_safe.callbacks.PrivacyBudget(delta=DELTA, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(
            poisson_batches(X, Y, batch_size=B, epochs=1), callbacks=[budget, StopAt(1)],
            verbose=0,
        )  # fmt: skip
    ledger = get_ledger(model)
    assert ledger.steps == 2
    for _ in range(3):
        model.train_on_batch(X[:1], Y[:1])
    expected = dp_sgd_epsilon([(NOISE, B / N, 2), (NOISE, 1.0, 3)], DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(expected)


def test_a_model_saved_and_loaded_in_the_same_process_trains_on_its_own_ledger(tmp_path):
    original = _model()
    original.fit(X, Y, batch_size=B, epochs=1, verbose=0)
    original.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    steps = get_ledger(loaded).steps
    assert steps == get_ledger(original).steps > 0
    loaded.fit(X, Y, batch_size=B, epochs=1, verbose=0)  # its ledger holds the history
    assert get_ledger(loaded).steps > steps
    assert get_ledger(original).steps == steps


def _n_rows(name, x):
    n_float = tf.float32
    ones = tf.ones_like(x[:, 0])
    return {
        "reduce_sum(ones_like)": lambda: tf.reduce_sum(ones),
        "ones(shape)": lambda: tf.reduce_sum(tf.ones(tf.shape(x))) / 4.0,
        "range max": lambda: tf.cast(tf.reduce_max(tf.range(tf.shape(x)[0])) + 1, n_float),
        "cumsum": lambda: tf.reduce_max(tf.cumsum(ones)),
        "cond on n": lambda: tf.cond(
            tf.shape(x)[0] % 2 == 0, lambda: tf.constant(0.0), lambda: tf.constant(1.0)
        ),
        "while to n": lambda: tf.while_loop(
            lambda i, k: k < tf.shape(x)[0], lambda i, k: (i + 1.0, k + 1), (0.0, 0)
        )[0],
        "where count": lambda: tf.cast(tf.shape(tf.where(ones > 0))[0], n_float),
        "matmul of ones": lambda: tf.matmul(ones[None, :], ones[:, None])[0, 0],
        "random mask count": lambda: tf.reduce_sum(
            tf.cast(tf.random.uniform(tf.shape(ones)) >= 0.0, n_float)
        ),
    }[name]()


class RowCount(L.Layer):
    def __init__(self, how, **kwargs):
        super().__init__(**kwargs)
        self.how = how

    def call(self, x, training=False):
        if not training:  # unseen by a check that runs the model in inference mode
            return x
        return x * tf.cos(math.pi * _n_rows(self.how, x))  # flips with the number of rows


@pytest.mark.parametrize(
    "how",
    ["reduce_sum(ones_like)", "ones(shape)", "range max", "cumsum", "cond on n", "while to n",
     "where count", "matmul of ones", "random mask count"],
)  # fmt: skip
def test_the_number_of_rows_laundered_into_values_is_refused(how):
    layer = RowCount(how)
    odd = np.array(layer(tf.constant(X[: B + 1]), training=True))
    even = np.array(layer(tf.constant(X[:B]), training=True))
    assert np.abs(odd[:B] + even).max() < 1e-5 and np.abs(even).max() > 0.1  # the sign flips
    model = _model(RowCount(how), num_examples=N, batch_size=B, sampling="poisson")
    with pytest.raises(PrivacyError, match="examples of a batch stay apart"):
        dp_gradients(model, X[:B], Y[:B])
    assert get_ledger(model).steps == 0


def test_ordinary_layers_train_on_unpadded_poisson_batches():
    images = RNG.uniform(size=(N, 6, 6, 2)).astype("float32")
    tokens = RNG.integers(0, 12, size=(N, 5))
    for inputs, layers, data in (
        (keras.Input((6, 6, 2)), [L.Conv2DTranspose(3, 3), L.Flatten()], images),
        (keras.Input((6, 6, 2)), [L.RandomRotation(0.1), L.RandomZoom(0.1), L.Flatten()], images),
        (keras.Input((5,)), [L.CategoryEncoding(12, output_mode="count")], tokens),
        (keras.Input((5,)), [L.Embedding(12, 3, mask_zero=True), L.LSTM(4)], tokens),
    ):
        outputs = inputs
        for layer in [*layers, L.Dense(2)]:
            outputs = layer(outputs)
        model = keras.Model(inputs, outputs)
        model.compile(
            optimizer=DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model = make_private(model)
        model.fit(data, Y, batch_size=B, epochs=1, steps_per_epoch=2, verbose=0)
        assert get_ledger(model).steps == 2, [type(layer).__name__ for layer in layers]


def test_the_fit_step_called_by_hand_after_a_fit_is_a_caller_batch():
    model = _model()
    model.fit(X, Y, batch_size=B, epochs=1, verbose=0)
    ledger = get_ledger(model)
    fitted = ledger.steps
    model.make_train_function()
    for _ in range(2):
        model.train_function(iter([(tf.constant(X[:B]), tf.constant(Y[:B]))]))
    assert ledger.steps == fitted + 2
    expected = dp_sgd_epsilon([(NOISE, B / N, fitted), (NOISE, 1.0, 2)], DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(expected)
    model.fit(X, Y, batch_size=B, epochs=1, verbose=0)  # and the next fit is a fit again
    expected = dp_sgd_epsilon([(NOISE, B / N, 2 * fitted), (NOISE, 1.0, 2)], DELTA)
    assert ledger.epsilon(DELTA) == pytest.approx(expected)


def test_a_privacy_budget_fit_on_shuffled_batches_cut_short_grants_no_later_step():
    # The PrivacyBudget path has no `finally` of keras_safe's around it: the shuffled epoch's
    # grant stays open after the error, and the caller's steps must not ride on it.
    model = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    model.compile(
        optimizer=DPSGD(
            learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=NOISE, sampling="shuffle"
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    budget = keras_safe.callbacks.PrivacyBudget(delta=DELTA, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, Y, batch_size=B, epochs=1, verbose=0, callbacks=[budget, StopAt(1)])
    _assert_the_grant_ends_with_the_fit(model)
