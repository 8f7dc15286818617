"""keras_safe's train step in `fit`: model checks, inputs, metrics, sampling and accuracy."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD

RNG = np.random.default_rng(1)


def _dp(noise=1.0, **kwargs):
    return DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=noise, **kwargs)


def _bn_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 4)),
            keras.layers.Conv2D(8, 3),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )


def test_make_private_is_idempotent_and_keeps_the_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    weights = model.trainable_variables
    assert keras_safe.privacy.make_private(model) is model
    assert isinstance(model, keras.Sequential) and keras_safe.training.is_private(model)
    ledger = keras_safe.privacy.get_ledger(model)
    assert keras_safe.privacy.make_private(model) is model
    assert keras_safe.privacy.get_ledger(model) is ledger
    assert model.trainable_variables == weights
    # The ledger's variables are not weights of the model.
    assert len(model.weights) == 2


def test_validate_lists_batch_norm_and_fix_swaps_it_for_group_norm():
    model = _bn_model()
    problems = keras_safe.privacy.validate(model)
    assert [p.class_name for p in problems] == ["BatchNormalization"]
    assert "GroupNormalization" in str(problems[0])
    fixed = keras_safe.privacy.validate(model, fix=True)
    assert keras_safe.privacy.validate(fixed) == []
    norms = [layer for layer in fixed.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(norms) == 1 and norms[0].groups == 8
    x = RNG.normal(size=(4, 6, 6, 4)).astype("float32")
    assert fixed(x).shape == (4, 2)
    # A frozen BatchNormalization runs in inference mode: examples do not interact.
    model.layers[1].trainable = False
    assert keras_safe.privacy.validate(model) == []


def test_fit_refuses_an_unsupported_model_with_the_fix():
    model = _bn_model()
    model.compile(optimizer=_dp(), loss="mse")
    keras_safe.privacy.make_private(model)
    with pytest.raises(PrivacyError, match="BatchNormalization"):
        model.fit(RNG.normal(size=(4, 6, 6, 4)), RNG.normal(size=(4, 2)), verbose=0)


def test_activity_regularizer_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activity_regularizer="l2")])
    assert [p.class_name for p in keras_safe.privacy.validate(model)] == ["Dense"]


def test_tf_data_validation_data_and_metrics_in_history():
    x = RNG.normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(8, "relu")(inputs)))
    model.compile(
        optimizer=_dp(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    keras_safe.privacy.make_private(model)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    # A generic pipeline does not tell its size: keras_safe refuses rather than guess it.
    with pytest.raises(PrivacyError, match="num_examples"):
        model.fit(data, epochs=1, verbose=0)
    model.compile(
        optimizer=_dp(0.5, num_examples=64, batch_size=16),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(data, validation_data=(x, y), epochs=2, verbose=0)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(history.history[key]) == 2
        assert np.all(np.isfinite(history.history[key]))
    # The reported loss is Keras's own loss of the batch, as in plain training.
    assert history.history["loss"][0] > 0


def test_weight_regularizer_gradient_is_added_outside_clipping():
    # With zero data gradients and no noise, only the L2 penalty moves the weights.
    layer = keras.layers.Dense(3, use_bias=False, kernel_regularizer=keras.regularizers.L2(0.5))
    model = keras.Sequential([keras.Input((4,)), layer])
    model.compile(optimizer=DPSGD(0.1, l2_norm_clip=1e-3, noise_multiplier=0.0), loss="mse")
    keras_safe.privacy.make_private(model)
    w = np.array(layer.kernel)
    model.fit(np.zeros((4, 4)), np.zeros((4, 3)), batch_size=4, verbose=0)
    # d/dw 0.5 * sum(w^2) = w, so one SGD step multiplies w by (1 - 0.1).
    np.testing.assert_allclose(np.array(layer.kernel), 0.9 * w, rtol=1e-5)


def test_plain_optimizer_trains_normally_under_the_train_step_of_a_public_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    keras_safe.training.install(model)  # keras_safe's step, without privacy
    x = RNG.normal(size=(32, 3)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5]], "float32")
    history = model.fit(x, y, epochs=30, verbose=0)
    assert history.history["loss"][-1] < 0.05 * history.history["loss"][0]


def test_a_private_model_refuses_a_plain_optimizer():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=_dp(), loss="mse")
    keras_safe.privacy.make_private(model)
    x, y = RNG.normal(size=(8, 3)), RNG.normal(size=(8, 1))
    model.fit(x, y, batch_size=4, verbose=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")  # recompiled
    before = [np.array(v) for v in model.trainable_variables]
    for train in (lambda: model.fit(x, y, verbose=0), lambda: model.train_on_batch(x, y)):
        with pytest.raises(PrivacyError, match="not a keras_safe DP optimizer"):
            train()
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, np.array(v))


def test_poisson_batches_include_each_example_with_probability_q():
    n, batch, epochs = 400, 40, 5
    x = np.arange(n, dtype="float32")[:, None]
    y = np.zeros(n)
    ds = keras_safe.privacy.poisson_batches(x, y, batch_size=batch, epochs=epochs, seed=1)
    counts, sizes, shapes = np.zeros(n), [], set()
    for bx, _, bw in ds:
        w = bw.numpy()
        shapes.add(tuple(bx.shape))
        chosen = bx.numpy()[w > 0, 0].astype(int)
        assert len(set(chosen)) == len(chosen)  # no repeats within a batch
        counts[chosen] += 1
        sizes.append(int((w > 0).sum()))
        assert np.all(w[len(chosen) :] == 0)
    steps = epochs * n // batch
    assert len(sizes) == steps and len(shapes) == 1
    # Each count is Binomial(steps, q): the mean over examples must be steps * q.
    q = batch / n
    assert counts.mean() == pytest.approx(steps * q, abs=4 * np.sqrt(steps * q / n))
    # Batch sizes vary as Binomial(n, q), not fixed.
    assert np.std(sizes) == pytest.approx(np.sqrt(n * q * (1 - q)), rel=0.5)


def test_poisson_batches_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="batch_size"):
        keras_safe.privacy.poisson_batches(x, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        keras_safe.privacy.poisson_batches(x, batch_size=20)
    with pytest.raises(ValueError, match="`y`"):
        keras_safe.privacy.poisson_batches(x, np.zeros(9), batch_size=2)


def test_digits_with_dp_reaches_a_sensible_accuracy():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    order = np.random.default_rng(1).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=DPSGD(
            1.0,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            batch_size=100,
            num_examples=1500,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    keras_safe.privacy.make_private(model)
    data = keras_safe.privacy.poisson_batches(x_train, y_train, batch_size=100, epochs=30, seed=0)
    model.fit(data, epochs=1, verbose=0)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    assert accuracy >= 0.85


def test_dp_step_compiles_with_xla():
    # On GPUs Keras compiles the train step with XLA by default ("auto").
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.Reshape((4, 16))(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.LSTM(3)(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    model.compile(
        optimizer=_dp(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    keras_safe.privacy.make_private(model)
    assert model.jit_compile
    x = RNG.normal(size=(16, 6, 6, 2)).astype("float32")
    history = model.fit(x, RNG.integers(0, 2, 16), batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_metrics_of_poisson_batches_skip_the_padding_rows():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=DPSGD(1e-9, l2_norm_clip=1.0, noise_multiplier=0.0),  # the weights stay put
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    keras_safe.privacy.make_private(model)
    true_accuracy = model.evaluate(x, y, verbose=0)[1]
    data = keras_safe.privacy.poisson_batches(x, y, batch_size=200, epochs=2)
    reported = model.fit(data, verbose=0).history["accuracy"][0]
    # About 4,000 sampled examples: the reported accuracy is the true one up to sampling noise;
    # counting the padding rows (a quarter of each padded batch) would move it far away.
    assert abs(reported - true_accuracy) < 4 * np.sqrt(0.25 / 4000) + 1e-3
