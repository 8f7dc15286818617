"""Outlier fences and sets of quantiles of one column of values, exact and epsilon-DP.

Used by `OutlierClipper` and `RowCleaner` (fences), `RobustNormalization` and `InputGuard`
(median and a quantile range). Every function takes one column of finite values; the private
versions also take data-independent bounds `[lo, hi]`, a budget `epsilon` and a numpy
generator, and spend exactly `epsilon` on the column (the budget is split evenly over the
statistics they release, which compose sequentially).

Fence methods:

- `"iqr"`: Tukey's fences `[Q1 - k * IQR, Q3 + k * IQR]` (Tukey, "Exploratory Data Analysis",
  1977), with `k = iqr_factor` (1.5 "outside", 3.0 "far out");
- `"quantile"`: the `quantile_range` quantiles themselves;
- `"zscore"`: `mean +- z * std` (not robust: outliers inflate the std);
- `"mad"`: `median +- z * 1.4826 * MAD`, the robust z-score (Hampel, JASA 1974).
"""

import numpy as np

from keras_safe._validation import check_choice, check_number, fail
from keras_safe.preprocessing import _dp_stats

__all__ = [
    "MAD_TO_STD",
    "METHODS",
    "check_fence_args",
    "check_quantile_range",
    "exact_fences",
    "exact_quantiles",
    "private_fences",
    "private_quantiles",
]

METHODS = ("iqr", "quantile", "zscore", "mad")
# 1 / Phi^{-1}(3/4): makes the median absolute deviation a consistent estimator of a normal std.
MAD_TO_STD = 1.482602218505602


def check_quantile_range(quantile_range, name="quantile_range"):
    """Checks a pair `(low, high)` of quantile levels with `0 <= low < high <= 1`.

    Returns:
        The pair as a tuple of floats.

    Raises:
        ArgumentError: not a pair of numbers, or not ordered inside `[0, 1]`.

    Example:
        >>> check_quantile_range([0.25, 0.75])
        (0.25, 0.75)
    """
    try:
        low, high = (float(v) for v in quantile_range)
        ok = 0.0 <= low < high <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fail(
            name,
            quantile_range,
            "a pair (low, high) of quantile levels with 0 <= low < high <= 1",
            "pass for example (0.01, 0.99).",
        )
    return (low, high)


def check_fence_args(method, iqr_factor, quantile_range, z):
    """Checks the fence arguments shared by `OutlierClipper` and `RowCleaner`.

    Returns:
        `(method, iqr_factor, quantile_range, z)` with the numbers as floats.

    Raises:
        ArgumentError: an unknown `method`, a negative `iqr_factor`, a `z` that is not positive
            or a `quantile_range` that is not an ordered pair inside `[0, 1]`.

    Example:
        >>> check_fence_args("iqr", 3, (0.01, 0.99), 5)
        ('iqr', 3.0, (0.01, 0.99), 5.0)
    """
    check_choice("method", method, METHODS)
    iqr_factor = check_number("iqr_factor", iqr_factor, low=0.0)
    z = check_number("z", z, low=0.0, low_inclusive=False)
    return method, iqr_factor, check_quantile_range(quantile_range), z


def exact_quantiles(column, levels):
    """The `levels` quantiles of `column` (numpy's linear interpolation), as a tuple."""
    return tuple(float(v) for v in np.quantile(column, levels))


def private_quantiles(column, levels, lo, hi, epsilon, rng):
    """epsilon-DP quantiles of `column` at `levels`, sorted, each with `epsilon / len(levels)`.

    Each quantile comes from the exponential mechanism (`_dp_stats.dp_quantile`); sorting is
    post-processing, so the result keeps the order of `levels` when those are increasing.
    """
    share = epsilon / len(levels)
    return tuple(sorted(_dp_stats.dp_quantile(column, q, lo, hi, share, rng) for q in levels))


def exact_fences(column, method, iqr_factor, quantile_range, z):
    """Lower and upper fence of one column of finite values (see the module docstring).

    Example:
        >>> import numpy as np
        >>> exact_fences(np.arange(5.0), "iqr", 1.5, (0.01, 0.99), 3.0)
        (-2.0, 6.0)
    """
    if method == "iqr":
        q1, q3 = exact_quantiles(column, (0.25, 0.75))
        return q1 - iqr_factor * (q3 - q1), q3 + iqr_factor * (q3 - q1)
    if method == "quantile":
        return exact_quantiles(column, quantile_range)
    if method == "zscore":
        mean, std = float(np.mean(column)), float(np.std(column))
        return mean - z * std, mean + z * std
    med = float(np.median(column))
    mad = MAD_TO_STD * float(np.median(np.abs(column - med)))
    return med - z * mad, med + z * mad


def private_fences(column, method, iqr_factor, quantile_range, z, lo, hi, epsilon, rng):
    """epsilon-DP version of `exact_fences` on values bounded by `[lo, hi]`.

    Quartiles and quantiles: two exponential-mechanism quantiles, `epsilon / 2` each. z-score:
    Laplace noise on the clipped count, sum and sum of squares (`epsilon / 3` each). MAD: the
    median, then the median of the absolute deviations from it (bounded by `hi - lo`),
    `epsilon / 2` each.
    """
    if method in ("iqr", "quantile"):
        levels = (0.25, 0.75) if method == "iqr" else quantile_range
        a, b = private_quantiles(column, levels, lo, hi, epsilon, rng)
        if method == "quantile":
            return a, b
        return a - iqr_factor * (b - a), b + iqr_factor * (b - a)
    if method == "zscore":
        mean, std = _dp_stats.dp_mean_std(column, lo, hi, epsilon, rng)
        return mean - z * std, mean + z * std
    med = _dp_stats.dp_quantile(column, 0.5, lo, hi, epsilon / 2.0, rng)
    deviations = np.abs(np.clip(column, lo, hi) - med)
    mad = MAD_TO_STD * _dp_stats.dp_quantile(deviations, 0.5, 0.0, hi - lo, epsilon / 2.0, rng)
    return med - z * mad, med + z * mad
