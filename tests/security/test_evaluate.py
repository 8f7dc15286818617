"""evaluate_robustness: figures recomputed by hand, masking checks on masked and plain models."""

import json

import numpy as np
import pytest
import tensorflow as tf

from keras_safe._validation import ArgumentError
from keras_safe.security import PGD, RobustnessReport, evaluate_robustness, get_evasion_attack
from keras_safe.security.evaluate import _masking_checks
from tests.security.conftest import accuracy, predict_labels

RANGE = {"clip_min": 0.0, "clip_max": 1.0}
CHECKS = {
    "accuracy_not_falling",
    "large_epsilon_not_near_zero",
    "gradient_free_beats_gradient",
    "single_step_beats_iterative",
}


@pytest.fixture(scope="module")
def plain_report(trained_mlp, digits_split):
    _, (x, y) = digits_split
    return evaluate_robustness(
        trained_mlp,
        x,
        y,
        epsilons=[0.03, 0.1, 0.2],
        attacks=["fgsm", "pgd", ("apgd", {"steps": 20})],
        seed=0,
        **RANGE,
    )


def test_plain_model_figures_and_no_masking(plain_report, trained_mlp, digits_split):
    _, (x, y) = digits_split
    report = plain_report
    assert report.clean_accuracy == accuracy(trained_mlp, x, y)
    assert report.attacks == ["fgsm", "pgd", "apgd", "square", "worst"]
    assert {c["check"] for c in report.checks} == CHECKS
    assert not report.masking_suspected, report.to_string()
    # An independent PGD run (other random start) lands within a few examples.
    x_adv = PGD(0.1, steps=20, seed=7, **RANGE).generate(trained_mlp, x, y)
    clean = predict_labels(trained_mlp, x) == y
    by_hand = np.mean(clean & (predict_labels(trained_mlp, x_adv) == y))
    assert report.accuracy("pgd", 0.1) == pytest.approx(by_hand, abs=0.03)
    for epsilon in report.epsilons:
        row_values = [report.accuracy(a, epsilon) for a in ("fgsm", "pgd", "apgd", "square")]
        assert report.robust_accuracy(epsilon) <= min(row_values)
        assert all(v <= report.clean_accuracy for v in row_values)
    # Accuracy falls with epsilon; the attacks use their whole budget.
    curve = [report.accuracy("pgd", e) for e in report.epsilons]
    assert curve == sorted(curve, reverse=True) and curve[-1] < 0.1
    for row in report.rows:
        if row["attack"] != "worst":
            assert row["max_perturbation"] <= row["epsilon"] * (1 + 1e-5)
            assert row["success_rate"] == pytest.approx(
                1 - row["accuracy"] / report.clean_accuracy, abs=1e-9
            )
    assert report.metadata["large_epsilon"] == 1.0
    assert report.metadata["large_epsilon_accuracy"] == 0.0


@pytest.mark.parametrize("kind", ["saturated", "quantised"])
def test_masking_checks_fire_on_a_masked_model(masked_models, trained_mlp, digits_split, kind):
    _, (x, y) = digits_split
    model = masked_models[kind]
    # It predicts what the plain model predicts: only its gradients differ.
    np.testing.assert_array_equal(predict_labels(model, x), predict_labels(trained_mlp, x))
    report = evaluate_robustness(
        model, x, y, epsilons=[0.1, 0.2], attacks=["fgsm", "pgd"], seed=0, **RANGE
    )
    assert report.masking_suspected
    fired = set(report.fired_checks())
    assert {
        "large_epsilon_not_near_zero",
        "gradient_free_beats_gradient",
        "accuracy_not_falling",
    } <= fired
    assert "SUSPECTED" in report.to_string()
    # PGD, fooled by the mask, reports a robustness the same weights do not have.
    plain = PGD(0.2, steps=20, seed=0, **RANGE).generate(trained_mlp, x, y)
    assert report.accuracy("pgd", 0.2) > accuracy(trained_mlp, plain, y) + 0.5
    assert report.accuracy("square", 0.2) < report.accuracy("pgd", 0.2) - 0.1


def test_l2_evaluation_of_the_plain_model(trained_mlp, digits_split):
    _, (x, y) = digits_split
    report = evaluate_robustness(
        trained_mlp,
        x[:150],
        y[:150],
        epsilons=[0.5, 1.0],
        norm="l2",
        attacks=["pgd"],
        seed=0,
        **RANGE,
    )
    assert not report.masking_suspected, report.to_string()
    assert report.metadata["large_epsilon"] == pytest.approx(8.0)
    for row in report.rows:
        if row["attack"] != "worst":
            assert row["max_perturbation"] <= row["epsilon"] * (1 + 1e-5)


