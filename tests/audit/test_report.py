"""AuditReport: table, DataFrame, JSON round trip and plots."""

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

from keras_safe.audit import AuditReport, attack_metrics, membership_inference

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def report(overfit):
    model, members, non_members = overfit
    return membership_inference(
        model, members, non_members, attacks=("loss", "confidence", "entropy"), min_slice_size=5
    )


def test_table_and_dataframe(report):
    text = str(report)
    for attack in ("loss", "confidence", "entropy"):
        assert attack in text
    assert "AUC" in text and "TPR@1%" in text
    every = report.to_string(slices="every")
    assert every.count("\n") >= len(report.results)
    frame = report.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == len(report.results)
    all_rows = frame[frame["slice"] == "all"].set_index("attack")
    for attack, figures in report.summary().items():
        for name, value in figures.items():
            assert all_rows.loc[attack, name] == pytest.approx(value)
    worst = report.most_vulnerable("auc")
    assert worst["auc"] == frame["auc"].max()
    with pytest.raises(KeyError, match="lira"):
        report.get("lira")


def test_json_round_trip(report, tmp_path):
    path = report.to_json(tmp_path / "audit.json")
    data = json.loads(open(path).read())
    assert {"results", "metadata", "scores", "features"} <= set(data)
    loaded = AuditReport.from_json(path)
    assert loaded.summary() == report.summary()
    assert loaded.results == report.results
    np.testing.assert_allclose(loaded.scores["loss"][0], report.scores["loss"][0])
    # Metrics recomputed from the stored scores agree (no information lost on the way).
    recomputed = attack_metrics(*loaded.scores["loss"], delta=loaded.metadata["delta"])
    assert recomputed["auc"] == pytest.approx(report.get("loss")["auc"])
    small = json.loads(report.to_json(include_scores=False))
    assert "scores" not in small


def test_infinite_values_survive_json():
    row = {"attack": "loss", "slice": "all", **attack_metrics([5.0, 4.0], [1.0, 0.0], delta=0.0)}
    assert row["epsilon_estimate"] == float("inf")
    loaded = AuditReport.from_json(AuditReport([row]).to_json())
    assert loaded.results[0]["epsilon_estimate"] == float("inf")


def test_plots(report):
    ax = report.plot_roc()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.get_lines()) == 4  # three attacks and the chance line
    fpr, tpr = report.roc_curve("loss")
    line = ax.get_lines()[0]
    np.testing.assert_allclose(line.get_xdata(), fpr)
    np.testing.assert_allclose(line.get_ydata(), tpr)
    linear = report.plot_roc(log=False)
    assert linear.get_xscale() == "linear"
    hist = report.plot_histograms("loss")
    assert hist.get_xscale() == "log" and len(hist.patches) > 0
    assert report.plot_histograms("confidence").get_xscale() == "linear"
    with pytest.raises(KeyError, match="feature"):
        report.plot_histograms("nope")
    import matplotlib.pyplot as plt

    plt.close("all")
