"""The DP mechanisms of the preprocessing layers: noise scales, ranges, argument checks.

Every Laplace draw is checked against its calibration, sensitivity / epsilon (Dwork et al.
2006): a noisy count has sensitivity 1, a sum of values clipped to `[lo, hi]` and centred on
the middle `(hi - lo) / 2`, a sum of their squares `((hi - lo) / 2)^2`; `dp_mean` spends
`epsilon / 2` on each of its count and sum, `dp_mean_std` `epsilon / 3` on each of its three.
The data are chosen so that each output reveals one noise draw (a centred sum of 0, a count far
above its noise), and 50,000 draws per mechanism are checked with `tests.statistical`: an exact
interval at the 1e-7 level that a scale 5% off falls outside of. The exponential mechanism of
`dp_quantile` (Smith 2011) is checked the same way, through the distance of the chosen interval
from the target rank. The layers' budget split (`dp_epsilon / num_features` per feature) is
checked on 10,000 features at once.
"""

import math

import numpy as np
import pytest
import scipy.stats

from keras_safe.preprocessing import Imputer, OutlierClipper, RobustNormalization, _dp_stats
from tests.statistical import ALPHA, Z, assert_laplace_scale

DRAWS = 50_000


def _draws(mechanism, seed, count=DRAWS):
    rng = np.random.default_rng(seed)
    return np.array([mechanism(rng) for _ in range(count)], "float64")


def test_dp_count_noise_is_laplace_one_over_epsilon():
    eps, n = 0.7, 123
    noisy = _draws(lambda rng: _dp_stats.dp_count(n, eps, rng), seed=11)
    assert_laplace_scale(noisy - n, 1.0 / eps)


def test_dp_mean_sum_noise_is_laplace_half_over_epsilon_half():
    # Values at the middle of [lo, hi]: the centred sum is 0 and mean - mid = L / (n + L'),
    # with L ~ Laplace(half / (eps / 2)); the count's noise L' (scale 2) moves n = 800 by 0.25%.
    eps, lo, hi, n = 1.0, -3.0, 5.0, 800
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    values = np.full(n, mid)
    means = _draws(lambda rng: _dp_stats.dp_mean(values, lo, hi, eps, rng), seed=12)
    assert_laplace_scale((means - mid) * n, half / (eps / 2))


