"""MembershipInferenceAudit: figures in logs / History / CSVLogger, config, data handling."""

import csv

import keras
import numpy as np
import pytest
from scipy import special, stats
from sklearn.datasets import load_digits

from keras_safe.callbacks import MembershipInferenceAudit
from tests.testing import assert_config_round_trip


def _data():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype("float32"), y[order]
    return (x[:100], y[:100]), (x[100:200], y[100:200])


def _model():
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def test_figures_reach_history_and_csv_logger(tmp_path):
    members, non_members = _data()
    model = _model()
    audit = MembershipInferenceAudit(members, non_members, every=2, verbose=0)
    csv_path = tmp_path / "log.csv"
    history = model.fit(
        *members,
        epochs=4,
        batch_size=20,
        verbose=0,
        callbacks=[audit, keras.callbacks.CSVLogger(str(csv_path))],
    )
    auc = history.history["mia_auc"]
    tpr = history.history["mia_tpr_at_1pct_fpr"]
    assert len(auc) == len(tpr) == 4
    assert np.isnan(auc[0]) and np.isnan(auc[2])  # audited at epochs 2 and 4 only
    assert [epoch for epoch, _ in audit.reports] == [1, 3]

    # The last audit against an independent computation on the final model: the AUC of
    # the loss attack is the Mann-Whitney statistic of the numpy losses.
    def losses(x, y):
        logits = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
        return -special.log_softmax(logits, axis=1)[np.arange(len(y)), y]

    in_loss, out_loss = losses(*members), losses(*non_members)
    u = stats.mannwhitneyu(out_loss, in_loss).statistic
    assert auc[3] == pytest.approx(u / (len(in_loss) * len(out_loss)), abs=1e-6)
    assert auc[3] > 0.5
    assert 0.0 <= tpr[3] <= 1.0
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[3]["mia_auc"]) == pytest.approx(auc[3])


def test_several_attacks_log_each_and_the_maximum():
    members, non_members = _data()
    model = _model()
    audit = MembershipInferenceAudit(members, non_members, attacks=("loss", "entropy"), verbose=0)
    history = model.fit(*members, epochs=2, batch_size=50, verbose=0, callbacks=[audit])
    h = history.history
    for key in ("mia_loss_auc", "mia_entropy_auc", "mia_loss_tpr_at_1pct_fpr"):
        assert len(h[key]) == 2
    assert h["mia_auc"][-1] == max(h["mia_loss_auc"][-1], h["mia_entropy_auc"][-1])


def test_config_round_trip_and_data_is_needed_again():
    members, non_members = _data()
    audit = MembershipInferenceAudit(members, non_members, every=3, attacks=("loss", "confidence"))
    config = audit.get_config()
    assert config == {
        "every": 3,
        "attacks": ["loss", "confidence"],
        "batch_size": 256,
        "verbose": 1,
    }
    clone = assert_config_round_trip(audit)
    assert clone.members is None
    model = _model()
    with pytest.raises(ValueError, match="set_data"):
        model.fit(*members, epochs=1, verbose=0, callbacks=[clone])
    clone.set_data(members, non_members)
    clone.verbose = 0
    clone.every = 1
    history = model.fit(*members, epochs=1, verbose=0, callbacks=[clone])
    assert np.isfinite(history.history["mia_auc"][0])


def test_bad_arguments_raise():
    members, non_members = _data()
    with pytest.raises(ValueError, match="`every` must be"):
        MembershipInferenceAudit(members, non_members, every=0)
    with pytest.raises(ValueError, match="`every` must be"):
        MembershipInferenceAudit(members, non_members, every=1.5)
    with pytest.raises(ValueError, match=r"shadow models.*got \['lira_online', 'lira_offline'\]"):
        MembershipInferenceAudit(members, non_members, attacks=("lira",))
    with pytest.raises(ValueError, match="`attacks` must be registered attack names.*got 'nope'"):
        MembershipInferenceAudit(members, non_members, attacks=("nope",))
    with pytest.raises(ValueError, match="`non_members` must be an"):
        MembershipInferenceAudit(members, None)
    with pytest.raises(ValueError, match="`batch_size` must be"):
        MembershipInferenceAudit(members, non_members, batch_size=0)


def test_sample_weights_reach_the_audited_loss():
    """Members given as (x, y, sample_weight): the audit scores weight times the loss."""
    (x_in, y_in), non_members = _data()
    model = _model()
    weights = np.where(np.arange(100) % 2 == 0, 3.0, 0.5)
    audit = MembershipInferenceAudit((x_in, y_in, weights), non_members, verbose=0)
    model.fit(x_in, y_in, sample_weight=weights, epochs=1, verbose=0, callbacks=[audit])
    logits = np.asarray(model.predict(x_in, verbose=0), dtype=np.float64)
    losses = -special.log_softmax(logits, axis=1)[np.arange(100), y_in]
    report = audit.reports[0][1]
    np.testing.assert_allclose(report.features["loss"][0], weights * losses, rtol=1e-4)
