"""Epsilon of DP-SGD settings, noise calibration for a target epsilon.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips every example's
gradient to an L2 norm `C`, adds Gaussian noise of standard deviation `noise_multiplier * C` to
the sum, and takes one such step per batch. Each step is a *Poisson-subsampled Gaussian
mechanism*: every example joins a batch independently with probability
`q = batch_size / num_examples`. The accountants (`accountants.py`: RDP or PLD, through Google's
`dp_accounting`) turn the settings into an `(epsilon, delta)` guarantee; how settings become
steps, rates and noise is `DPSchedule`'s (`schedule.py`), the only place of those rules (an
epoch is `ceil(num_examples / batch_size)` steps, as `fit` and `poisson_batches` take).

The RDP grid (`RDP_ORDERS`) is finer than tensorflow-privacy 0.9.0's, so it can only give an
equal or smaller epsilon (2.5617 at order 8.2 instead of 2.5630 at order 8 for the MNIST tutorial:
60,000 examples, batch 250, noise 1.1, 60 epochs, delta 1e-5). PLD is never above RDP, at a higher
cost (about a quarter of a second per call for 15,000 steps).

The guarantee is example-level, for add-or-remove-one-example adjacency, and covers the release
of every intermediate model, not only the final one.
"""

from keras_safe.accounting.accountants import check_accountant
from keras_safe.accounting.checks import (
    check_delta,
    check_noise,
    check_target,
    default_delta,
    resolve_delta,
)
from keras_safe.accounting.schedule import DPSchedule, calibrate

__all__ = [
    "calibrate",
    "check_delta",
    "check_noise",
    "check_target",
    "compute_epsilon",
    "default_delta",
    "noise_multiplier_for_epsilon",
    "resolve_delta",
    "resolve_schedule",
]


def resolve_schedule(num_examples, batch_size, epochs, steps, sampling_rate):
    """Returns `(steps, sampling_rate, num_examples)` from either form of the arguments.

    The first form, `num_examples`, `batch_size`, `epochs`, means Poisson sampling at rate
    `batch_size / num_examples` for `epochs * ceil(num_examples / batch_size)` steps (rounded
    up: an epoch is as many steps as `fit` and `poisson_batches` take). The second form gives
    `steps` and `sampling_rate` directly. The rule is `DPSchedule.from_arguments`'s.

    Example:
        >>> resolve_schedule(60000, 256, 15, None, None)
        (3525, 0.004266666666666667, 60000)
    """
    schedule, steps = DPSchedule.from_arguments(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    return steps, schedule.sampling_rate, schedule.num_examples


def compute_epsilon(
    num_examples=None,
    batch_size=None,
    epochs=None,
    noise_multiplier=None,
    delta=None,
    accountant="rdp",
    steps=None,
    sampling_rate=None,
    sampling="poisson",
):
    """Computes the epsilon of DP-SGD settings (Poisson sampling unless told otherwise).

    Give either `num_examples`, `batch_size` and `epochs` (then the sampling rate is
    `batch_size / num_examples` and the number of steps `ceil(epochs * ceil(num_examples /
    batch_size))`: an epoch is as many steps as `fit` on arrays and `poisson_batches` take), or
    `steps` and `sampling_rate` directly. `keras_safe.accounting.DPSchedule` holds these rules.

    Args:
        num_examples: number of training examples (also used for the default delta).
        batch_size: expected batch size (examples per noisy update).
        epochs: number of passes over the data; may be fractional.
        noise_multiplier: ratio of the Gaussian noise standard deviation to the clipping norm.
            0 means no noise and gives an infinite epsilon.
        delta: target delta in (0, 1/num_examples). Defaults to `default_delta(num_examples)`.
        accountant: `"rdp"` (Renyi DP, orders `RDP_ORDERS`), `"pld"` (privacy loss
            distributions, tighter) or another registered accountant.
        steps: number of noisy updates (use with `sampling_rate` instead of the first form).
        sampling_rate: probability that an example joins a given batch, in (0, 1].
        sampling: `"poisson"` (default), or `"shuffle"` for shuffled fixed-size batches, which
            are accounted without amplification: one Gaussian mechanism per epoch begun (first
            form) or per step (second form), under zero-out adjacency.

    Returns:
        Epsilon as a float (0.0 for zero steps, `math.inf` for zero noise).

    Raises:
        ArgumentError: if an argument is missing or out of range (including a delta of
            `1/num_examples` or more); the message names it.

    Example:
        >>> from keras_safe.accounting import compute_epsilon
        >>> round(compute_epsilon(steps=2250, sampling_rate=0.04, noise_multiplier=1.5,
        ...                       delta=1e-5), 3)
        7.329
        >>> round(compute_epsilon(60000, 256, 15, noise_multiplier=1.1, delta=1e-5), 3)
        1.283
    """
    if noise_multiplier is None:
        check_noise(noise_multiplier)
    schedule, steps = DPSchedule.from_arguments(
        num_examples, batch_size, epochs, steps, sampling_rate, noise_multiplier, sampling
    )
    delta = resolve_delta(delta, schedule.num_examples)
    return schedule.epsilon(steps, delta, check_accountant(accountant))


def noise_multiplier_for_epsilon(
    target_epsilon,
    num_examples=None,
    batch_size=None,
    epochs=None,
    delta=None,
    accountant="rdp",
    steps=None,
    sampling_rate=None,
    sampling="poisson",
):
    """Finds the smallest noise multiplier whose DP-SGD epsilon does not exceed a target.

    The search brackets the answer by doubling/halving and then runs `dp_accounting`'s
    `calibrate_dp_mechanism` (Brent's method, tolerance 1e-6 on the noise multiplier), which
    guarantees that the returned noise gives an epsilon at or below `target_epsilon`.

    Args:
        target_epsilon: the privacy budget to meet, a positive number.
        num_examples: number of training examples.
        batch_size: expected batch size.
        epochs: number of passes over the data; may be fractional.
        delta: target delta in (0, 1/num_examples). Defaults to `default_delta(num_examples)`.
        accountant: `"rdp"`, `"pld"` or another registered accountant.
        steps: number of noisy updates (with `sampling_rate`, instead of batch size/epochs).
        sampling_rate: probability that an example joins a given batch, in (0, 1].
        sampling: `"poisson"` (default) or `"shuffle"`, as in `compute_epsilon`.

    Returns:
        The noise multiplier as a float (0.0 when there are no steps to protect).

    Raises:
        ArgumentError: for out-of-range arguments, a non-positive `target_epsilon`, or a
            target that needs a noise multiplier above 1000 (unreachable).

    Example:
        >>> from keras_safe.accounting import compute_epsilon, noise_multiplier_for_epsilon
        >>> sigma = noise_multiplier_for_epsilon(3.0, 60000, 256, 15, delta=1e-5)
        >>> eps = compute_epsilon(60000, 256, 15, noise_multiplier=sigma, delta=1e-5)
        >>> 2.999 <= eps <= 3.0
        True
    """
    target_epsilon = check_target(target_epsilon)
    schedule, steps = DPSchedule.from_arguments(
        num_examples, batch_size, epochs, steps, sampling_rate, sampling=sampling
    )
    delta = resolve_delta(delta, schedule.num_examples)
    return schedule.calibrate(target_epsilon, steps, delta, check_accountant(accountant))
