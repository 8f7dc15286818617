"""Attacks on the two assumptions under DP-SGD, through every entry point, with measured results.

Examples must not interact, and each step's batch must be the batch the accountant charged.
Each attack below first shows, with an independent measurement, that it would break the
guarantee (a layer or loss that really mixes examples, a batch really larger than accounted),
then runs it through `fit`, `train_on_batch`, an eager `dp_gradients` and a `dp_gradients`
inside the user's own `tf.function`, and checks that every one is refused before anything is
applied or charged: the weights, the non-trainable state and the ledger are unchanged.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.privacy import dp_gradients, get_ledger, make_private
from tests.dp_reference import epsilon as reference_epsilon

RNG = np.random.default_rng(21)
N, B = 96, 8
L = keras.layers


def _data(n=N, shape=(6,)):
    x = RNG.normal(size=(n, *shape)).astype("float32")
    return x, (x.reshape(n, -1)[:, 0] > 0).astype("int32")


def _compile(model, loss=None, **dp):
    settings = dict(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1)
    settings.update(dp)
    model.compile(
        optimizer=DPSGD(**settings),
        loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return make_private(model)


def _state(model):
    return [np.array(v) for v in model.trainable_weights]


def _assert_untouched(model, before):
    for b, v in zip(before, model.trainable_weights):
        np.testing.assert_array_equal(b, np.array(v), err_msg=v.path)
    assert get_ledger(model).steps == 0


def _every_entry_point_refuses(build, x, y, match, entries=("fit", "train_on_batch", "eager")):
    """The entry points refuse (`fit`, `train_on_batch` and an eager `dp_gradients` by
    default), and so does `dp_gradients` in the user's own `tf.function`."""
    calls = {
        "fit": lambda m: m.fit(x, y, batch_size=B, epochs=1, verbose=0),
        "train_on_batch": lambda m: m.train_on_batch(x[:B], y[:B]),
        "eager": lambda m: dp_gradients(m, x[:B], y[:B]),
    }
    for name in entries:
        model = build(num_examples=N, batch_size=B)
        before = _state(model)
        with pytest.raises(PrivacyError, match=match):
            calls[name](model)
        _assert_untouched(model, before)
    # The user's own compiled loop: the refusal comes from `verify_model` (which a compiled loop
    # needs first) or, at the latest, when the loop is traced.
    model = build(num_examples=N, batch_size=B)
    before = _state(model)
    try:
        keras_safe.training.verify_model(model, x[:4], y[:4])
    except PrivacyError as error:
        assert re.search(match, str(error)), str(error)
        _assert_untouched(model, before)
        return

    @tf.function
    def step(a, b):
        grads = dp_gradients(model, a, b)
        model.optimizer.apply(grads, model.trainable_variables)

    with pytest.raises(PrivacyError, match=match):
        step(tf.constant(x[:B]), tf.constant(y[:B]))
    _assert_untouched(model, before)


def _cross_effect(model, x):
    """The largest change of example 0's training-mode output when another example changes
    (for deterministic layers)."""
    other = x.copy()
    other[1:] = RNG.normal(size=other[1:].shape).astype(other.dtype) * 3.0
    return float(np.max(np.abs(model(x, training=True)[0] - model(other, training=True)[0])))


def _cross_gradient(model, x, training=True, calls=4):
    """The largest |d output_0 / d input_j|, j != 0, over a few calls: > 0 when example 0's
    output depends on other examples."""
    x = tf.constant(x)
    worst = 0.0
    for _ in range(calls):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = tf.reduce_sum(model(x, training=training)[0])
        grad = tape.gradient(out, x)
        worst = max(worst, float(tf.reduce_max(tf.abs(grad[1:]))))
    return worst


# -- item 1, 2 and own variants: layers that mix examples in training, later, or at other sizes ---


class TrainOnlyCentering(L.Layer):
    def call(self, x, training=None):
        return x - tf.reduce_mean(x, axis=0) if training else x


class MixesAboveFour(L.Layer):
    def call(self, x):
        return tf.cond(tf.shape(x)[0] > 4, lambda: x - tf.reduce_mean(x, 0), lambda: x)


class MixesAfterFiftyCalls(L.Layer):
    def build(self, shape):
        self.calls = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x):
        self.calls.assign_add(1.0)
        return tf.cond(self.calls > 50.0, lambda: x - tf.reduce_mean(x, 0), lambda: x)


class NeighbourBlend(L.Layer):  # own variant: each example borrows from the next one
    def call(self, x):
        return x + 0.5 * tf.roll(x, shift=1, axis=0)