def test_dp_mean_std_sum_and_squares_noise_are_laplace_of_their_scales():
    # Values mid +- a: the centred sum is 0 and the centred sum of squares n a^2, so
    # mean - mid = L1 / count and std^2 + (mean - mid)^2 = (n a^2 + L2) / count: each output
    # reveals one draw. a = half / 8 keeps the count's noise out of the second (1/64 of the
    # scale) and the variance positive (n a^2 is 12.5 scales of L2).
    eps, lo, hi, n = 3.0, -3.0, 5.0, 800
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    a = half / 8
    values = mid + a * np.tile([1.0, -1.0], n // 2)
    rng = np.random.default_rng(13)
    outputs = np.array([_dp_stats.dp_mean_std(values, lo, hi, eps, rng) for _ in range(DRAWS)])
    centred, std = outputs[:, 0] - mid, outputs[:, 1]
    assert_laplace_scale(centred * n, half / (eps / 3))
    assert_laplace_scale((std**2 + centred**2) * n - n * a * a, half**2 / (eps / 3))


class _RecordingGenerator:
    """A numpy generator that records the scale of every Laplace draw."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.laplace_scales = []

    def laplace(self, loc, scale):
        assert loc == 0.0
        self.laplace_scales.append(float(scale))
        return self.rng.laplace(loc, scale)

    def __getattr__(self, name):
        return getattr(self.rng, name)


@pytest.mark.parametrize(
    "mechanism, expected",
    [
        (lambda v, lo, hi, e, rng: _dp_stats.dp_count(len(v), e, rng), lambda e, h: [1 / e]),
        (_dp_stats.dp_mean, lambda e, h: [1 / (e / 2), h / (e / 2)]),
        (_dp_stats.dp_mean_std, lambda e, h: [1 / (e / 3), h / (e / 3), h * h / (e / 3)]),
    ],
    ids=["count", "mean", "mean_std"],
)
def test_every_laplace_draw_has_sensitivity_over_its_budget_share(mechanism, expected):
    # The count inside dp_mean and dp_mean_std barely shows in their outputs (n is far above
    # its noise): its calibration is checked here, draw by draw.
    rng = _RecordingGenerator(14)
    eps, lo, hi = 0.9, -1.0, 3.0
    mechanism(np.linspace(lo, hi, 50), lo, hi, eps, rng)
    assert sorted(rng.laplace_scales) == pytest.approx(sorted(expected(eps, (hi - lo) / 2)))


def _rank_distances(n, eps, q=0.5):
    """The law of `|i - q n|` for the interval i the exponential mechanism picks among n + 1
    equal intervals: P(i) proportional to exp(-eps |i - q n| / 2)."""
    distances = np.abs(np.arange(n + 1) - q * n)
    weights = np.exp(-eps * distances / 2)
    return distances, weights / weights.sum()


def _assert_exponential_mechanism(picked, n, eps, catch):
    """`picked` (interval indices) follow the exponential mechanism at `eps`: the mean distance
    to the target rank (the sufficient statistic of eps) in its normal-theory interval, sized to
    catch an epsilon `catch` off, and the histogram (chi-square)."""
    distances, p = _rank_distances(n, eps)
    mean = float(p @ distances)
    std = math.sqrt(float(p @ distances**2) - mean**2)
    half = Z * std / math.sqrt(len(picked))
    for wrong in (eps * (1 + catch), eps / (1 + catch)):
        wrong_distances, wrong_p = _rank_distances(n, wrong)
        assert abs(float(wrong_p @ wrong_distances) - mean) > 2 * half, (
            f"{len(picked)} draws are too few to catch an epsilon {catch:.0%} off"
        )
    observed = np.abs(picked - n / 2)
    assert abs(observed.mean() - mean) < half, (observed.mean(), mean, half)
    counts = np.bincount(picked, minlength=n + 1)
    keep = p * len(picked) >= 20
    chi2 = scipy.stats.chisquare(
        np.r_[counts[keep], counts[~keep].sum()], len(picked) * np.r_[p[keep], p[~keep].sum()]
    )
    assert chi2.pvalue > ALPHA


def test_dp_quantile_picks_intervals_with_the_exponential_mechanism_at_epsilon():
    # n equally spaced values: n + 1 intervals of equal length, so the interval's weight is
    # exp(-eps |i - q n| / 2) alone.
    eps, lo, hi, n = 1.0, 0.0, 1.0, 40
    values = lo + (hi - lo) * np.arange(1, n + 1) / (n + 1)
    picked = _draws(lambda rng: _dp_stats.dp_quantile(values, 0.5, lo, hi, eps, rng), seed=15)
    intervals = np.floor((picked - lo) / ((hi - lo) / (n + 1))).astype(int)
    _assert_exponential_mechanism(intervals, n, eps, catch=0.05)


# -- the layers: dp_epsilon split over the features ------------------------------------------

FEATURES, ROWS = 10_000, 100
SHARE = 2.0  # each feature's budget
LO, HI = -2.0, 2.0  # the middle is 0, half-width 2


def _adapted(layer, data, share=SHARE):
    layer.adapt(data)
    assert layer.dp_epsilon_spent == pytest.approx(share * FEATURES)
    return layer


def test_imputer_mean_spends_its_share_per_feature():
    layer = Imputer("mean", dp_epsilon=SHARE * FEATURES, dp_bounds=(LO, HI), seed=21)
    _adapted(layer, np.zeros((ROWS, FEATURES), "float32"))
    fill = np.asarray(layer.fill, "float64")
    # 10,000 draws: sized to catch a share 12% off.
    assert_laplace_scale(fill * ROWS, (HI - LO) / 2 / (SHARE / 2), catch=0.12)


def test_imputer_median_spends_its_share_per_feature():
    values = LO + (HI - LO) * np.arange(1, ROWS + 1) / (ROWS + 1)
    data = np.repeat(values[:, None], FEATURES, axis=1).astype("float64")
    layer = Imputer("median", dp_epsilon=SHARE * FEATURES, dp_bounds=(LO, HI), seed=22)
    _adapted(layer, data)
    fill = np.asarray(layer.fill, "float64")
    intervals = np.floor((fill - LO) / ((HI - LO) / (ROWS + 1))).astype(int)
    _assert_exponential_mechanism(intervals, ROWS, SHARE, catch=0.15)


def _plus_minus(a):
    column = a * np.tile([1.0, -1.0], ROWS // 2)
    return np.repeat(column[:, None], FEATURES, axis=1)


@pytest.mark.parametrize("layer_class", ["RobustNormalization", "OutlierClipper"])
def test_mean_std_layers_spend_their_share_per_feature(layer_class):
    # Values +-a: as in the dp_mean_std test above, each feature's mean and std reveal one
    # draw of the sum's and one of the sum of squares' noise, each at a third of its share.
    half, a, share = (HI - LO) / 2, (HI - LO) / 2 / 4, 3 * SHARE
    settings = dict(dp_epsilon=share * FEATURES, dp_bounds=(LO, HI))
    if layer_class == "RobustNormalization":
        layer = RobustNormalization("mean_std", seed=23, **settings)
        _adapted(layer, _plus_minus(a), share)
        mean, std = np.asarray(layer.center, "float64"), np.asarray(layer.scale, "float64")
    else:
        layer = OutlierClipper("zscore", z=2.0, seed=24, **settings)
        _adapted(layer, _plus_minus(a), share)
        lower, upper = np.asarray(layer.lower, "float64"), np.asarray(layer.upper, "float64")
        mean, std = (lower + upper) / 2, (upper - lower) / 4
    eps = share / 3
    assert_laplace_scale(mean * ROWS, half / eps, catch=0.12)
    assert_laplace_scale((std**2 + mean**2) * ROWS - ROWS * a * a, half**2 / eps, catch=0.12)


# -- ranges and arguments ----------------------------------------------------------------------


def test_outputs_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    values = rng.normal(size=3)
    for _ in range(200):
        assert 0.0 <= _dp_stats.dp_mean(values, 0.0, 1.0, 0.01, rng) <= 1.0
        mean, std = _dp_stats.dp_mean_std(values, -1.0, 1.0, 0.01, rng)
        assert -1.0 <= mean <= 1.0 and 0.0 <= std <= 1.0
        assert -2.0 <= _dp_stats.dp_quantile(values, 0.9, -2.0, 2.0, 0.01, rng) <= 2.0
    assert _dp_stats.dp_quantile(np.array([]), 0.5, 3.0, 4.0, 1.0, rng) >= 3.0


def test_bounds_and_epsilon_checks():
    assert _dp_stats.normalize_bounds((0, 1)) == (0.0, 1.0)
    assert _dp_stats.normalize_bounds(([0, 1], 5)) == ([0.0, 1.0], 5.0)
    assert _dp_stats.normalize_bounds(None) is None
    for bad in [(1, 0), (0, np.inf), ([[0]], [[1]]), ([0, 1], [1, 2, 3]), (0,), "ab", 3]:
        with pytest.raises(ValueError, match="`dp_bounds` must be a pair"):
            _dp_stats.normalize_bounds(bad)
    lo, hi = _dp_stats.bounds_per_feature((0.0, [1.0, 2.0]), 2)
    np.testing.assert_array_equal(lo, [0.0, 0.0])
    np.testing.assert_array_equal(hi, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"one \(lo, hi\) per feature \(3 features\)"):
        _dp_stats.bounds_per_feature((0.0, [1.0, 2.0]), 3)
    assert _dp_stats.check_epsilon(2) == 2.0 and _dp_stats.check_epsilon(None) is None
    for bad in (0, -1.0, np.inf, True, "1"):
        with pytest.raises(ValueError, match="`dp_epsilon` must be"):
            _dp_stats.check_epsilon(bad)
