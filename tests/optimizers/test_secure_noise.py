"""`secure_noise=True`: a release on an exact power-of-two grid with rounded Gaussian noise.

Checked against what the mechanism must be: every value of `snapped_gaussian_sum` an exact
multiple of the grid, the rounded sum exactly `round(total / grid)` where the noise is zero,
and the noise's standard deviation within 1% (a chi-square interval on 10^6 values: a 5% error
is 50 standard errors away, a false alarm below 1e-6 needs 4.9).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe.optimizers import DPSGD, provenance
from keras_safe.optimizers.noise import snapped_gaussian_sum

GRID = 2.0**-20


def test_the_snapped_release_lies_on_the_grid_with_the_right_noise():
    total = tf.constant(np.random.default_rng(0).normal(size=1_000_000), tf.float64)
    release = snapped_gaussian_sum(total, 0.5, GRID, tf.constant([11, 3], tf.int64)).numpy()
    steps = release / GRID
    np.testing.assert_array_equal(steps, np.round(steps))  # exact multiples of the grid
    noise = release - np.round(total.numpy() / GRID) * GRID
    std = noise.std()
    assert abs(std / 0.5 - 1.0) < 6.0 / np.sqrt(2 * len(noise))
    assert abs(noise.mean()) < 6 * 0.5 / np.sqrt(len(noise))
    # No noise, no change but the rounding: the sum itself, snapped.
    exact = snapped_gaussian_sum(total, 0.0, GRID, tf.constant([11, 4], tf.int64)).numpy()
    np.testing.assert_array_equal(exact, np.round(total.numpy() / GRID) * GRID)


def test_a_private_model_trains_with_secure_noise_and_keeps_the_setting(tmp_path):
    x = np.random.default_rng(1).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    optimizer = DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1, secure_noise=True)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    keras_safe.privacy.make_private(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert keras_safe.privacy.get_ledger(model).steps > 0
    assert DPSGD.from_config(optimizer.get_config()).secure_noise is True
    # The noise of one release: std sigma C (1 + grid sqrt(d) / C) / B, within 6 standard errors.
    variables = [tf.Variable(tf.zeros([250_000]))]
    big = DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1, secure_noise=True)
    with provenance.releasing():  # as keras_safe's step calls it
        (release,) = big.privatize([tf.zeros([250_000])], 16, variables)
    grid = 2.0**-36
    expected = 1.1 * (1 + grid * np.sqrt(250_000)) / 16
    assert abs(float(np.std(release)) / expected - 1) < 6 / np.sqrt(2 * 250_000)
    with pytest.raises(ValueError, match="secure_noise"):
        DPSGD(learning_rate=0.1, noise_multiplier=1.0, secure_noise="yes")
