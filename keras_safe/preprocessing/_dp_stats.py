"""Differentially private statistics used by the adaptable preprocessing layers.

All mechanisms here give pure epsilon-differential privacy under the add/remove-one-row
neighbouring relation, given data-independent bounds `[lo, hi]` for the values:

- counts and sums use the Laplace mechanism (Dwork, McSherry, Nissim and Smith, "Calibrating
  noise to sensitivity in private data analysis", TCC 2006). Values are clipped to `[lo, hi]`
  and centred on the middle of the interval, so one row changes a centred sum by at most
  `(hi - lo) / 2` and a centred sum of squares by at most `((hi - lo) / 2) ** 2`;
- quantiles (median, quartiles) use the exponential mechanism over the intervals between sorted
  data points (Smith, "Privacy-preserving statistical estimation with optimal convergence
  rates", STOC 2011; McSherry and Talwar, FOCS 2007), with utility `-|rank - q * n|`, whose
  sensitivity is 1.

Budgets compose sequentially (the epsilons of the statistics released about one data set add
up). The noise is drawn with numpy's generator in floating point; it is not hardened against
the floating-point attacks of Mironov (CCS 2012), so treat it as a research-grade mechanism.
"""

import numpy as np

from keras_safe._validation import check_number, fail

__all__ = [
    "bounds_per_feature",
    "check_epsilon",
    "dp_count",
    "dp_mean",
    "dp_mean_std",
    "dp_quantile",
    "laplace",
    "make_rng",
    "normalize_bounds",
]


def make_rng(seed):
    """Returns a numpy generator; `seed=None` draws fresh entropy from the OS."""
    return np.random.default_rng(seed)


def check_epsilon(dp_epsilon):
    """Checks `dp_epsilon` is None or a positive finite number; returns it as float or None.

    Example:
        >>> check_epsilon(1) is None, check_epsilon(None) is None
        (False, True)
    """
    return check_number(
        "dp_epsilon",
        dp_epsilon,
        low=0.0,
        low_inclusive=False,
        allow_none=True,
        fix="pass a positive budget such as dp_epsilon=1.0, or dp_epsilon=None for exact "
        "(non-private) statistics.",
    )


def normalize_bounds(bounds, name="dp_bounds"):
    """Validates `(lo, hi)` bounds given as two scalars or two per-feature sequences.

    Returns:
        A pair `(lo, hi)` of floats or of lists of floats (JSON friendly), or None.

    Raises:
        ArgumentError: not a pair, entries that are not finite scalars or 1-D sequences of the
            same length, or `lo >= hi` for some feature.

    Example:
        >>> normalize_bounds((0, [1, 2]))
        (0.0, [1.0, 2.0])
    """
    if bounds is None:
        return None
    requirement = "a pair (lo, hi) of finite numbers or of per-feature sequences with lo < hi"
    fix = "choose the bounds from domain knowledge (not from the data), e.g. (0.0, 100.0)."
    try:
        lo, hi = bounds
        lo_arr = np.asarray(lo, dtype="float64")
        hi_arr = np.asarray(hi, dtype="float64")
        shape = np.broadcast(lo_arr, hi_arr).shape
    except (TypeError, ValueError):
        shape = None
    if (
        shape is None
        or lo_arr.ndim > 1
        or hi_arr.ndim > 1
        or not (np.all(np.isfinite(lo_arr)) and np.all(np.isfinite(hi_arr)))
        or np.any(np.broadcast_to(lo_arr, shape) >= hi_arr)
    ):
        fail(name, bounds, requirement, fix)

    def _plain(a):
        return float(a) if a.ndim == 0 else [float(v) for v in a]

    return (_plain(lo_arr), _plain(hi_arr))


def bounds_per_feature(bounds, num_features, name="dp_bounds"):
    """Broadcasts normalised bounds to two arrays of shape `(num_features,)`.

    Raises:
        ArgumentError: per-feature bounds whose length is not `num_features`.
    """
    lo = np.asarray(bounds[0], dtype="float64")
    hi = np.asarray(bounds[1], dtype="float64")
    for arr in (lo, hi):
        if arr.ndim == 1 and arr.shape[0] != num_features:
            fail(
                name,
                bounds,
                f"scalars or one (lo, hi) per feature ({num_features} features)",
                f"give {num_features} lower and upper bounds, or scalar bounds.",
            )
    return (
        np.broadcast_to(lo, (num_features,)).copy(),
        np.broadcast_to(hi, (num_features,)).copy(),
    )


def laplace(scale, rng):
    """One draw of Laplace(0, scale)."""
    return float(rng.laplace(0.0, scale))


def dp_count(n, epsilon, rng):
    """epsilon-DP count (sensitivity 1) by the Laplace mechanism."""
    return n + laplace(1.0 / epsilon, rng)


def dp_mean(values, lo, hi, epsilon, rng):
    """epsilon-DP mean of `values` clipped to `[lo, hi]`.

    Half of the budget goes to a noisy count, half to a noisy centred sum.

    Returns:
        The noisy mean, clipped to `[lo, hi]`.
    """
    values = np.clip(np.asarray(values, dtype="float64"), lo, hi)
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    count = dp_count(values.size, epsilon / 2.0, rng)
    total = float(np.sum(values - mid)) + laplace(half / (epsilon / 2.0), rng)
    return float(np.clip(mid + total / max(count, 1.0), lo, hi))


def dp_mean_std(values, lo, hi, epsilon, rng):
    """epsilon-DP mean and standard deviation of `values` clipped to `[lo, hi]`.

    The budget is split in three: noisy count, centred sum and centred sum of squares.

    Returns:
        `(mean, std)`, the mean clipped to `[lo, hi]` and the std in `[0, (hi - lo) / 2]`.
    """
    values = np.clip(np.asarray(values, dtype="float64"), lo, hi)
    mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    eps = epsilon / 3.0
    count = max(dp_count(values.size, eps, rng), 1.0)
    centred = values - mid
    s1 = float(np.sum(centred)) + laplace(half / eps, rng)
    s2 = float(np.sum(centred**2)) + laplace(half**2 / eps, rng)
    mean_c = float(np.clip(s1 / count, -half, half))
    var = float(np.clip(s2 / count - mean_c**2, 0.0, half**2))
    return mid + mean_c, float(np.sqrt(var))


def dp_quantile(values, q, lo, hi, epsilon, rng):
    """epsilon-DP `q`-quantile by the exponential mechanism (Smith 2011).

    The values are clipped to `[lo, hi]` and sorted into `z_1 <= ... <= z_n`; with
    `z_0 = lo` and `z_{n+1} = hi`, interval `i` (`[z_i, z_{i+1}]`) is chosen with probability
    proportional to `(z_{i+1} - z_i) * exp(-epsilon * |i - q * n| / 2)`, and the output is
    uniform inside it.

    Returns:
        A float in `[lo, hi]`.
    """
    values = np.sort(np.clip(np.asarray(values, dtype="float64"), lo, hi))
    n = values.size
    edges = np.concatenate([[lo], values, [hi]])
    lengths = np.diff(edges)
    ranks = np.arange(n + 1, dtype="float64")
    with np.errstate(divide="ignore"):
        log_w = np.log(lengths) - epsilon * np.abs(ranks - q * n) / 2.0
    if not np.any(np.isfinite(log_w)):
        return float(lo)
    # Gumbel-max trick: argmax(log w + Gumbel) samples i with probability w_i / sum(w).
    i = int(np.argmax(log_w + rng.gumbel(size=log_w.shape)))
    return float(rng.uniform(edges[i], edges[i + 1]))
