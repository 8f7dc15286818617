"""Statistical checks for the noise of DP mechanisms, sized to catch a 5% error in a scale.

Each check compares an estimate of a scale with an exact interval at level `ALPHA` (two-sided),
and first asserts that the interval is narrow enough: when `high / low < 1 + CATCH`, a scale
wrong by a factor `1 - CATCH` or `1 + CATCH` puts the estimate outside the interval with
probability at least `1 - ALPHA`. So each check both passes the right scale (false alarm below
`ALPHA`) and fails a scale 5% off (miss below `ALPHA`); a test makes a handful of checks, so its
false-alarm rate stays below 1e-6.

- Gaussian noise of known mean 0 and standard deviation s: `sum(x^2) / s^2` is chi-square with
  n degrees of freedom (exact).
- Laplace noise of known location 0 and scale b: `|x|` is exponential of mean b, so
  `sum(|x|) / b` is Gamma(n, 1) (exact).
"""

import math

import numpy as np
from scipy import stats

ALPHA = 1e-7
CATCH = 0.05
# The two-sided normal quantile of ALPHA, for means and counts.
Z = float(stats.norm.isf(ALPHA / 2))


def _check_sized(low, high, n, what, catch):
    assert high < (1 + catch) * low, (
        f"{n} samples are too few for the {what} check: its interval [{low:.6g}, {high:.6g}] "
        f"at level {ALPHA:g} would not catch a scale {catch:.0%} off; use more samples."
    )


def gaussian_scale_interval(n, expected, alpha=ALPHA):
    """The interval of the root mean square of n draws of N(0, expected^2), at level `alpha`."""
    low = expected * math.sqrt(stats.chi2.ppf(alpha / 2, n) / n)
    high = expected * math.sqrt(stats.chi2.isf(alpha / 2, n) / n)
    return low, high


def assert_gaussian_scale(samples, expected, catch=CATCH, shape=True):
    """Asserts that `samples` are N(0, expected^2): scale (chi-square), mean, and shape.

    The shape check (Kolmogorov-Smirnov against the normal law, p above `ALPHA`) catches noise
    of the right variance but the wrong law (uniform, Laplace, a cut tail of some weight).

    Returns:
        The measured ratio of the root mean square to `expected`.
    """
    x = np.asarray(samples, "float64").ravel()
    n = x.size
    low, high = gaussian_scale_interval(n, expected)
    _check_sized(low, high, n, "Gaussian scale", catch)
    rms = math.sqrt(float(np.mean(x**2)))
    assert low < rms < high, (
        f"noise scale {rms:.6g} is {rms / expected:.4f} x the expected {expected:.6g} "
        f"(accepted [{low / expected:.4f}, {high / expected:.4f}] x, {n} samples)"
    )
    mean = float(np.mean(x))
    assert abs(mean) < Z * expected / math.sqrt(n), f"noise mean {mean:.3g} is not 0"
    if shape:
        p = stats.kstest(x / expected, "norm").pvalue
        assert p > ALPHA, f"the noise is not normal (Kolmogorov-Smirnov p = {p:.3g})"
    return rms / expected


def laplace_scale_interval(n, expected, alpha=ALPHA):
    """The interval of the mean absolute value of n draws of Laplace(0, expected)."""
    low = expected * stats.gamma.ppf(alpha / 2, n) / n
    high = expected * stats.gamma.isf(alpha / 2, n) / n
    return low, high


def assert_laplace_scale(samples, expected, catch=CATCH, shape=True):
    """Asserts that `samples` are Laplace(0, expected): scale (exact Gamma interval), shape.

    Returns:
        The measured ratio of the mean absolute value to `expected`.
    """
    x = np.asarray(samples, "float64").ravel()
    n = x.size
    low, high = laplace_scale_interval(n, expected)
    _check_sized(low, high, n, "Laplace scale", catch)
    scale = float(np.mean(np.abs(x)))
    assert low < scale < high, (
        f"Laplace scale {scale:.6g} is {scale / expected:.4f} x the expected {expected:.6g} "
        f"(accepted [{low / expected:.4f}, {high / expected:.4f}] x, {n} samples)"
    )
    if shape:
        p = stats.kstest(x, "laplace", args=(0.0, expected)).pvalue
        assert p > ALPHA, f"the noise is not Laplace (Kolmogorov-Smirnov p = {p:.3g})"
    return scale / expected


def assert_mean(samples, expected_mean, expected_std, catch=None):
    """Asserts that the mean of `samples` is `expected_mean` (normal theory, level `ALPHA`).

    With `catch`, first asserts that the interval is narrow enough to catch a mean `catch`
    (relative) off with probability at least `1 - ALPHA`.
    """
    x = np.asarray(samples, "float64").ravel()
    half = Z * expected_std / math.sqrt(x.size)
    if catch is not None:
        assert 2 * half < catch * abs(expected_mean), (
            f"{x.size} samples are too few to catch a mean {catch:.0%} off"
        )
    mean = float(np.mean(x))
    assert abs(mean - expected_mean) < half, (
        f"mean {mean:.6g}, expected {expected_mean:.6g} +- {half:.3g} ({x.size} samples)"
    )
    return mean