class BatchRanks(L.Layer):  # own variant: an example's rank within the batch
    def call(self, x):
        ranks = tf.argsort(tf.argsort(x, axis=0), axis=0)
        return x + tf.cast(ranks, x.dtype)


class SimilarToOthers(L.Layer):  # own variant: attention across the batch
    def call(self, x):
        weights = tf.nn.softmax(tf.matmul(x, x, transpose_b=True), axis=-1)
        return tf.matmul(weights, x)


class StopsAtTheMax(L.Layer):  # own variant: a data-dependent loop over the batch
    def call(self, x):
        def body(i, h):
            return i + 1, h - tf.reduce_max(h, axis=0) * 0.1

        return tf.while_loop(lambda i, h: i < 3, body, (0, x))[1]


# Refusals of mixing: the proof from the traced step, or the eager comparison of each example's
# loss with its loss alone that `verify` makes first (for what mixes even outside training).
MIXING = "examples of a batch stay apart|Examples interact|cannot be split per example"

MIXING_LAYERS = {
    "MixUp": lambda: L.MixUp(),
    "CutMix": lambda: L.CutMix(),
    "train-only centering": TrainOnlyCentering,
    "mixes above four examples": MixesAboveFour,
    "mixes after fifty calls": MixesAfterFiftyCalls,
    "neighbour blend": NeighbourBlend,
    "batch ranks": BatchRanks,
    "attention across the batch": SimilarToOthers,
    "loop on the batch maximum": StopsAtTheMax,
}
_IMAGE_LAYERS = {"MixUp", "CutMix"}


@pytest.mark.parametrize("name", sorted(MIXING_LAYERS))
def test_layers_that_mix_examples_are_refused_at_every_entry_point(name):
    shape = (6, 6, 3) if name in _IMAGE_LAYERS else (6,)
    x, y = _data(shape=shape)

    def build(**dp):
        model = keras.Sequential(
            [keras.Input(shape), MIXING_LAYERS[name](), L.Flatten(), L.Dense(2)]
        )
        return _compile(model, **dp)

    # The attack is real: in training mode, at the training batch size (and, for the late
    # layer, after its 50th call), example 0's output depends on the other examples.
    probe = build()
    call = tf.function(lambda v: probe(v, training=True))
    for _ in range(52 if name == "mixes after fifty calls" else 0):
        call(tf.constant(x[:B]))
    oracle = _cross_gradient if name in _IMAGE_LAYERS else _cross_effect
    assert oracle(probe, x[:B]) > 1e-3
    # `fit` and `train_on_batch` share Keras's train function: every layer goes through it and
    # the user's compiled loop; two also through the other entry points.
    full = name in ("MixUp", "mixes after fifty calls")
    entries = ("fit", "train_on_batch", "eager") if full else ("fit",)
    _every_entry_point_refuses(build, x, y, match=MIXING, entries=entries)


# -- item 3 and own variants: losses that mix through the labels, the ranking or the batch -------


def positives_normalised(y_true, y_pred):
    per = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    return per / (tf.reduce_sum(tf.cast(y_true, tf.float32)) + 1.0)


def hard_example_mining(y_true, y_pred):
    per = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
    k = tf.minimum(8, tf.shape(per)[0])
    threshold = tf.math.top_k(per, k=k).values[-1]
    return per * tf.cast(per >= threshold, per.dtype)


def in_batch_contrastive(y_true, y_pred):  # own variant: in-batch negatives (SimCLR/CLIP-like)
    similarities = tf.matmul(y_pred, y_pred, transpose_b=True)
    return tf.reduce_logsumexp(similarities, axis=-1) - tf.linalg.diag_part(similarities)


MIXING_LOSSES = {
    "divided by the batch's positives": positives_normalised,
    "hard-example mining": hard_example_mining,
    "in-batch contrastive": in_batch_contrastive,
}


@pytest.mark.parametrize("name", sorted(MIXING_LOSSES))
def test_losses_that_mix_examples_are_refused_at_every_entry_point(name):
    loss = MIXING_LOSSES[name]
    x, y = _data()
    # The attack is real: example 0's loss moves when the other examples' labels or
    # predictions do (16 examples: example 0 is 8th of 16 by loss, then last).
    logits = np.zeros((16, 2), "float32")
    logits[1:8, 1], logits[8:, 1] = 2.0, -2.0
    labels = np.zeros(16, "int32")
    pushed = logits.copy()
    pushed[1:, 1] = 5.0
    flipped = np.concatenate([labels[:1], 1 - labels[1:]])
    # Still 8th, and not orthogonal to the others; a draw of its own, so that the check does
    # not depend on which tests ran before in this process.
    logits[0] = np.random.default_rng(3).normal(size=2) * 0.1
    base = float(loss(labels, logits)[0])
    moved = max(
        abs(float(loss(flipped, logits)[0]) - base), abs(float(loss(labels, pushed)[0]) - base)
    )
    assert moved > 1e-3

    def build(**dp):
        return _compile(keras.Sequential([keras.Input((6,)), L.Dense(2)]), loss=loss, **dp)

    _every_entry_point_refuses(build, x, y, match=MIXING)


