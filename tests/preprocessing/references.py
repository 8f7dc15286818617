"""Data and independent references shared by the preprocessing tests."""

import numpy as np
import scipy.integrate


def lognormal_data(n=400, f=3, seed=0):
    """Skewed positive features on three different scales."""
    rng = np.random.default_rng(seed)
    return rng.lognormal(mean=1.0, sigma=0.7, size=(n, f)) * np.array([1.0, 10.0, 0.1])[:f]


def symmetric_data(n, num_features=2, lo=0.0, hi=10.0, seed=0):
    """Rows symmetric around the middle of [lo, hi]: the clipped centred sum is exactly 0."""
    half = np.random.default_rng(seed).uniform(0.0, (hi - lo) / 2, size=(n // 2, num_features))
    mid = (lo + hi) / 2
    return np.concatenate([mid + half, mid - half])


def exp_mechanism_cdf(data, q, lo, hi, eps):
    """CDF of the exponential-mechanism quantile, by numerical integration of its density.

    The density at y is proportional to exp(-eps * |#{data < y} - q * n| / 2) on [lo, hi]
    (Smith 2011), written here from the definition rather than from the sampler.
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
