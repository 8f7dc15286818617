"""Per-example features: the training path's loss (masks, weights), probabilities, entropies."""

import keras
import numpy as np
import pytest
from scipy import special

from keras_safe.audit.features import compute_features, example_losses


def test_features_use_the_right_loss():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 4, 40)

    # Compiled from_logits crossentropy: numpy log-softmax reference.
    logits_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    logits_model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    z = np.asarray(logits_model.predict(x, verbose=0), dtype=np.float64)
    f = compute_features(logits_model, x, y)
    logp = special.log_softmax(z, axis=1)
    np.testing.assert_allclose(f["loss"], -logp[np.arange(40), y], rtol=1e-5)
    p = np.exp(logp)
    np.testing.assert_allclose(f["confidence"], p[np.arange(40), y], rtol=1e-6)
    np.testing.assert_allclose(f["entropy"], -np.sum(p * logp, axis=1), rtol=1e-6)
    wrong = np.log(p.sum(axis=1) - p[np.arange(40), y])
    np.testing.assert_allclose(f["logit_confidence"], logp[np.arange(40), y] - wrong, rtol=1e-6)

    # Uncompiled softmax model: sparse categorical crossentropy of the probabilities.
    softmax_model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="softmax")]
    )
    probs = np.asarray(softmax_model.predict(x, verbose=0), dtype=np.float64)
    f = compute_features(softmax_model, x, y)
    np.testing.assert_allclose(f["loss"], -np.log(probs[np.arange(40), y]), rtol=1e-5)

    # loss_fn overrides the compiled loss.
    f = compute_features(
        logits_model, x, y, loss_fn=lambda t, p: keras.ops.sum(keras.ops.square(p), axis=-1)
    )
    np.testing.assert_allclose(f["loss"], np.sum(z**2, axis=1), rtol=1e-5)

    # One-hot labels with a compiled categorical crossentropy.
    onehot = np.eye(4, dtype="float32")[y]
    cat_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    cat_model.compile("sgd", "categorical_crossentropy")
    probs = np.asarray(cat_model.predict(x, verbose=0), dtype=np.float64)
    f = compute_features(cat_model, x, onehot)
    np.testing.assert_allclose(f["loss"], -np.log(probs[np.arange(40), y]), rtol=1e-4)
    np.testing.assert_array_equal(f["label"], y)

    # Binary classifier with one sigmoid unit and a string loss.
    yb = rng.integers(0, 2, 40)
    bin_model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(1, activation="sigmoid")])
    bin_model.compile("sgd", "binary_crossentropy")
    q = np.asarray(bin_model.predict(x, verbose=0), dtype=np.float64)[:, 0]
    f = compute_features(bin_model, x, yb)
    expected = -(yb * np.log(q) + (1 - yb) * np.log(1 - q))
    np.testing.assert_allclose(f["loss"], expected, rtol=1e-4)
    np.testing.assert_allclose(f["confidence"], np.where(yb == 1, q, 1 - q), rtol=1e-6)


def _sequence_tagger():
    """Padded sequences (id 0 = padding): the mask hides padded steps from the loss."""
    model = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 4, mask_zero=True),
            keras.layers.GRU(5, return_sequences=True),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        "sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), loss_weights=0.5
    )
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 7, size=8)
    x = np.where(np.arange(6)[None, :] < lengths[:, None], rng.integers(1, 20, (8, 6)), 0)
    y = rng.integers(0, 3, (8, 6))
    return model, x, y


def test_masked_and_weighted_model_is_audited_on_its_training_loss():
    """Reference: Keras's own loss of a batch holding that one example (evaluate)."""
    model, x, y = _sequence_tagger()
    weights = np.linspace(0.5, 2.0, len(x))
    losses = compute_features(model, x, y, sample_weight=weights, batch_size=5)["loss"]
    expected = [
        model.evaluate(x[i : i + 1], y[i : i + 1], sample_weight=weights[i : i + 1], verbose=0)
        for i in range(len(x))
    ]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    # The check has power: a loss over every step, padding included, is different.
    logits = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    every_step = -special.log_softmax(logits, axis=-1)[
        np.arange(8)[:, None], np.arange(6)[None, :], y
    ].mean(axis=1)
    assert not np.allclose(losses, 0.5 * weights * every_step, rtol=1e-3)
    np.testing.assert_allclose(example_losses(model, x, y, weights), losses, rtol=1e-6)


def test_tiny_losses_of_memorised_examples_stay_distinct():
    """float32 crossentropy rounds these to 0; the audit evaluates the loss in float64."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.layers[0].set_weights([np.array([[10.0, -10.0], [0.0, 0.0]]), np.zeros(2)])
    x = np.array([[1.0, 0.0], [1.1, 0.0], [1.2, 0.0]], dtype="float32")
    y = np.zeros(3, dtype=int)
    losses = example_losses(model, x, y)
    margin = 20.0 * x[:, 0].astype(np.float64)  # z_0 - z_1
    np.testing.assert_allclose(losses, np.log1p(np.exp(-margin)), rtol=1e-5)
    assert len(set(losses.tolist())) == 3 and np.all(losses > 0)
    float32 = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    assert np.all(np.asarray(float32) == 0.0)  # what a float32 evaluation would give


def test_errors_name_the_argument():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
    with pytest.raises(ValueError, match=r"`y` must be class indices in \[0, 4\)"):
        compute_features(model, np.zeros((2, 3)), np.array([0, 7]))
    inputs = keras.Input((3,))
    two = keras.Model(inputs, [keras.layers.Dense(2)(inputs), keras.layers.Dense(2)(inputs)])
    with pytest.raises(ValueError, match="`model` must be a model with one output"):
        compute_features(two, np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="`batch_size` must be"):
        compute_features(model, np.zeros((2, 3)), np.array([0, 1]), batch_size=0)
    regression = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2), keras.layers.Reshape((2, 1))]
    )
    with pytest.raises(ValueError, match="`loss_fn` must be a per-example loss"):
        compute_features(regression, np.zeros((2, 3)), np.zeros((2, 2, 1)))
