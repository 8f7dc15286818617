"""Threshold attacks: each score is its feature with the right sign, against numpy references."""

import numpy as np
import pytest
from scipy import special, stats

from keras_safe.audit import membership_inference


def test_threshold_scores_against_numpy(overfit):
    model, members, non_members = overfit
    report = membership_inference(
        model,
        members,
        non_members,
        attacks=("loss", "confidence", "entropy", "modified_entropy"),
        slices=False,
    )
    for part, (x, y) in enumerate((members, non_members)):
        z = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
        logp = special.log_softmax(z, axis=1)
        p = np.exp(logp)
        rows = np.arange(len(y))
        p_true = p[rows, y]
        # Song & Mittal 2021: -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j).
        log1mp = np.log(np.maximum(1.0 - p, 1e-30))
        others = (p * log1mp).sum(axis=1) - p_true * log1mp[rows, y]
        expected = {
            "loss": logp[rows, y],  # minus the loss
            "confidence": p_true,
            "entropy": (p * logp).sum(axis=1),  # minus the entropy
            "modified_entropy": (1.0 - p_true) * logp[rows, y] + others,
        }
        for name, values in expected.items():
            np.testing.assert_allclose(
                report.scores[name][part], values, rtol=2e-4, atol=1e-6, err_msg=name
            )
    # Larger score = member: on a memorising model every threshold attack beats chance.
    for name, figures in report.summary().items():
        assert figures["auc"] > 0.6, (name, figures)
    u = stats.mannwhitneyu(report.scores["entropy"][0], report.scores["entropy"][1]).statistic
    assert report.get("entropy")["auc"] == pytest.approx(u / 150**2, abs=1e-9)
