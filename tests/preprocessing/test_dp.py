"""Differentially private adapt: noise calibrated to epsilon, error shrinking with n."""

import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from keras_safe.preprocessing import (
    Imputer,
    InputGuard,
    OutlierClipper,
    PreprocessingStack,
    RobustNormalization,
)


def _symmetric(n, num_features=2, lo=0.0, hi=10.0, seed=0):
    """Rows symmetric around the middle of [lo, hi]: the clipped centred sum is exactly 0."""
    half = np.random.default_rng(seed).uniform(0.0, (hi - lo) / 2, size=(n // 2, num_features))
    mid = (lo + hi) / 2
    return np.concatenate([mid + half, mid - half])


def test_dp_mean_noise_scale_matches_epsilon():
    # Budget: epsilon split over 2 features, then half to the centred sum (sensitivity
    # (hi - lo) / 2 = 5): Laplace scale 5 / (eps / 4) on the sum, divided by n for the mean.
    eps, n = 1.0, 10000
    x = _symmetric(n)
    errors = []
    for seed in range(300):
        layer = Imputer(strategy="mean", dp_epsilon=eps, dp_bounds=(0.0, 10.0), seed=seed)
        layer.adapt(x)
        errors.append(layer.fill.numpy()[0] - x[:, 0].mean())
        assert layer.dp_epsilon_spent == pytest.approx(eps)
    errors = np.asarray(errors)
    scale = 5.0 / (eps / 4.0) / n
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale)).pvalue > 1e-3
    # The test has power: half or double the noise is rejected.
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale / 2)).pvalue < 1e-3
    assert scipy.stats.kstest(errors, "laplace", args=(0.0, scale * 2)).pvalue < 1e-3


def _exp_mechanism_cdf(data, q, lo, hi, eps):
    """CDF of the exponential-mechanism quantile, by numerical integration of its density.

    The density at y is proportional to exp(-eps * |#{data < y} - q * n| / 2) on [lo, hi].
    """
    data = np.sort(data)
    n = len(data)
    knots = np.concatenate([[lo], data, [hi]])

    def density(y):
        return np.exp(-eps * abs(np.searchsorted(data, y) - q * n) / 2)

    pieces = [
        scipy.integrate.quad(density, a, b)[0] for a, b in zip(knots[:-1], knots[1:], strict=True)
    ]
    total = sum(pieces)

    def cdf(points):
        points = np.atleast_1d(points)
        out = []
        for y in points:
            k = np.searchsorted(knots, y, side="right") - 1
            k = min(max(k, 0), n)
            partial = scipy.integrate.quad(density, knots[k], min(y, hi))[0] if y > lo else 0.0
            out.append((sum(pieces[:k]) + partial) / total)
        return np.array(out)

    return cdf


def test_dp_median_follows_the_exponential_mechanism():
    data = np.array([1.0, 2.0, 6.0, 6.5, 9.0])
    eps = 1.0
    samples = []
    for seed in range(400):
        layer = Imputer(strategy="median", dp_epsilon=eps, dp_bounds=(0.0, 10.0), seed=seed)
        layer.adapt(data[:, None])
        samples.append(float(layer.fill.numpy()[0]))
    cdf = _exp_mechanism_cdf(data, 0.5, 0.0, 10.0, eps)
    assert scipy.stats.kstest(samples, cdf).pvalue > 1e-3
    # A mechanism with 4x the epsilon concentrates much more on the median: rejected.
    assert scipy.stats.kstest(samples, _exp_mechanism_cdf(data, 0.5, 0.0, 10.0, 4.0)).pvalue < 1e-3


@pytest.mark.parametrize(
    "factory",
    [
        lambda s: Imputer(strategy="mean", dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
        lambda s: Imputer(strategy="median", dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
        lambda s: RobustNormalization(dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
        lambda s: RobustNormalization(method="mean_std", dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
    ],
)
def test_dp_error_shrinks_with_n(factory):
    def mean_error(n):
        x = np.random.default_rng(n).normal(size=(n, 1))
        exact = factory(0).__class__(**{**factory(0).get_config(), "dp_epsilon": None})
        exact.adapt(x)
        errs = []
        for seed in range(30):
            layer = factory(seed)
            layer.adapt(x)
            errs.append(np.abs(layer.weights[0].numpy() - exact.weights[0].numpy()).max())
        return np.mean(errs)

    small, large = mean_error(100), mean_error(10000)
    assert large < small / 8, (small, large)
    assert large < 0.05


def test_dp_fences_and_ranges_are_close_to_exact_with_enough_data():
    x = np.random.default_rng(0).normal(size=(20000, 2))
    for method in ["iqr", "quantile", "zscore", "mad"]:
        exact = OutlierClipper(method=method)
        exact.adapt(x)
        private = OutlierClipper(method=method, dp_epsilon=2.0, dp_bounds=(-10, 10), seed=1)
        private.adapt(x)
        np.testing.assert_allclose(private.upper.numpy(), exact.upper.numpy(), atol=0.1)
        np.testing.assert_allclose(private.lower.numpy(), exact.lower.numpy(), atol=0.1)
        assert private.dp_epsilon_spent == pytest.approx(2.0)
    guard = InputGuard(quantile_range=(0.01, 0.99), dp_epsilon=2.0, dp_bounds=(-10, 10), seed=0)
    guard.adapt(x)
    q1, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    np.testing.assert_allclose(guard.upper.numpy(), q99 + (q99 - q1), atol=0.2)


def test_epsilon_accounting_per_layer_and_stack():
    x = np.random.default_rng(0).normal(size=(500, 3))
    stack = PreprocessingStack(
        [
            Imputer(strategy="constant"),
            OutlierClipper(dp_epsilon=0.5, dp_bounds=([-4, -4, -4], [4, 4, 4]), seed=0),
            RobustNormalization(dp_epsilon=1.0, dp_bounds=(-4.0, 4.0), seed=0),
        ]
    )
    stack.adapt(x)
    assert [layer.dp_epsilon_spent for layer in stack.layers] == pytest.approx([0.0, 0.5, 1.0])
    assert stack.dp_epsilon_spent == pytest.approx(1.5)
    with pytest.raises(ValueError, match="3 features"):
        Imputer(dp_epsilon=1.0, dp_bounds=([0, 0], [1, 1])).adapt(x)


def test_dp_adapt_keeps_no_exact_statistics_and_stack_reports_non_private_layers():
    x = np.random.default_rng(1).uniform(size=(1234, 2))
    layer = RobustNormalization(dp_epsilon=1.0, dp_bounds=(0.0, 1.0), seed=0)
    layer.adapt(x)
    assert layer.is_adapted and float(layer.adapt_count.numpy()) != 1234.0
    imputer = Imputer(dp_epsilon=1.0, dp_bounds=(0.0, 1.0), seed=0)
    imputer.adapt(x)
    assert imputer.missing_counts is None
    with pytest.raises(ValueError, match="2-D"):
        RobustNormalization(dp_epsilon=1.0, dp_bounds=(0.0, 1.0)).adapt(x.reshape(617, 2, 2))
    exact = PreprocessingStack(
        [RobustNormalization(), RobustNormalization(dp_epsilon=1.0, dp_bounds=(-9, 9))]
    )
    exact.adapt(x)
    assert exact.dp_epsilon_spent == float("inf")
