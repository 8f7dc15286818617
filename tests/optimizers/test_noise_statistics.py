"""The Gaussian noise of the DP release, measured: sized to catch a 5% error in its scale.

Every case looks at the public output of a DP step whose clipped sums are zero (zero inputs and
targets), so the release is the noise alone, divided by the expected batch size (or the number
of microbatches): `lr * sigma * C / B` per coordinate of the update. One step of a 262,656-weight
model gives that many independent draws, and `tests.statistical` checks their scale against a
chi-square interval at the 1e-7 level that a scale 5% off falls outside of (with probability
above 1 - 1e-7). Each case has its own seed, so no two cases look at the same draw.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe.optimizers import DPSGD, DPOptimizer, provenance
from tests.statistical import Z, assert_gaussian_scale

FEATURES, UNITS = 512, 512  # 262,144 kernel and 512 bias coordinates


def _model(optimizer, jit_compile=False):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(UNITS)])
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return keras_safe.privacy.make_private(model)


def _zeros(rows):
    return np.zeros((rows, FEATURES), "float32"), np.zeros((rows, UNITS), "float32")


def _weights(model):
    return [np.array(v, "float64") for v in model.trainable_variables]


def _update(model, fit):
    before = _weights(model)
    fit()
    return [b - a for b, a in zip(before, _weights(model))]


def _assert_noise(update, expected):
    kernel, bias = update
    assert_gaussian_scale(kernel, expected)
    # The bias gets its own share of the draw (512 values: a loose check that it is there).
    assert_gaussian_scale(bias, expected, catch=0.6, shape=False)


@pytest.mark.parametrize(
    "sigma, clip, divisor, seed, secure",
    [
        (0.6, 2.0, 16, 101, False),
        (1.3, 0.5, 250, 102, False),
        (3.0, 1.0, 7, 103, False),
        # The snapped release: noise sigma * C * (1 + g sqrt(d) / C), g about 2^-36 C, that is
        # sigma * C within 1e-8 here.
        (1.1, 1.0, 32, 104, True),
    ],
)
def test_privatize_adds_sigma_c_noise_to_the_clipped_sums_then_divides(
    sigma, clip, divisor, seed, secure
):
    optimizer = DPSGD(
        1.0, l2_norm_clip=clip, noise_multiplier=sigma, seed=seed, secure_noise=secure
    )
    variables = [keras.Variable(np.zeros((FEATURES, UNITS), "float32")), keras.Variable([0.0] * 9)]
    rng = np.random.default_rng(seed)
    sums = [rng.normal(size=v.shape).astype("float32") for v in variables]
    with provenance.releasing():  # as keras_safe's step calls it
        release = optimizer.privatize([tf.constant(s) for s in sums], divisor, variables)
    # The release is (sum + noise) / divisor: the noise is added to the sums, not instead.
    noise = [np.asarray(r, "float64") * divisor - s for r, s in zip(release, sums)]
    assert_gaussian_scale(noise[0], sigma * clip)
    assert np.all(noise[1] != 0)


def test_each_variable_takes_noise_of_its_own():
    # One draw per update, cut among the variables: two variables of one shape must not take
    # the same (or correlated) values. Independent draws give a sample correlation of standard
    # deviation 1/sqrt(n); a piece given twice gives 1.
    optimizer = DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, seed=105)
    variables = [keras.Variable(np.zeros((256, 256), "float32")) for _ in range(3)]
    with provenance.releasing():
        release = optimizer.privatize([tf.zeros(v.shape) for v in variables], 1, variables)
    noise = [np.asarray(r, "float64").ravel() for r in release]
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert abs(np.corrcoef(noise[i], noise[j])[0, 1]) < Z / math.sqrt(noise[i].size)
    for n in noise:
        assert_gaussian_scale(n, 1.0)


def test_privatize_without_noise_releases_the_clipped_sums_over_the_divisor():
    optimizer = DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=0.0)
    variable = keras.Variable(np.zeros((3, 4), "float32"))
    sums = np.arange(12.0, dtype="float32").reshape(3, 4)
    with provenance.releasing():
        (release,) = optimizer.privatize([tf.constant(sums)], 8, [variable])
    np.testing.assert_allclose(np.asarray(release), sums / 8, rtol=1e-7)


@pytest.mark.parametrize(
    "jit_compile, secure, seed",
    [
        (False, False, 201),
        (True, False, 202),
        (False, True, 203),
        (True, True, 204),
    ],
    ids=["graph", "xla", "graph-secure", "xla-secure"],
)
def test_fit_update_noise_is_lr_sigma_c_over_the_batch(jit_compile, secure, seed):
    lr, sigma, clip, batch = 0.5, 1.3, 2.0, 16
    optimizer = DPSGD(lr, l2_norm_clip=clip, noise_multiplier=sigma, seed=seed, secure_noise=secure)
    model = _model(optimizer, jit_compile)
    assert model.jit_compile is jit_compile
    x, y = _zeros(batch)
    update = _update(model, lambda: model.fit(x, y, batch_size=batch, verbose=0))
    _assert_noise(update, lr * sigma * clip / batch)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_noise_depends_on_every_bit_of_the_seed(jit_compile):
    # Seeds that differ only above bit 32 must draw independent noise.
    x, y = np.zeros((8, 64), "float32"), np.zeros((8, 64), "float32")
    updates = []
    for seed in (7, 7 + 2**32):
        optimizer = DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=1.0, seed=seed)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, use_bias=False)])
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
        keras_safe.privacy.make_private(model)
        before = np.array(model.trainable_variables[0])
        model.fit(x, y, batch_size=8, verbose=0)
        updates.append((before - np.array(model.trainable_variables[0])).ravel())
    assert abs(np.corrcoef(*updates)[0, 1]) < Z / math.sqrt(updates[0].size)


def _poisson_step(batch, n):
    """A one-step `poisson_batches` dataset whose sample is at least 20% off `batch`: dividing
    by the examples drawn, or by the padded rows, instead of `batch` changes the scale by more
    than 5%."""
    for seed in range(100):
        data = keras_safe.privacy.poisson_batches(
            *_zeros(n), batch_size=batch, epochs=1 / (n // batch), seed=seed
        )
        ((_, _, weights),) = list(data.as_numpy_iterator())
        drawn = int(np.sum(weights > 0))
        if abs(drawn - batch) > 0.2 * batch:
            return data, drawn, len(weights)
    raise AssertionError("no seed below 100 draws a sample 20% off the expected size")


def test_poisson_padding_divides_by_the_expected_batch_not_the_rows():
    lr, sigma, clip, batch = 1.0, 1.1, 1.0, 64
    data, drawn, rows = _poisson_step(batch, n=640)
    assert rows > 1.5 * batch and abs(drawn - batch) > 0.2 * batch
    model = _model(DPSGD(lr, l2_norm_clip=clip, noise_multiplier=sigma, seed=401))
    update = _update(model, lambda: model.fit(data, verbose=0))
    _assert_noise(update, lr * sigma * clip / batch)


def test_gradient_accumulation_spreads_one_update_noise_over_the_batches():
    # Each of the k batches adds sigma * C / sqrt(k); the update averages the k releases of
    # batch B: its noise is sigma * C / (k * B), one update's worth.
    lr, sigma, clip, batch, k = 1.0, 1.0, 1.0, 8, 4
    inner = keras.optimizers.SGD(lr, gradient_accumulation_steps=k)
    model = _model(DPOptimizer(inner, l2_norm_clip=clip, noise_multiplier=sigma, seed=501))
    x, y = _zeros(batch * k)
    update = _update(model, lambda: model.fit(x, y, batch_size=batch, shuffle=False, verbose=0))
    assert int(model.optimizer.iterations) == 1
    _assert_noise(update, lr * sigma * clip / (k * batch))


def test_each_accumulated_batch_releases_one_over_sqrt_k_of_the_noise():
    # A custom loop's release (dp_gradients) of one of the k batches of an update.
    sigma, clip, batch, k = 1.2, 0.7, 8, 9
    inner = keras.optimizers.SGD(0.1, gradient_accumulation_steps=k)
    optimizer = DPOptimizer(inner, clip, sigma, num_examples=80, batch_size=batch, seed=601)
    model = _model(optimizer)
    grads = keras_safe.privacy.dp_gradients(model, *_zeros(batch))
    _assert_noise([np.asarray(g, "float64") for g in grads], sigma * clip / k**0.5 / batch)


def test_microbatch_update_noise_is_lr_sigma_c_over_the_microbatches():
    lr, sigma, clip, batch, microbatches = 0.5, 1.0, 1.0, 16, 4
    optimizer = DPSGD(
        lr, l2_norm_clip=clip, noise_multiplier=sigma, num_microbatches=microbatches, seed=701
    )
    model = _model(optimizer)
    x, y = _zeros(batch)
    update = _update(model, lambda: model.fit(x, y, batch_size=batch, verbose=0))
    _assert_noise(update, lr * sigma * clip / microbatches)
