"""membership_inference: attacks on overfitted and membership-independent models, losses, slices."""

import time

import keras
import numpy as np
import pytest
from scipy import special, stats

from keras_safe.audit import compute_features, membership_inference
from tests.audit.conftest import make_mlp


def _null_sd(n_in, n_out):
    """Standard deviation of the ROC AUC when scores do not depend on membership."""
    return np.sqrt((n_in + n_out + 1) / (12.0 * n_in * n_out))


def _numpy_losses(model, x, y):
    logits = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    return -special.log_softmax(logits, axis=1)[np.arange(len(y)), y]


def test_loss_attack_on_overfitted_model(overfit):
    model, members, non_members = overfit
    report = membership_inference(model, members, non_members, attacks=("loss", "learned"))
    loss = report.get("loss")
    # Independent reference: the Mann-Whitney U statistic of numpy losses (lower loss = member).
    in_loss = _numpy_losses(model, *members)
    out_loss = _numpy_losses(model, *non_members)
    u = stats.mannwhitneyu(out_loss, in_loss).statistic
    assert loss["auc"] == pytest.approx(u / (len(in_loss) * len(out_loss)), abs=1e-6)
    # Clearly above chance: more than 4 null standard deviations and above 0.6.
    assert loss["auc"] > max(0.6, 0.5 + 4 * _null_sd(150, 150)), loss
    assert loss["advantage"] > 0.15
    assert report.get("learned")["auc"] > 0.6
    # The largest advantage over thresholds, by brute force on the numpy losses.
    thresholds = np.unique(np.concatenate([in_loss, out_loss]))
    brute = max(np.mean(in_loss <= t) - np.mean(out_loss <= t) for t in thresholds)
    assert loss["advantage"] == pytest.approx(brute, abs=1e-6)


def test_model_independent_of_membership_gives_chance_auc(digits_data):
    """A model trained on other data: its predictions do not depend on the audited membership."""
    x, y = digits_data
    model = make_mlp()
    model.fit(x[1000:], y[1000:], epochs=5, batch_size=64, verbose=0)
    members, non_members = (x[:400], y[:400]), (x[400:800], y[400:800])
    report = membership_inference(
        model,
        members,
        non_members,
        attacks=("loss", "confidence", "entropy", "learned"),
        learned_attack_model="gradient_boosting",  # would overfit badly if scored in-sample
    )
    bound = 4 * _null_sd(400, 400)
    for attack, figures in report.summary().items():
        assert abs(figures["auc"] - 0.5) < bound, (attack, figures)
        assert figures["tpr_at_1%_fpr"] < 0.06, (attack, figures)


def test_identical_predictions_give_exactly_chance():
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, kernel_initializer="zeros")])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    members = (rng.normal(size=(60, 5)), rng.integers(0, 3, 60))
    non_members = (rng.normal(size=(60, 5)), rng.integers(0, 3, 60))
    report = membership_inference(
        model, members, non_members, attacks=("loss", "confidence"), min_slice_size=5
    )
    for row in report.results:
        assert row["auc"] == 0.5 and row["advantage"] == 0.0 and row["epsilon_lower_bound"] == 0.0


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


def test_slices_follow_labels_and_correctness(overfit):
    model, members, non_members = overfit
    report = membership_inference(model, members, non_members, attacks=("loss",), min_slice_size=10)
    predicted_in = np.argmax(model.predict(members[0], verbose=0), axis=1)
    predicted_out = np.argmax(model.predict(non_members[0], verbose=0), axis=1)
    slices = {row["slice"]: row for row in report.results}
    for k in range(10):
        n_in, n_out = np.sum(members[1] == k), np.sum(non_members[1] == k)
        if min(n_in, n_out) >= 10:
            assert (slices[f"class={k}"]["n_members"], slices[f"class={k}"]["n_non_members"]) == (
                n_in,
                n_out,
            )
        else:
            assert f"class={k}" not in slices
    n_out_wrong = int(np.sum(predicted_out != non_members[1]))
    n_in_wrong = int(np.sum(predicted_in != members[1]))
    if min(n_in_wrong, n_out_wrong) >= 10:
        assert slices["incorrect"]["n_non_members"] == n_out_wrong
    else:
        assert "incorrect" not in slices
    assert slices["correct"]["n_members"] == len(members[1]) - n_in_wrong
    only_all = membership_inference(model, members, non_members, attacks="loss", slices=False)
    assert [row["slice"] for row in only_all.results] == ["all"]


def test_demo_call_is_fast(digits_data):
    x, y = digits_data
    model = make_mlp()
    model.fit(x[:500], y[:500], epochs=1, verbose=0)
    durations = []
    for _ in range(2):
        start = time.perf_counter()
        report = membership_inference(
            model, (x[:500], y[:500]), (x[500:1000], y[500:1000]), attacks=("loss", "confidence")
        )
        durations.append(time.perf_counter() - start)
    assert min(durations) < 2.0, durations
    assert set(report.summary()) == {"loss", "confidence"}
    assert set(report.summary()["loss"]) == {
        "auc",
        "advantage",
        "tpr_at_0.1%_fpr",
        "tpr_at_1%_fpr",
        "epsilon_lower_bound",
    }


def test_bad_input_raises(overfit):
    model, members, non_members = overfit
    with pytest.raises(ValueError, match="Unknown attack"):
        membership_inference(model, members, non_members, attacks=("los",))
    with pytest.raises(ValueError, match="pair"):
        membership_inference(model, members[0], non_members)
    with pytest.raises(ValueError, match="labels"):
        membership_inference(model, (members[0], members[1][:10]), non_members)
    with pytest.raises(ValueError, match="model_factory"):
        membership_inference(model, members, non_members, attacks=("lira",))
    with pytest.raises(ValueError, match="cv_folds"):
        membership_inference(
            model, (members[0][:3], members[1][:3]), non_members, attacks=("learned",)
        )
    regression = keras.Sequential([keras.Input((64,)), keras.layers.Dense(1)])
    regression.compile("sgd", "mse")
    targets = np.linspace(-3, 3, 150)
    report = membership_inference(
        regression, (members[0], targets), (non_members[0], targets), attacks=("loss",)
    )
    assert report.get("loss")["n_members"] == 150
    with pytest.raises(ValueError, match="classifier"):
        membership_inference(
            regression, (members[0], targets), (non_members[0], targets), attacks=("entropy",)
        )
