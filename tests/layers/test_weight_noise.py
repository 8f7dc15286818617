"""Tests for keras_safe.layers.WeightNoise."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from keras_safe.layers import WeightNoise
from tests.testing import assert_config_round_trip, run_layer_test

RNG = np.random.default_rng(0)
X_DENSE = RNG.normal(size=(4, 5)).astype("float32")


def test_training_outputs_change_and_inference_is_clean_and_deterministic():
    layer = WeightNoise(keras.layers.Dense(3), stddev=0.1, seed=3)
    first = np.asarray(layer(X_DENSE, training=True))
    second = np.asarray(layer(X_DENSE, training=True))
    assert not np.allclose(first, second)
    kernel, bias = [np.asarray(w) for w in layer.layer.weights]
    clean = X_DENSE @ kernel + bias
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(layer(X_DENSE, training=False)), clean, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer(X_DENSE)), clean, atol=1e-5)
    # The clean weights themselves are never modified by a forward pass.
    np.testing.assert_array_equal(np.asarray(layer.layer.kernel), kernel)


def test_fresh_noise_on_every_pass_inside_a_compiled_function():
    layer = WeightNoise(keras.layers.Dense(3), stddev=0.1)
    layer.build((None, 5))

    @tf.function
    def twice(x):
        return layer(x, training=True), layer(x, training=True)

    a, b = twice(X_DENSE)
    c, _ = twice(X_DENSE)
    assert not np.allclose(a, b) and not np.allclose(a, c)


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_noise_has_the_stated_distribution(mode):
    """For Dense, out_noisy - out_clean for input x is Gaussian with a known variance."""
    stddev = 0.2
    layer = WeightNoise(keras.layers.Dense(2), stddev=stddev, mode=mode, seed=11)
    x = np.array([[0.5, -1.0, 2.0]], "float32")
    layer.build(x.shape)
    kernel, bias = [np.asarray(w, np.float64) for w in layer.layer.weights]
    bias = bias + np.array([0.3, -0.7])  # non-zero bias, so it is tested too
    layer.layer.bias.assign(bias)
    clean = x.astype(np.float64) @ kernel + bias
    draws = np.stack([np.asarray(layer(x, training=True))[0] for _ in range(400)]) - clean
    if mode == "additive":
        variance = stddev**2 * (np.sum(x**2) + 1.0) * np.ones(2)
    else:
        variance = stddev**2 * (np.sum((x.T * kernel) ** 2, axis=0) + bias**2)
    for unit in range(2):
        z = draws[:, unit] / np.sqrt(variance[unit])
        # Standard normal: Kolmogorov-Smirnov test at the 0.1% level.
        assert stats.kstest(z, "norm").pvalue > 1e-3
    # The two output units share the input, but their noise is independent.
    assert abs(stats.pearsonr(draws[:, 0], draws[:, 1])[0]) < 0.2


def _layer_loss(layer, x, target):
    return 0.5 * keras.ops.sum((layer(x, training=False) - target) ** 2)


@pytest.mark.parametrize(
    ("factory", "x"),
    [
        (lambda: keras.layers.Dense(3, dtype="float64"), RNG.normal(size=(4, 5))),
        (
            lambda: keras.layers.Conv2D(2, 3, dtype="float64"),
            RNG.normal(size=(2, 5, 5, 2)),
        ),
        (
            lambda: keras.layers.Embedding(7, 3, dtype="float64"),
            RNG.integers(0, 7, size=(3, 4)),
        ),
    ],
    ids=["dense", "conv2d", "embedding"],
)
@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_gradients_match_finite_differences_at_the_noisy_weights(factory, x, mode):
    layer = WeightNoise(factory(), stddev=0.3, mode=mode, seed=5, dtype="float64")
    layer(x)  # build
    for var in layer.layer.trainable_variables:  # non-zero biases, so every weight is noisy
        var.assign(RNG.normal(size=var.shape))
    target = RNG.normal(size=np.asarray(layer(x)).shape)
    clean = [np.asarray(v) for v in layer.layer.trainable_variables]

    state = np.asarray(layer.seed_generator.state)
    with tf.GradientTape() as tape:
        out = layer(x, training=True)
        loss = 0.5 * tf.reduce_sum((out - target) ** 2)
    grads = tape.gradient(loss, layer.layer.trainable_variables)
    grads = [np.asarray(tf.convert_to_tensor(g)) for g in grads]

    # Recover the noisy weights of that pass, and check they produced its output.
    layer.seed_generator.state.assign(state)
    noisy = [np.asarray(v) for v in layer.noisy_values()]
    assert all(not np.allclose(n, c) for n, c in zip(noisy, clean, strict=True))
    for var, value in zip(layer.layer.trainable_variables, noisy, strict=True):
        var.assign(value)
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), np.asarray(out), atol=1e-10)

    # Central finite differences of the loss in the noisy weights (evaluated deterministically).
    rng = np.random.default_rng(1)
    for index, var in enumerate(layer.layer.trainable_variables):
        flat_positions = rng.choice(
            noisy[index].size, size=min(6, noisy[index].size), replace=False
        )
        for position in flat_positions:
            h = 1e-5
            values = []
            for sign in (1, -1):
                bumped = noisy[index].copy().ravel()
                bumped[position] += sign * h
                var.assign(bumped.reshape(noisy[index].shape))
                values.append(float(_layer_loss(layer, x, target)))
            var.assign(noisy[index])
            d_noisy = (values[0] - values[1]) / (2 * h)
            # Chain rule to the clean weight: additive noise has d(noisy)/d(clean) = 1,
            # multiplicative noise has d(noisy)/d(clean) = noisy / clean.
            if mode == "additive":
                expected = d_noisy
            else:
                expected = d_noisy * noisy[index].ravel()[position] / clean[index].ravel()[position]
            np.testing.assert_allclose(
                grads[index].ravel()[position], expected, rtol=1e-6, atol=1e-9
            )


def test_learnable_scale_gets_the_chain_rule_gradient():
    layer = WeightNoise(keras.layers.Dense(2), stddev=0.2, learnable=True, seed=2)
    x = X_DENSE[:, :3]
    layer(x)
    assert len(layer.noise_scales) == 2
    assert all(float(s) == pytest.approx(0.2) for s in layer.noise_scales)
    target = np.ones((4, 2), "float32")
    state = np.asarray(layer.seed_generator.state)
    with tf.GradientTape() as tape:
        loss = 0.5 * tf.reduce_sum((layer(x, training=True) - target) ** 2)
    grads = tape.gradient(loss, layer.noise_scales + layer.layer.trainable_variables)
    layer.seed_generator.state.assign(state)
    noisy = [np.asarray(v, np.float64) for v in layer.noisy_values()]
    kernel, bias = [np.asarray(v, np.float64) for v in layer.layer.trainable_variables]
    # d loss / d noisy weights by hand, then d noisy / d scale = eps = (noisy - clean) / scale.
    residual = x.astype(np.float64) @ noisy[0] + noisy[1] - target
    d_kernel, d_bias = x.T.astype(np.float64) @ residual, residual.sum(0)
    expected_scale = [
        np.sum(d_kernel * (noisy[0] - kernel) / 0.2),
        np.sum(d_bias * (noisy[1] - bias) / 0.2),
    ]
    np.testing.assert_allclose([float(g) for g in grads[:2]], expected_scale, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[2]), d_kernel, rtol=1e-4, atol=1e-5)


def test_non_trainable_state_and_layer_losses_are_kept():
    batch_norm = WeightNoise(keras.layers.BatchNormalization(momentum=0.5), stddev=0.1)
    x = RNG.normal(loc=3.0, size=(16, 4)).astype("float32")
    batch_norm(x, training=True)
    np.testing.assert_allclose(
        np.asarray(batch_norm.layer.moving_mean), 0.5 * x.mean(0), rtol=1e-4, atol=1e-5
    )
    regularised = WeightNoise(
        keras.layers.Dense(2, activity_regularizer=keras.regularizers.L2(1.0)), stddev=0.1
    )
    out = np.asarray(regularised(X_DENSE, training=True))
    assert len(regularised.losses) == 1
    np.testing.assert_allclose(float(regularised.losses[0]), np.sum(out**2) / len(out), rtol=1e-4)


def test_zero_stddev_is_the_plain_layer():
    layer = WeightNoise(keras.layers.Dense(3), stddev=0.0)
    np.testing.assert_array_equal(layer(X_DENSE, training=True), layer(X_DENSE, training=False))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="layer"):
        WeightNoise("dense")
    with pytest.raises(ValueError, match="stddev"):
        WeightNoise(keras.layers.Dense(2), stddev=-0.1)
    with pytest.raises(ValueError, match="mode"):
        WeightNoise(keras.layers.Dense(2), mode="salt")
    with pytest.raises(ValueError, match="seed"):
        WeightNoise(keras.layers.Dense(2), seed="x")


def weight_noise_models():
    """WeightNoise around Dense, Conv1D, Conv2D and Embedding, each checked by `run_layer_test`
    (output shape, config, one training step), as `(cases, targets)` for
    `assert_saves_in_fresh_process`.

    They are saved, loaded and trained on in a fresh process by
    `tests/preprocessing/test_stack.py::test_models_train_save_and_load_in_a_fresh_process`,
    in the one process that also loads the preprocessing layers' models: TensorFlow starts once
    for both.
    """
    cases = [
        (lambda: WeightNoise(keras.layers.Dense(3), stddev=0.05), X_DENSE, (4, 3)),
        (
            lambda: WeightNoise(keras.layers.Conv1D(2, 3), mode="multiplicative"),
            RNG.normal(size=(4, 6, 2)).astype("float32"),
            (4, 4, 2),
        ),
        (
            lambda: WeightNoise(keras.layers.Conv2D(2, 3), learnable=True, seed=1),
            RNG.normal(size=(4, 5, 5, 1)).astype("float32"),
            (4, 3, 3, 2),
        ),
        (
            lambda: WeightNoise(keras.layers.Embedding(10, 3), stddev=0.1),
            RNG.integers(0, 10, size=(4, 6)).astype("int32"),
            (4, 6, 3),
        ),
    ]
    models = []
    for factory, x, shape in cases:
        assert_config_round_trip(factory())
        model = run_layer_test(factory, x, expected_output_shape=shape, run_saving=False)
        models.append((model, x))
    y = [RNG.normal(size=(len(x), 1)).astype("float32") for _, x in models]
    # The learnable scales are weights of the model and are saved with it.
    names = [w.path for w in models[2][0].trainable_weights]
    assert sum("noise_scale" in n for n in names) == 2
    return models, y


def test_trains_under_dp_with_gradients_at_the_noisy_weights():
    from keras_safe.optimizers import DPSGD, GradientClip
    from keras_safe.privacy import make_private

    x = RNG.normal(size=(8, 5)).astype("float32")
    y = RNG.normal(size=(8, 1)).astype("float32")

    def build(optimizer):
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((5,)),
                WeightNoise(keras.layers.Dense(4, activation="tanh"), stddev=0.3, seed=9),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=optimizer, loss="mse")
        return model

    # Without noise and with a per-example bound nobody reaches, DP-SGD's step is plain SGD's
    # step; both draw the same weight noise (same seed), so the updates must agree.
    plain = build(keras.optimizers.SGD(0.1))
    initial = [w.copy() for w in plain.get_weights()]
    plain.fit(x, y, batch_size=8, epochs=1, verbose=0)
    private = make_private(build(DPSGD(learning_rate=0.1, l2_norm_clip=1e6, noise_multiplier=0.0)))
    for a, b in zip(initial, private.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    private.fit(x, y, batch_size=8, epochs=1, verbose=0)
    moved = [np.abs(a - b).max() for a, b in zip(initial, plain.get_weights(), strict=True)]
    assert min(moved) > 1e-4
    for a, b in zip(plain.get_weights(), private.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # And with real DP noise, wrapped in GradientClip, it trains.
    noisy = make_private(
        build(GradientClip(DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0)))
    )
    history = noisy.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert {"grad_norm", "clip_fraction", "skipped_steps"} <= set(history.history)


def test_weight_regularizer_counted_once_and_trains_under_dp():
    import keras_safe

    layer = WeightNoise(keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1)))
    model = keras.Sequential([keras.Input((4,)), layer])
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    model(x, training=True)
    assert len(model.losses) == 1  # the penalty at the clean weights only
    kernel = np.array(layer.layer.kernel)
    np.testing.assert_allclose(float(model.losses[0]), 0.1 * np.sum(kernel**2), rtol=1e-5)
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0),
        loss="mse",
    )
    keras_safe.privacy.make_private(model)
    history = model.fit(x, np.zeros((8, 3)), verbose=0)
    assert np.isfinite(history.history["loss"][0])
