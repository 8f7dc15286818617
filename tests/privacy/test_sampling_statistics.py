"""Poisson sampling against the law the accountant assumes: Binomial batch sizes, each example
included independently with probability q at every step.

Both samplers: `poisson_batches` (padded, seeded) and `epoch_batches` (what a private `fit` on
arrays trains on: unpadded, fresh samples at every pass). 1,500 steps over 1,000 examples at
q = 0.1 (tiny rows): the mean batch size is checked in an interval that a rate 5% off falls
outside of (with probability above 1 - 1e-7), the spread and the histogram against
Binomial(n, q), every example's count against Binomial(steps, q), and the steps against each
other. Every check is at the 1e-7 level.
"""

import math

import numpy as np
import pytest
from scipy import stats

import keras_safe
from keras_safe.privacy.sampling import epoch_batches
from tests.statistical import ALPHA, Z, assert_mean

N, BATCH, STEPS = 1000, 100, 1500
Q = BATCH / N


def _draws(data, padded):
    """`(sizes, counts, batches)`: drawn sizes per step, inclusion counts per example, and the
    chosen indices of the first 50 batches."""
    sizes, counts, batches = [], np.zeros(N), []
    for batch in data.as_numpy_iterator():
        xb = batch[0]
        if padded:
            real = batch[2] > 0
            drawn = int(real.sum())
            # The examples come first, the padding rows (weight 0) after them.
            assert np.all(real[:drawn]) and not np.any(real[drawn:])
        else:
            drawn = len(xb)
        chosen = xb[:drawn, 0].astype(int)
        counts[chosen] += 1
        sizes.append(drawn)
        if len(batches) < 50:
            batches.append(chosen)
    return np.asarray(sizes, "float64"), counts, batches


@pytest.fixture(scope="module", params=["poisson_batches", "epoch_batches"])
def samples(request):
    x = np.arange(N, dtype="float32")[:, None]
    y = np.zeros(N, "float32")
    if request.param == "poisson_batches":
        data = keras_safe.privacy.poisson_batches(
            x, y, batch_size=BATCH, epochs=STEPS / (N // BATCH), seed=2024
        )
        return _draws(data, padded=True)
    data = epoch_batches(x, y, batch_size=BATCH, steps_per_epoch=STEPS, pad_to_multiple_of=1)
    first = _draws(data, padded=False)
    # Every pass (every epoch of fit) draws new samples.
    again = _draws(data.take(50), padded=False)
    assert not all(np.array_equal(a, b) for a, b in zip(first[2], again[2]))
    return first


def test_the_dataset_has_the_steps_of_the_epochs(samples):
    sizes, _, _ = samples
    assert sizes.size == STEPS


def test_batch_sizes_have_mean_q_n(samples):
    sizes, _, _ = samples
    # Sized so that a sampling rate 5% off fails.
    assert_mean(sizes, N * Q, math.sqrt(N * Q * (1 - Q)), catch=0.05)


def test_batch_sizes_are_binomial_not_fixed(samples):
    sizes, _, _ = samples
    variance = N * Q * (1 - Q)
    statistic = (sizes.size - 1) * sizes.var(ddof=1) / variance
    dof = sizes.size - 1
    assert stats.chi2.ppf(ALPHA / 2, dof) < statistic < stats.chi2.isf(ALPHA / 2, dof)
    # The histogram against Binomial(N, Q), tails pooled so that each bin expects 20 or more.
    edges = np.arange(int(stats.binom.ppf(1e-3, N, Q)), int(stats.binom.isf(1e-3, N, Q)) + 1)
    observed = np.array(
        [np.sum(sizes < edges[0])]
        + [np.sum(sizes == k) for k in edges]
        + [np.sum(sizes > edges[-1])]
    )
    probabilities = np.array(
        [stats.binom.cdf(edges[0] - 1, N, Q)]
        + [stats.binom.pmf(k, N, Q) for k in edges]
        + [stats.binom.sf(edges[-1], N, Q)]
    )
    expected = probabilities * sizes.size
    pooled_observed, pooled_expected, bin_observed, bin_expected = [], [], 0, 0.0
    for o, e in zip(observed, expected):
        bin_observed, bin_expected = bin_observed + o, bin_expected + e
        if bin_expected >= 20:
            pooled_observed.append(bin_observed)
            pooled_expected.append(bin_expected)
            bin_observed, bin_expected = 0, 0.0
    pooled_observed[-1] += bin_observed
    pooled_expected[-1] += bin_expected
    result = stats.chisquare(pooled_observed, pooled_expected)
    assert result.pvalue > ALPHA, result


def test_every_example_is_included_with_probability_q(samples):
    _, counts, _ = samples
    # Each count is Binomial(STEPS, Q), independently of the others: no example is favoured
    # (the last rows included, as a padding or rounding slip would miss them).
    mean, variance = STEPS * Q, STEPS * Q * (1 - Q)
    statistic = float(np.sum((counts - mean) ** 2) / variance)
    assert stats.chi2.sf(statistic, N) > ALPHA and stats.chi2.cdf(statistic, N) > ALPHA
    assert np.all(np.abs(counts - mean) < 6.5 * math.sqrt(variance))
    tail = counts[-N // 10 :]
    assert abs(tail.mean() - mean) < Z * math.sqrt(variance / tail.size)


def test_steps_are_independent_and_never_repeat_an_example(samples):
    sizes, _, batches = samples
    lag = np.corrcoef(sizes[:-1], sizes[1:])[0, 1]
    assert abs(lag) < Z / math.sqrt(sizes.size)
    for chosen in batches:
        assert len(set(chosen.tolist())) == len(chosen)
    # Two steps share about Q^2 N examples, as independent draws do.
    shared = [len(set(a) & set(b)) for a, b in zip(batches[:-1], batches[1:])]
    assert_mean(shared, Q * Q * N, math.sqrt(N * Q * Q * (1 - Q * Q)))
