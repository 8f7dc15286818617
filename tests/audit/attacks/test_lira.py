"""LiRA: Gaussian likelihood ratios against a per-example loop, shadow models end to end."""

import keras
import numpy as np
import pytest
from scipy import stats

from keras_safe.audit import membership_inference
from keras_safe.audit.attacks.lira import _balanced_keep, lira_scores, train_shadow_models
from tests.audit.conftest import OVERFIT_FIT, make_mlp


def _hand_made(num_shadows=6, n=5, seed=0):
    rng = np.random.default_rng(seed)
    keep = _balanced_keep(num_shadows, n, rng)
    observations = rng.normal(size=(num_shadows, n)) + 2.0 * keep
    target = rng.normal(size=n) + 1.0
    return keep, observations, target


def test_balanced_keep_puts_every_example_in_half_the_shadows():
    keep = _balanced_keep(8, 300, np.random.default_rng(0))
    np.testing.assert_array_equal(keep.sum(axis=0), 4)
    # Shadow training sets are random halves: about n/2 examples each.
    assert np.all(np.abs(keep.sum(axis=1) - 150) < 40)


def test_online_and_offline_scores_match_a_per_example_loop():
    keep, obs, target = _hand_made()
    online = lira_scores(target, keep, obs, online=True, fix_variance=False)
    offline = lira_scores(target, keep, obs, online=False, fix_variance=False)
    for i in range(len(target)):
        ins, outs = obs[keep[:, i], i], obs[~keep[:, i], i]
        expected = stats.norm.logpdf(target[i], ins.mean(), ins.std(ddof=1)) - stats.norm.logpdf(
            target[i], outs.mean(), outs.std(ddof=1)
        )
        assert online[i] == pytest.approx(expected, rel=1e-9)
        # Offline: one-sided test Pr[Z < phi] for Z ~ N(mu_out, s_out^2); scores are its z-value.
        p = stats.norm.cdf(target[i], outs.mean(), outs.std(ddof=1))
        assert stats.norm.cdf(offline[i]) == pytest.approx(p, rel=1e-9)


def test_fixed_variance_pools_the_deviations():
    keep, obs, target = _hand_made(num_shadows=4, n=6, seed=3)
    scores = lira_scores(target, keep, obs, online=True, fix_variance=True)
    dev_in, dev_out = [], []
    for i in range(len(target)):
        ins, outs = obs[keep[:, i], i], obs[~keep[:, i], i]
        dev_in += list(ins - ins.mean())
        dev_out += list(outs - outs.mean())
    s_in = np.sqrt(np.sum(np.square(dev_in)) / (len(dev_in) - 1))
    s_out = np.sqrt(np.sum(np.square(dev_out)) / (len(dev_out) - 1))
    for i in range(len(target)):
        ins, outs = obs[keep[:, i], i], obs[~keep[:, i], i]
        expected = stats.norm.logpdf(target[i], ins.mean(), s_in) - stats.norm.logpdf(
            target[i], outs.mean(), s_out
        )
        assert scores[i] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="num_shadows"):
        lira_scores(target, keep[:2], obs[:2], online=True, fix_variance=False)


def test_lira_end_to_end_on_an_overfitted_model(overfit, digits_data):
    model, members, non_members = overfit
    made = []

    def factory():
        made.append(1)
        return make_mlp()

    report = membership_inference(
        model,
        members,
        non_members,
        attacks=("loss", "lira"),
        model_factory=factory,
        num_shadows=4,
        shadow_fit_kwargs=OVERFIT_FIT,
        slices=False,
    )
    summary = report.summary()
    assert set(summary) == {"loss", "lira_online", "lira_offline"}
    assert summary["lira_online"]["auc"] > 0.6, summary
    assert summary["lira_offline"]["auc"] > 0.55, summary
    assert report.metadata["num_shadows"] == 4 and report.metadata["lira_fix_variance"]
    assert len(made) == 4  # online and offline share one set of shadow models


def test_shadow_models_train_on_their_halves(digits_data):
    x, y = digits_data
    calls = []

    def factory():
        model = make_mlp(hidden=16)
        original_fit = model.fit

        def fit(xs, ys, **kwargs):
            calls.append(len(ys))
            return original_fit(xs, ys, **kwargs)

        model.fit = fit
        return model

    keep, obs = train_shadow_models(
        factory,
        x[:40],
        y[:40],
        num_shadows=2,
        fit_kwargs={"epochs": 1},
        extra_data=(x[40:80], y[40:80]),
    )
    assert keep.shape == obs.shape == (2, 40)
    np.testing.assert_array_equal(keep.sum(axis=0), 1)
    # Each shadow: its half of the pool plus about half of the 40 extra examples.
    for s, count in enumerate(calls):
        assert keep[s].sum() + 5 <= count <= keep[s].sum() + 35
    assert np.all(np.isfinite(obs))

    def uncompiled():
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])

    with pytest.raises(ValueError, match="not compiled"):
        train_shadow_models(uncompiled, x[:20], y[:20], num_shadows=2)
    with pytest.raises(ValueError, match="num_shadows"):
        train_shadow_models(make_mlp, x[:20], y[:20], num_shadows=1)
