"""membership_inference: overfitted and membership-independent models, slices, weights, errors."""

import time

import keras
import numpy as np
import pytest
from scipy import special, stats

from keras_safe.audit import membership_inference
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
    with pytest.raises(ValueError, match="`attacks` must be registered attack names.*got 'los'"):
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
    with pytest.raises(ValueError, match="classifier.*got 'entropy'"):
        membership_inference(
            regression, (members[0], targets), (non_members[0], targets), attacks=("entropy",)
        )
    with pytest.raises(ValueError, match="`delta` must be"):
        membership_inference(model, members, non_members, attacks="loss", delta=1.0)
    with pytest.raises(ValueError, match="`min_slice_size` must be"):
        membership_inference(model, members, non_members, attacks="loss", min_slice_size=0)
    with pytest.raises(ValueError, match="`batch_size` must be"):
        membership_inference(model, members, non_members, attacks="loss", batch_size=0)


def test_sample_weights_scale_the_audited_loss(overfit):
    """A weighted training loss is audited weighted: scores are minus weight times the loss."""
    model, members, non_members = overfit
    rng = np.random.default_rng(0)
    w_in, w_out = rng.uniform(0.5, 2.0, 150), rng.uniform(0.5, 2.0, 150)
    report = membership_inference(
        model, (*members, w_in), (*non_members, w_out), attacks=("loss",), slices=False
    )
    np.testing.assert_allclose(
        report.scores["loss"][0], -w_in * _numpy_losses(model, *members), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        report.features["loss"][1], w_out * _numpy_losses(model, *non_members), rtol=1e-4
    )
    u = stats.mannwhitneyu(
        w_out * _numpy_losses(model, *non_members), w_in * _numpy_losses(model, *members)
    ).statistic
    assert report.get("loss")["auc"] == pytest.approx(u / 150**2, abs=1e-6)
