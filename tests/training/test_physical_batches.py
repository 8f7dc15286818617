"""Large logical batches clipped in physical chunks (`physical_batch_size` on the DP optimizer).

A logical batch (a Poisson sample at rate `batch_size / n`) is clipped in chunks of P rows one
after another and noised once: the release must equal the unchunked release, carry the noise of
one step (not one per chunk), and be accounted as one step at the logical rate, checked against
dp-accounting called directly.
"""

import dp_accounting
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import ArgumentError, PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import dp_gradients, get_ledger, make_private
from tests.dp_reference import ORDERS
from tests.statistical import assert_gaussian_scale
from tests.testing import CarryOver

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(physical, noise=0.0, build=None, **dp):
    keras.utils.set_random_seed(3)
    if build is None:
        model = keras.Sequential(
            [
                keras.Input((6, 4)),
                L.Conv1D(5, 3, activation="tanh"),
                L.LayerNormalization(),
                L.Flatten(),
                L.Dense(3),
            ]
        )
    else:
        model = build()
    settings = dict(learning_rate=0.1, l2_norm_clip=0.3, noise_multiplier=noise)
    settings.update(num_examples=400, batch_size=32, physical_batch_size=physical)
    settings.update(dp)
    model.compile(optimizer=DPSGD(**settings), loss=LOSS)
    return make_private(model)


def _batch(rows=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6, 4)).astype("float32")
    y = rng.integers(0, 3, rows)
    w = (rng.random(rows) < 0.8).astype("float32")
    return x, y, w


@pytest.mark.parametrize("physical", [8, 16])
def test_chunks_release_what_the_whole_batch_releases(physical):
    x, y, w = _batch()
    whole = dp_gradients(_model(None), x, y, w)
    chunked = dp_gradients(_model(physical), x, y, w)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_chunks_keep_users_slots_whole():
    x, y, w = _batch()
    ids = np.repeat(np.arange(16), 2).astype("int64")
    ids[w == 0] = -1
    w[ids == -1] = 0
    user = dict(privacy_unit="user", examples_per_user=2, num_examples=200, batch_size=16)
    whole = dp_gradients(_model(None, **user), x, y, w, users=ids)
    chunked = dp_gradients(_model(8, **user), x, y, w, users=ids)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    with pytest.raises(PrivacyError, match="examples_per_user"):
        dp_gradients(_model(5, **user), x[:30], y[:30], w[:30], users=ids[:30])


def test_the_noise_is_drawn_once_for_the_logical_batch():
    """No example has weight: the release is the noise alone, divided by the batch size. One
    draw of standard deviation sigma C for the whole batch gives sigma C / B per coordinate;
    a draw per chunk at the full noise would give sqrt(4) times that (4 chunks)."""

    def build():
        return keras.Sequential([keras.Input((6, 4)), L.Flatten(), L.Dense(1000)])

    sigma, clip, batch = 2.0, 0.3, 32
    model = _model(8, noise=sigma, build=build, seed=801)
    x, y, _ = _batch()
    grads = dp_gradients(model, x, y % 3, np.zeros(batch, "float32"))
    values = np.concatenate([np.ravel(g) for g in grads])
    expected = sigma * clip / batch
    # 25,000 values: the chi-square interval at the 1e-7 level is within 2.4% of the true
    # scale, so a 5% error in the noise (let alone a draw per chunk) is caught.
    assert values.size == 25_000
    assert_gaussian_scale(values, expected)