def test_report_round_trips_and_renders(plain_report, tmp_path):
    report = plain_report
    path = report.to_json(tmp_path / "robustness.json")
    again = RobustnessReport.from_json(path)
    assert again.to_dict() == report.to_dict()
    assert RobustnessReport.from_json(report.to_json()).rows == report.rows
    json.loads(report.to_json())
    frame = report.to_dataframe()
    assert len(frame) == len(report.rows) and "accuracy" in frame.columns
    text = report.to_string()
    assert "no sign" in text and "worst" in text
    ax = report.plot()
    assert len(ax.get_lines()) == len(report.attacks)
    assert "epsilon" in ax.get_xlabel()
    assert "RobustnessReport" in repr(report)
    with pytest.raises(KeyError, match="epsilons"):
        report.accuracy("pgd", 0.5)


def test_dataset_input_and_attack_settings(trained_mlp, digits_split):
    _, (x, y) = digits_split
    dataset = tf.data.Dataset.from_tensor_slices((x[:100], np.eye(10)[y[:100]])).batch(32)
    attacks = [("pgd", {"steps": 5}), PGD(0.5, steps=3, restarts=2, loss="margin")]
    with pytest.raises(ArgumentError, match="`attacks`"):  # the same name twice
        evaluate_robustness(trained_mlp, dataset, epsilons=[0.1], attacks=attacks, **RANGE)
    report = evaluate_robustness(
        trained_mlp,
        dataset,
        epsilons=[0.1],
        attacks=[attacks[1], "fgsm"],
        masking_checks=False,
        **RANGE,
    )
    assert report.attacks == ["pgd", "fgsm", "worst"] and report.checks == []
    assert report.clean_accuracy == accuracy(trained_mlp, x[:100], y[:100])


@pytest.mark.parametrize(
    "settings, argument",
    [
        ({"epsilons": []}, "epsilons"),
        ({"epsilons": [0.0, 0.1]}, "epsilons"),
        ({"attacks": ["pgd", "pgd"]}, "attacks"),
        ({"attacks": ["deepfool"]}, "attack"),
        ({"gradient_free": "pgd"}, "gradient_free"),
        ({"tolerance": 2.0}, "tolerance"),
        ({"norm": "l0"}, "norm"),
    ],
)
def test_bad_arguments_name_the_argument(trained_mlp, digits_split, settings, argument):
    _, (x, y) = digits_split
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        evaluate_robustness(trained_mlp, x[:10], y[:10], **settings)
    with pytest.raises(ArgumentError, match="`y`"):
        evaluate_robustness(trained_mlp, x[:10])


def _rows(table):
    rows = []
    for name, curve in table.items():
        for epsilon, value in curve.items():
            rows.append({"attack": name, "epsilon": epsilon, "accuracy": value})
    specs = [(name, {}, get_evasion_attack(name)) for name in table]
    return rows, specs


@pytest.mark.parametrize(
    "table, large_accuracy, fired",
    [
        # A healthy evaluation: everything falls, PGD strongest, Square weaker.
        (
            {
                "fgsm": {0.1: 0.5, 0.2: 0.1},
                "pgd": {0.1: 0.4, 0.2: 0.0},
                "square": {0.1: 0.45, 0.2: 0.02},
            },
            0.0,
            set(),
        ),
        # Accuracy rises with epsilon.
        (
            {"pgd": {0.1: 0.4, 0.2: 0.5}, "square": {0.1: 0.45, 0.2: 0.6}},
            0.0,
            {"accuracy_not_falling"},
        ),
        # Accuracy stays at the clean level (0.9).
        (
            {"pgd": {0.1: 0.9, 0.2: 0.89}, "square": {0.1: 0.9, 0.2: 0.89}},
            0.0,
            {"accuracy_not_falling"},
        ),
        # The unbounded attack leaves accuracy.
        ({"pgd": {0.1: 0.4, 0.2: 0.1}}, 0.3, {"large_epsilon_not_near_zero"}),
        # Gradient-free stronger than every gradient attack.
        (
            {"fgsm": {0.1: 0.5}, "pgd": {0.1: 0.4}, "square": {0.1: 0.2}},
            0.0,
            {"gradient_free_beats_gradient"},
        ),
        # One step stronger than many.
        ({"fgsm": {0.1: 0.3}, "apgd": {0.1: 0.5}}, 0.0, {"single_step_beats_iterative"}),
    ],
)
def test_each_masking_check_fires_on_its_sign(table, large_accuracy, fired):
    rows, specs = _rows(table)
    epsilons = sorted({r["epsilon"] for r in rows})
    checks = _masking_checks(rows, 0.9, specs, epsilons, 0.03, (1.0, large_accuracy, 0.05))
    assert {c["check"] for c in checks if c["fired"]} == fired, checks
