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

from __future__ import annotations

import numbers

import numpy as np


def make_rng(seed):
    """Returns a numpy generator; `seed=None` draws fresh entropy from the OS."""
    return np.random.default_rng(seed)


def validate_epsilon(dp_epsilon, owner):
    """Checks `dp_epsilon` is None or a positive finite number; returns it as float or None."""
    if dp_epsilon is None:
        return None
    if isinstance(dp_epsilon, bool) or not isinstance(dp_epsilon, numbers.Real):
        raise TypeError(
            f"{owner}: `dp_epsilon` must be a positive number or None, got {dp_epsilon!r}."
        )
    dp_epsilon = float(dp_epsilon)
    if not np.isfinite(dp_epsilon) or dp_epsilon <= 0:
        raise ValueError(
            f"{owner}: `dp_epsilon` must be a positive finite number (for example 1.0), "
            f"got {dp_epsilon}. Pass dp_epsilon=None for exact (non-private) statistics."
        )
    return dp_epsilon


def normalize_bounds(dp_bounds, owner, name="dp_bounds"):
    """Validates `(lo, hi)` bounds given as two scalars or two per-feature sequences.

    Returns:
        A pair `(lo, hi)` of lists (or floats) that is JSON friendly, or None.
    """
    if dp_bounds is None:
        return None
    try:
        lo, hi = dp_bounds
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: `{name}` must be a pair (lo, hi) of numbers or of per-feature "
            f"sequences, got {dp_bounds!r}."
        ) from None
    lo_arr = np.asarray(lo, dtype="float64")
    hi_arr = np.asarray(hi, dtype="float64")
    if lo_arr.ndim > 1 or hi_arr.ndim > 1:
        raise ValueError(f"{owner}: `{name}` entries must be scalars or 1-D sequences.")
    if lo_arr.ndim == 1 and hi_arr.ndim == 1 and lo_arr.shape != hi_arr.shape:
        raise ValueError(
            f"{owner}: `{name}` lower and upper bounds have different lengths "
            f"({lo_arr.shape[0]} and {hi_arr.shape[0]})."
        )
    if not (np.all(np.isfinite(lo_arr)) and np.all(np.isfinite(hi_arr))):
        raise ValueError(f"{owner}: `{name}` must be finite, got {dp_bounds!r}.")
    if np.any(np.broadcast_to(lo_arr, np.broadcast(lo_arr, hi_arr).shape) >= hi_arr):
        raise ValueError(
            f"{owner}: `{name}` needs lo < hi for every feature, got {dp_bounds!r}. "
            "Choose bounds from domain knowledge (not from the data)."
        )

    def _plain(a):
        return float(a) if a.ndim == 0 else [float(v) for v in a]

    return (_plain(lo_arr), _plain(hi_arr))


def bounds_per_feature(dp_bounds, num_features, owner, name="dp_bounds"):
    """Broadcasts normalised bounds to two arrays of shape `(num_features,)`."""
    lo = np.asarray(dp_bounds[0], dtype="float64")
    hi = np.asarray(dp_bounds[1], dtype="float64")
    for arr in (lo, hi):
        if arr.ndim == 1 and arr.shape[0] != num_features:
            raise ValueError(
                f"{owner}: `{name}` has {arr.shape[0]} per-feature entries but the data has "
                f"{num_features} features. Give one (lo, hi) per feature or scalar bounds."
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
