"""keras_safe's train step in `fit`: model checks, inputs, metrics, the eager, graph and XLA
steps against the one-example-at-a-time reference, and accuracy.

The law of `poisson_batches` is measured in `tests/privacy/test_sampling_statistics.py`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import keras_safe
from keras_safe._validation import PrivacyError
from keras_safe.optimizers import DPSGD
from keras_safe.training.private_model import install_train_step
from tests.privacy.per_example.common import per_example_norms, reference_update

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
    install_train_step(model)  # keras_safe's step, without privacy
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


def _conv_norm_model(recurrent):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.Reshape((4, 16))(h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.LSTM(3)(h) if recurrent else keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def _flat(arrays):
    return np.concatenate([np.asarray(a, "float64").ravel() for a in arrays])


# The XLA case has the recurrent layer (unrolled, its rule compiled by XLA); the eager and
# graph cases leave it out, as it costs most of the tracing.
@pytest.mark.parametrize("mode, recurrent", [("eager", False), ("graph", False), ("xla", True)])
def test_dp_step_matches_the_one_example_at_a_time_reference(mode, recurrent):
    # On GPUs Keras compiles the train step with XLA by default ("auto"); eagerly (run_eagerly)
    # keras_safe still runs a traced copy of the step. Each must clip like the reference: with
    # noise 0 and SGD at rate 1, one step moves the weights by the mean of the examples'
    # gradients clipped in float64 numpy, each computed on a batch holding it alone, and
    # removing one example (sample weight 0) moves the update by at most C / B.
    batch = 8
    keras.utils.set_random_seed(3)
    model = _conv_norm_model(recurrent)
    model.compile(
        optimizer=DPSGD(1.0, l2_norm_clip=1.0, noise_multiplier=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=mode == "xla",
        run_eagerly=mode == "eager",
    )
    x = RNG.normal(size=(batch, 6, 6, 2)).astype("float32")
    y = RNG.integers(0, 2, batch)
    # A clip bound between the examples' norms: half of them are clipped.
    clip = float(np.median(per_example_norms(model, x, y)))
    model.optimizer.l2_norm_clip = clip
    keras_safe.privacy.make_private(model)
    assert model.jit_compile is (mode == "xla")
    start = [np.array(v) for v in model.trainable_variables]
    expected = _flat(reference_update(model, x, y, clip))

    def update(weights):
        for variable, value in zip(model.trainable_variables, start):
            variable.assign(value)
        model.fit(x, y, sample_weight=weights, batch_size=batch, shuffle=False, verbose=0)
        return _flat(start) - _flat(model.trainable_variables)

    full = update(np.ones(batch, "float32"))
    assert np.linalg.norm(full - expected) <= 1e-5 * np.linalg.norm(expected)
    for j in range(batch):
        without = update(np.where(np.arange(batch) == j, 0.0, 1.0).astype("float32"))
        assert np.linalg.norm(full - without) <= clip / batch * (1 + 1e-5), j


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
    data = keras_safe.privacy.poisson_batches(x, y, batch_size=200, epochs=2, seed=0)
    reported = model.fit(data, verbose=0).history["accuracy"][0]
    # About 4,000 sampled examples: the reported accuracy is the true one up to sampling noise;
    # counting the padding rows (a quarter of each padded batch) would move it far away.
    assert abs(reported - true_accuracy) < 4 * np.sqrt(0.25 / 4000) + 1e-3


@pytest.mark.parametrize("entry", ["fit", "train_on_batch"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_private_step_is_traced_once(entry, optimizer, monkeypatch):
    # An optimizer variable created while Keras traces the train function (the DP optimizer's
    # draw counter, Adam's moments) would make TensorFlow trace the whole DP step again.
    from keras_safe.training import train_step

    traces = []
    original = train_step._traced_private_step

    def counted(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_step, "_traced_private_step", counted)
    x, y = RNG.normal(size=(64, 5)).astype("float32"), RNG.integers(0, 2, 64)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(2)])
    kind = keras_safe.optimizers.DPSGD if optimizer == "sgd" else keras_safe.optimizers.DPAdam
    dp = kind(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, num_examples=64, batch_size=16)
    model.compile(optimizer=dp, loss="sparse_categorical_crossentropy")
    keras_safe.privacy.make_private(model)
    if entry == "fit":
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    else:
        for start in (0, 16, 32):
            model.train_on_batch(x[start : start + 16], y[start : start + 16])
    assert dp.built and len(traces) == 1


def test_verification_examples_come_from_the_first_batch_that_holds_one():
    # A Poisson batch may hold no example (all rows padding, weight 0): the verification takes
    # its examples from a later batch instead of finding none and refusing the fit.
    from keras_safe.training import preflight

    x = np.arange(12, dtype="float32").reshape(6, 2)
    weights = np.array([0, 0, 0, 0, 1, 1], "float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(6), weights)).batch(2)
    found_x, _, found_w = preflight.first_examples(data)
    np.testing.assert_array_equal(found_x, x[4:])
    np.testing.assert_array_equal(found_w, [1, 1])
    empty = tf.data.Dataset.from_tensor_slices((x, np.zeros(6), np.zeros(6, "float32"))).batch(2)
    assert preflight.first_examples(empty) is None