# -- item 4: state written from the data in the forward pass --------------------------------------


class RunningMean(L.Layer):
    def build(self, shape):
        self.mean = self.add_weight(shape=shape[1:], initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.mean.assign(tf.reduce_mean(x, axis=0))
        return x


def test_a_forward_pass_that_writes_the_data_into_a_variable_is_refused(tmp_path):
    x, y = _data()

    def build(**dp):
        model = keras.Sequential([keras.Input((6,)), RunningMean(), L.Dense(2)])
        return _compile(model, **dp)

    # The attack is real: one plain training call stores the exact batch mean.
    probe = build()
    probe(x[:B], training=True)
    np.testing.assert_allclose(np.array(probe.layers[0].mean), x[:B].mean(0), atol=1e-6)
    _every_entry_point_refuses(build, x, y, match="writes a variable")
    # Nothing reaches a saved file either.
    model = build(num_examples=N, batch_size=B)
    with pytest.raises(PrivacyError):
        model.fit(x, y, batch_size=B, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(
        tmp_path / "m.keras", custom_objects={"RunningMean": RunningMean}
    )
    np.testing.assert_array_equal(np.array(loaded.layers[0].mean), np.zeros(6, "float32"))


def test_python_and_custom_gradients_on_the_data_are_refused():
    x, y = _data()

    class NumpyStep(L.Layer):
        def call(self, v):
            out = tf.numpy_function(lambda a: a * 2.0, [v], tf.float32)
            out.set_shape(v.shape)
            return out

    @tf.custom_gradient
    def scaled_backward(v):
        return v, lambda dy: dy - tf.reduce_mean(dy, axis=0)  # mixes examples' gradients

    class CustomGradient(L.Layer):
        def call(self, v):
            return scaled_backward(v)

    for layer, match in ((NumpyStep, "EagerPyFunc|PyFunc"), (CustomGradient, "custom gradient")):
        model = _compile(
            keras.Sequential([keras.Input((6,)), L.Dense(4), layer(), L.Dense(2)]),
            num_examples=N,
            batch_size=B,
        )
        before = _state(model)
        with pytest.raises(PrivacyError, match=match):
            model.fit(x, y, batch_size=B, verbose=0)
        _assert_untouched(model, before)


# -- item 5: the step's batch is the accounted batch, in every entry point -----------------------


def _dense(**dp):
    return _compile(keras.Sequential([keras.Input((6,)), L.Dense(2)]), **dp)


def test_train_on_batch_after_fit_cannot_take_batches_larger_than_accounted():
    x, y = _data(n=600)
    model = _dense()
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    ledger = get_ledger(model)
    steps, spent = ledger.steps, ledger.epsilon(1e-5)
    (segment,) = ledger.segments()
    before = _state(model)
    for _ in range(3):
        with pytest.raises(PrivacyError, match="more examples than the accounting allows"):
            model.train_on_batch(x[:500], y[:500])
    _assert_untouched_since(model, before, steps)
    # What is reported is exactly what ran, computed independently.
    expected = reference_epsilon(segment["noise_multiplier"], 10 / 600, steps, 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(expected, rel=1e-9)
    assert spent == ledger.epsilon(1e-5)


def _assert_untouched_since(model, before, steps):
    for b, v in zip(before, model.weights):
        np.testing.assert_array_equal(b, np.array(v), err_msg=v.path)
    assert get_ledger(model).steps == steps


def test_dp_gradients_refuses_batches_larger_than_declared_eager_and_compiled():
    x, y = _data(n=600)
    model = _dense(num_examples=600, batch_size=10)
    before = _state(model)
    with pytest.raises(PrivacyError, match="more examples than the accounting allows"):
        dp_gradients(model, x[:500], y[:500])
    _assert_untouched(model, before)

    @tf.function
    def step(a, b):
        model.optimizer.apply(dp_gradients(model, a, b), model.trainable_variables)

    with pytest.raises(tf.errors.InvalidArgumentError, match="keras_safe refused this step"):
        step(tf.constant(x[:500]), tf.constant(y[:500]))
    _assert_untouched(model, before)
    step(tf.constant(x[:10]), tf.constant(y[:10]))  # the declared size trains
    assert get_ledger(model).steps == 1


def test_microbatches_accounted_at_sensitivity_c_must_hold_one_example_each():
    x, y = _data()
    # num_microbatches equal to the declared batch: one example per microbatch, sensitivity C.
    model = _dense(num_examples=N, batch_size=B, num_microbatches=B)
    before = _state(model)
    with pytest.raises(PrivacyError, match="one example per microbatch|more examples"):
        dp_gradients(model, x[: 2 * B], y[: 2 * B])  # two examples per microbatch: 2C
    _assert_untouched(model, before)
    # Padding rows (weight 0) that put two real examples in a microbatch: the examples are no
    # more than declared, but a microbatch moves by 2C when one leaves.
    weights = np.tile([1.0, 1.0, 0.0, 0.0], B // 2).astype("float32")
    with pytest.raises(PrivacyError, match="one example per microbatch"):
        dp_gradients(model, x[: 2 * B], y[: 2 * B], sample_weight=weights)
    _assert_untouched(model, before)
    grads = dp_gradients(model, x[:B], y[:B])  # one example each: accepted
    model.optimizer.apply(grads, model.trainable_variables)
    assert get_ledger(model).steps == 1


# -- item 8: the Gaussian noise has no exact zeros ----------------------------------------------


def test_the_noise_has_no_exact_zeros_and_no_gap_around_zero_in_1e8_values():
    from keras_safe.optimizers.noise import gaussian_noise, noise_key

    draw = tf.function(lambda counter: gaussian_noise(10_000_000, noise_key(7, counter)))
    zeros = small = 0
    for counter in range(10):
        values = draw(tf.constant(counter, tf.int64)).numpy()
        zeros += int(np.sum(values == 0))
        small += int(np.sum(np.abs(values) < 1e-6))
    # The float32-angle sampler gave about 1e-7 zeros per value (10 expected here).
    assert zeros == 0
    # A Gaussian puts 2 * phi(0) * 1e-6 = 8.0e-7 of its mass within 1e-6 of 0: 79.8 of 1e8.
    # Poisson bounds at 6 standard deviations (false alarm below 1e-8).
    assert abs(small - 79.8) < 6 * np.sqrt(79.8)


# -- item 9: a subclassed model that is not built yet ---------------------------------------------


class TwoDense(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = L.Dense(4)
        self.out = L.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


def test_an_unbuilt_subclassed_model_is_built_on_its_first_examples_and_trains():
    x, y = _data()
    model = _compile(TwoDense())
    assert not model.trainable_variables
    model.fit(x, y, batch_size=B, epochs=1, verbose=0)
    assert get_ledger(model).steps > 0

    class Empty(keras.Model):
        def call(self, v):
            return v[:, :2]

    empty = _compile(Empty())
    with pytest.raises(PrivacyError, match="no trainable variables"):
        empty.fit(x, y, batch_size=B, verbose=0)


def test_under_xla_an_oversized_batch_releases_nothing():
    # XLA drops assertions: the step's own release is withheld instead.
    x, y = _data(n=600)
    model = _dense(num_examples=600, batch_size=10, noise_multiplier=0.0)
    keras_safe.training.verify_model(model, x[:4], y[:4])

    @tf.function(jit_compile=True)
    def step(a, b):
        grads = dp_gradients(model, a, b)
        model.optimizer.apply(grads, model.trainable_variables)
        return grads

    before = _state(model)
    released = step(tf.constant(x[:500]), tf.constant(y[:500]))
    assert all(float(tf.reduce_max(tf.abs(g))) == 0.0 for g in released)
    for b, v in zip(before, model.trainable_weights):
        np.testing.assert_array_equal(b, np.array(v))
    released = step(tf.constant(x[:10]), tf.constant(y[:10]))
    assert sum(float(tf.reduce_max(tf.abs(g))) for g in released) > 0


def test_privatize_called_outside_the_step_is_refused():
    # The attack: unclipped gradients, noised by the optimizer's own method and applied with
    # nothing charged. The noise would be calibrated for a clipped sum of norm C per example;
    # these gradients are unbounded.
    x, y = _data()
    model = _dense(num_examples=N, batch_size=B)
    model.build((None, 6))
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x[:B], y=y[:B], y_pred=model(x[:B]))
    raw = tape.gradient(loss, model.trainable_variables)
    assert max(float(tf.norm(g)) for g in raw) * B > 1.0  # more than C could contribute
    before = _state(model)
    with pytest.raises(PrivacyError, match="train step only"):
        model.optimizer.privatize([g * B for g in raw], B, model.trainable_variables)
    _assert_untouched(model, before)
