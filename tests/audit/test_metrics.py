"""Audit metrics against brute-force computations and independent statistical references."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from keras_safe.audit import (
    attack_metrics,
    clopper_pearson,
    epsilon_lower_bound,
    guessing_epsilon_lower_bound,
)
from keras_safe.audit.metrics import tpr_at_fpr

# Hand-made scores with ties inside and across the groups.
MEMBERS = np.array([0.95, 0.9, 0.9, 0.8, 0.7, 0.7, 0.6, 0.4, 0.3, 0.1])
NON_MEMBERS = np.array([0.9, 0.7, 0.5, 0.5, 0.35, 0.3, 0.2, 0.2, 0.1, 0.05, 0.0, -0.2])


def _brute_force_rates(members, non_members):
    """(FPR, TPR) of "member if score >= t" for every distinct threshold, plus t = +inf."""
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([members, non_members]))])
    tpr = np.array([np.mean(members >= t) for t in thresholds])
    fpr = np.array([np.mean(non_members >= t) for t in thresholds])
    return fpr, tpr


def _brute_force_auc(members, non_members):
    total = 0.0
    for a in members:
        for b in non_members:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(members) * len(non_members))


def _cp_by_inversion(k, n, level):
    """Clopper-Pearson bounds by solving the binomial tail equations with a root finder."""
    alpha = 1 - level
    low = (
        0.0 if k == 0 else optimize.brentq(lambda p: stats.binom.sf(k - 1, n, p) - alpha / 2, 0, 1)
    )
    high = 1.0 if k == n else optimize.brentq(lambda p: stats.binom.cdf(k, n, p) - alpha / 2, 0, 1)
    return low, high


def _brute_force_epsilon(members, non_members, delta, level, which):
    fpr, tpr = _brute_force_rates(members, non_members)
    n_pos, n_neg = len(members), len(non_members)
    best = 0.0
    for f, t in zip(fpr, tpr, strict=True):
        fp, fn = round(f * n_neg), round((1 - t) * n_pos)
        fp_low, fp_high = _cp_by_inversion(fp, n_neg, level)
        fn_low, fn_high = _cp_by_inversion(fn, n_pos, level)
        if which == "lower":
            a, b = fp_high, fn_high
        elif which == "estimate":
            a, b = fp / n_neg, fn / n_pos
        else:
            a, b = fp_low, fn_low
        for x_rate, y_rate in ((a, b), (b, a)):  # log((1 - delta - y) / x)
            if 1 - delta - y_rate <= 0:
                continue
            value = math.inf if x_rate == 0 else math.log((1 - delta - y_rate) / x_rate)
            best = max(best, value)
    return best


def test_metrics_match_brute_force_on_hand_made_scores():
    got = attack_metrics(MEMBERS, NON_MEMBERS, delta=1e-3, confidence_level=0.9)
    fpr, tpr = _brute_force_rates(MEMBERS, NON_MEMBERS)
    assert got["auc"] == pytest.approx(_brute_force_auc(MEMBERS, NON_MEMBERS), abs=1e-12)
    assert got["advantage"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    for target, key in ((0.001, "tpr_at_0.1%_fpr"), (0.01, "tpr_at_1%_fpr")):
        assert got[key] == pytest.approx(np.max(tpr[fpr <= target]), abs=1e-12)
    # 1 / 12 non-members: 0.1 allows exactly one false positive.
    assert tpr_at_fpr(fpr, tpr, 0.1) == pytest.approx(np.max(tpr[fpr <= 0.1]))
    for key, which in (
        ("epsilon_lower_bound", "lower"),
        ("epsilon_estimate", "estimate"),
        ("epsilon_ci_high", "upper"),
    ):
        expected = _brute_force_epsilon(MEMBERS, NON_MEMBERS, 1e-3, 0.9, which)
        assert got[key] == pytest.approx(expected, rel=1e-6), key
    assert got["epsilon_lower_bound"] <= got["epsilon_estimate"] <= got["epsilon_ci_high"]
    assert got["n_members"] == 10 and got["n_non_members"] == 12


def test_hand_checked_values():
    # 10 members above 10 non-members: perfect separation.
    m = attack_metrics(np.arange(10.0) + 10, np.arange(10.0), delta=0.0)
    assert m["auc"] == 1.0 and m["advantage"] == 1.0 and m["tpr_at_0.1%_fpr"] == 1.0
    # With 0 errors out of 10 each, the 95% CP upper bound is 1 - 0.025**(1/10) (closed form).
    u = 1 - 0.025 ** (1 / 10)
    assert m["epsilon_lower_bound"] == pytest.approx(math.log((1 - u) / u), rel=1e-9)
    assert m["epsilon_estimate"] == math.inf
    # Identical scores: no attack beats chance and nothing is certified.
    same = attack_metrics(np.ones(50), np.ones(50))
    assert same["auc"] == 0.5 and same["advantage"] == 0.0
    assert same["tpr_at_1%_fpr"] == 0.0 and same["epsilon_lower_bound"] == 0.0


@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (20, 20), (7, 1000)])
def test_clopper_pearson_matches_binomial_inversion(k, n):
    low, high = clopper_pearson(k, n, 0.95)
    ref_low, ref_high = _cp_by_inversion(k, n, 0.95)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)


def test_epsilon_lower_bound_is_valid_for_gaussian_dp():
    """Scores N(mu, 1) vs N(0, 1) are exactly what mu-GDP allows (Dong, Roth & Su 2019).

    The (epsilon, delta) curve of mu-GDP is delta(eps) = Phi(-eps/mu + mu/2) -
    e^eps Phi(-eps/mu - mu/2); the empirical lower bound must stay below it in (almost) every
    repetition.
    """
    mu, delta = 1.0, 1e-3

    def delta_of(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
            -eps / mu - mu / 2
        )

    true_eps = optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 20.0)
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        members = rng.normal(mu, 1.0, 2000)
        non_members = rng.normal(0.0, 1.0, 2000)
        bounds.append(epsilon_lower_bound(members, non_members, delta=delta))
    bounds = np.array(bounds)
    assert np.mean(bounds > true_eps) <= 0.1, (bounds, true_eps)
    # ... and is informative: well above 0 for this strong a signal.
    assert np.median(bounds) > 0.5 * true_eps, (bounds, true_eps)


def test_guessing_bound_closed_form_and_brute_force():
    # All r guesses right, delta = 0: the bound solves q**r = significance, eps = logit(q).
    for r in (10, 100, 500):
        q = 0.05 ** (1 / r)
        expected = math.log(q / (1 - q))
        assert guessing_epsilon_lower_bound(1000, r, r, 0.0, 0.05) == pytest.approx(
            expected, abs=1e-5
        )
    # General case: bisection on the binomial tail, done here independently.
    m, r, v = 400, 200, 150

    def p_value(eps):
        q = 1 / (1 + math.exp(-eps))
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))

    expected = optimize.bisect(lambda e: p_value(e) - 0.05, 0.0, 10.0, xtol=1e-9)
    assert guessing_epsilon_lower_bound(m, r, v, 0.0, 0.05) == pytest.approx(expected, abs=1e-5)
    # A positive delta only weakens the claim.
    assert guessing_epsilon_lower_bound(m, r, v, 1e-4, 0.05) < expected
    # Chance-level guessing certifies nothing.
    assert guessing_epsilon_lower_bound(m, r, r // 2, 0.0, 0.05) == 0.0


def test_guessing_bound_is_valid_for_randomized_response():
    """Guesses that are right with probability e^eps/(1+e^eps) are what eps-DP allows."""
    eps, m = 1.0, 300
    q = 1 / (1 + math.exp(-eps))
    rng = np.random.default_rng(1)
    correct = rng.binomial(m, q, size=200)
    bounds = np.array([guessing_epsilon_lower_bound(m, m, int(v), 0.0, 0.05) for v in correct])
    # The test's false claim rate is at most 5%; allow sampling error on 200 repetitions.
    assert np.mean(bounds > eps) <= 0.1
    assert np.median(bounds) > 0.3


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: attack_metrics([], [1.0]), "member_scores"),
        (lambda: attack_metrics([1.0, np.nan], [1.0]), "non-finite"),
        (lambda: attack_metrics([1.0], [0.0], delta=1.5), "delta"),
        (lambda: attack_metrics([1.0], [0.0], confidence_level=1.0), "confidence_level"),
        (lambda: guessing_epsilon_lower_bound(10, 5, 6), "num_correct"),
        (lambda: guessing_epsilon_lower_bound(10, 5, 3, significance=0), "significance"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