def test_a_fit_accounts_each_logical_batch_as_one_step():
    n, batch, epochs, sigma = 400, 32, 2, 1.3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6, 4)).astype("float32")
    y = rng.integers(0, 3, n)
    model = _model(8, noise=sigma, num_examples=None, batch_size=None)
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
    ledger = get_ledger(model)
    steps = epochs * -(-n // batch)
    assert ledger.steps == steps
    (segment,) = ledger.segments()
    assert segment["sampling_rate"] == pytest.approx(batch / n)
    assert segment["noise_multiplier"] == pytest.approx(sigma)
    accountant = dp_accounting.rdp.RdpAccountant(ORDERS)
    event = dp_accounting.PoissonSampledDpEvent(batch / n, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    assert ledger.epsilon(1e-3, "rdp") == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-6)


def test_the_step_graph_does_not_grow_with_the_number_of_chunks():
    # The chunks after the first are traced once, in the body of a loop: a logical batch of
    # 4096 in chunks of 256 holds two copies of the step's passes, not sixteen (unrolled
    # chunks cost more memory than the whole batch did).
    def build():
        return keras.Sequential([keras.Input((6, 4)), L.Flatten(), L.Dense(3)])

    model = _model(8, build=build)
    dp_gradients(model, *_batch(8))  # (eagerly once: the model is verified)
    step = tf.function(lambda x, y, w: dp_gradients(model, x, y, w))
    counts = [
        len(step.get_concrete_function(*_batch(rows)).graph.get_operations()) for rows in (16, 64)
    ]
    assert counts[0] == counts[1]


def test_batches_that_do_not_split_into_chunks_are_refused():
    model = _model(8)
    x, y, w = _batch(rows=30)
    with pytest.raises(PrivacyError, match="physical_batch_size=8"):
        dp_gradients(model, x, y, w)
    assert get_ledger(model).steps == 0
    with pytest.raises(ArgumentError, match="physical_batch_size"):
        DPSGD(learning_rate=0.1, noise_multiplier=1.0, physical_batch_size=8, num_microbatches=4)
    with pytest.raises(ArgumentError, match="physical_batch_size"):
        DPSGD(learning_rate=0.1, noise_multiplier=1.0, physical_batch_size=0)


def test_the_setting_is_saved_with_the_optimizer(tmp_path):
    model = _model(8)
    x, y, w = _batch()
    grads = dp_gradients(model, x, y, w)
    model.optimizer.apply(grads, model.trainable_variables)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.optimizer.physical_batch_size == 8
    assert isinstance(loaded.optimizer.get_config()["physical_batch_size"], int)
    tf.debugging.assert_equal(get_ledger(loaded).steps, 1)


def test_a_layer_mixing_the_examples_of_a_chunk_is_still_refused():
    """Chunks do not hide what mixes examples: the proof runs over every chunk's forward pass."""

    def build():
        return keras.Sequential(
            [
                keras.Input((6, 4)),
                L.Flatten(),
                L.Lambda(lambda t: t - tf.reduce_mean(t, axis=0, keepdims=True)),
                L.Dense(3),
            ]
        )

    model = _model(8, build=build)
    x, y, w = _batch()
    with pytest.raises(PrivacyError, match="apart|interact|mix"):
        dp_gradients(model, x, y, w)
    assert get_ledger(model).steps == 0


def _mixes_beyond_four_rows(t):
    # Row-wise on the few examples verification runs, mixing on the batches a step trains on.
    return tf.cond(
        tf.shape(t)[0] > 4, lambda: t - tf.reduce_mean(t, axis=0, keepdims=True), lambda: t
    )


class _WritesTheStepGraph(L.Layer):
    """Called again in the loop over chunks, writes the mean of the rows its previous call saw
    into a variable from the step's graph (outside any chunk's forward pass), and adds it."""

    def build(self, input_shape):
        self.mean = self.add_weight(shape=input_shape[1:], initializer="zeros", trainable=False)

    def call(self, t):
        previous, self._previous = getattr(self, "_previous", None), t
        outer = getattr(getattr(t, "graph", None), "outer_graph", None)
        if outer is not None and getattr(previous, "graph", None) is outer:
            with outer.as_default():
                self.mean.assign(tf.reduce_mean(previous, axis=0))
        return t + self.mean


class _WritesFromItsGradient(L.Layer):
    """Scales by a weight whose custom gradient keeps the incoming gradient (a sum over the
    examples) in a variable the next forward pass adds: a write in the backward pass, armed
    only where traced (verification runs eagerly and sees nothing)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=input_shape[1:], initializer="ones")
        self.kept = self.add_weight(shape=input_shape[1:], initializer="zeros", trainable=False)

    def call(self, t):
        kept = self.kept

        @tf.custom_gradient
        def same(scale):
            def gradient(upstream):
                if tf.executing_eagerly():
                    return upstream
                with tf.control_dependencies([kept.assign(upstream)]):
                    return tf.identity(upstream)

            return tf.identity(scale), gradient

        return t * same(tf.convert_to_tensor(self.scale)) + kept


class _RunningMean(L.Layer):
    """Writes the batch mean into a variable in training: state computed from the data."""

    def build(self, input_shape):
        self.mean = self.add_weight(shape=input_shape[1:], initializer="zeros", trainable=False)

    def call(self, t, training=False):
        if training:
            self.mean.assign(tf.reduce_mean(t, axis=0))
        return t


@pytest.mark.parametrize(
    "layer, physical",
    [
        ("mixes_beyond_four_rows", 8),
        ("mixes_beyond_four_rows", None),
        ("running_mean", 8),
        ("running_mean", None),
        ("carry_over", 8),  # (one call per step without chunks: nothing is carried)
        ("writes_the_step_graph_from_the_loop", 8),
        ("writes_from_its_gradient", 8),
        ("writes_from_its_gradient", None),
    ],
)
def test_what_only_the_step_shows_is_refused_in_chunks(layer, physical):
    # The proof reads each chunk's forward pass: a batch clipped in chunks used to be checked
    # against losses concatenated after the last chunk, which it took for constants, and a layer
    # mixing the 32 rows of a step (but not the few rows verification runs) trained; a layer
    # keeping a tensor from one chunk for the next one was then taken for a constant too.
    made = {
        "mixes_beyond_four_rows": lambda: L.Lambda(_mixes_beyond_four_rows),
        "running_mean": _RunningMean,
        "carry_over": CarryOver,
        "writes_the_step_graph_from_the_loop": _WritesTheStepGraph,
        "writes_from_its_gradient": _WritesFromItsGradient,
    }[layer]

    def build():
        return keras.Sequential([keras.Input((6, 4)), L.Flatten(), made(), L.Dense(3)])

    model = _model(physical, build=build)
    before = [np.array(v) for v in model.trainable_variables]
    x, y, w = _batch()
    with pytest.raises(PrivacyError, match="stay apart"):
        dp_gradients(model, x, y, w)
    assert get_ledger(model).steps == 0
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))
