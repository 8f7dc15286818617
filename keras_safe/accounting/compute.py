"""Epsilon of DP-SGD settings, noise calibration for a target epsilon, and the default delta.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips every example's
gradient to an L2 norm `C`, adds Gaussian noise of standard deviation `noise_multiplier * C` to
the sum, and takes one such step per batch. Each step is a *Poisson-subsampled Gaussian
mechanism*: every example joins a batch independently with probability
`q = batch_size / num_examples`. The accountants (`accountants.py`: RDP or PLD, through Google's
`dp_accounting`) turn the settings into an `(epsilon, delta)` guarantee.

The RDP grid (`RDP_ORDERS`) is finer than tensorflow-privacy 0.9.0's, so it can only give an
equal or smaller epsilon (2.5617 at order 8.2 instead of 2.5630 at order 8 for the MNIST tutorial:
60,000 examples, batch 250, noise 1.1, 60 epochs, delta 1e-5). PLD is never above RDP, at a higher
cost (about a quarter of a second per call for 15,000 steps).

The guarantee is example-level, for add-or-remove-one-example adjacency, and covers the release
of every intermediate model, not only the final one.
"""

import math

from keras_safe._validation import check_number, check_probability, fail
from keras_safe.accounting.accountants import (
    calibrate_noise,
    check_accountant,
    epsilon_of,
)

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


def check_delta(delta):
    """Checks a delta in (0, 1) and returns it as a float."""
    return check_probability(
        "delta",
        delta,
        fix="pass a small probability well below 1/num_examples, for example "
        "keras_safe.privacy.default_delta(num_examples).",
    )


def check_noise(noise_multiplier):
    """Checks a noise multiplier (finite, >= 0) and returns it as a float."""
    return check_number(
        "noise_multiplier",
        noise_multiplier,
        low=0.0,
        fix="pass the ratio of the noise standard deviation to the clipping norm, for example "
        "1.1 (0 means no noise and an infinite epsilon), or calibrate it with "
        "noise_multiplier_for_epsilon(...).",
    )


def check_target(target_epsilon):
    """Checks a target epsilon (finite, > 0) and returns it as a float."""
    return check_number(
        "target_epsilon",
        target_epsilon,
        low=0.0,
        low_inclusive=False,
        fix="pass the privacy budget you want to meet, for example 3.0.",
    )


def _whole(name, value, fix):
    return check_number(name, value, low=1, integer=True, fix=fix)


def resolve_schedule(num_examples, batch_size, epochs, steps, sampling_rate):
    """Returns `(steps, sampling_rate, num_examples)` from either form of the arguments.

    The first form, `num_examples`, `batch_size`, `epochs`, means Poisson sampling at rate
    `batch_size / num_examples` for `ceil(epochs * num_examples / batch_size)` steps (the
    expected number of passes over the data). The second form gives `steps` and
    `sampling_rate` directly.
    """
    if steps is not None or sampling_rate is not None:
        if batch_size is not None or epochs is not None:
            fail(
                "steps",
                steps,
                "given without `batch_size` and `epochs`",
                "pass either `num_examples`, `batch_size` and `epochs`, or `steps` and "
                "`sampling_rate`, not both forms.",
            )
        steps = check_number(
            "steps", steps, low=0, integer=True, fix="pass the number of noisy updates taken."
        )
        sampling_rate = check_probability(
            "sampling_rate",
            sampling_rate,
            allow_one=True,
            fix="pass expected batch size / number of training examples.",
        )
        if num_examples is not None:
            num_examples = _whole("num_examples", num_examples, "pass the training set size.")
        return steps, sampling_rate, num_examples

    for name, value in (
        ("num_examples", num_examples),
        ("batch_size", batch_size),
        ("epochs", epochs),
    ):
        if value is None:
            fail(
                name,
                value,
                "given",
                "pass `num_examples`, `batch_size` and `epochs`, or `steps` and "
                "`sampling_rate` instead.",
            )
    num_examples = _whole("num_examples", num_examples, "pass the number of training examples.")
    batch_size = _whole("batch_size", batch_size, "pass the expected examples per batch.")
    if batch_size > num_examples:
        fail(
            "batch_size",
            batch_size,
            f"at most num_examples ({num_examples})",
            "use a batch size no larger than the training set.",
        )
    epochs = check_number(
        "epochs",
        epochs,
        low=0.0,
        low_inclusive=False,
        fix="pass the number of passes over the data (it may be fractional).",
    )
    steps = math.ceil(epochs * num_examples / batch_size - 1e-9)
    return steps, batch_size / num_examples, num_examples


def resolve_delta(delta, num_examples):
    """`delta` checked, or `default_delta(num_examples)` when it is None."""
    if delta is None:
        if num_examples is None:
            fail(
                "delta",
                delta,
                "given when `num_examples` is not",
                "pass `delta`, or `num_examples` to use default_delta(num_examples).",
            )
        return default_delta(num_examples)
    return check_delta(delta)


def default_delta(num_examples):
    """Returns the default delta for a training set of `num_examples` examples: `1 / n**1.1`.

    Delta is the probability with which the epsilon guarantee may fail outright. A mechanism
    that publishes one random example in full is `(0, 1/n)`-DP, so a meaningful delta must be
    well below `1/n`. `n**-1.1` is polynomially smaller than `1/n` and stays usable for small
    data sets (1.5e-4 for 3,000 examples, 5.5e-6 for 60,000, 2.5e-7 for a million).

    Args:
        num_examples: the number of training examples `n`, a positive integer.

    Returns:
        The float `1 / num_examples ** 1.1`.

    Raises:
        ArgumentError: if `num_examples` is not a positive integer.

    Example:
        >>> from keras_safe.privacy import default_delta
        >>> round(default_delta(60000), 8)
        5.55e-06
    """
    n = _whole("num_examples", num_examples, "pass the number of training examples.")
    return 1.0 / n**1.1


def compute_epsilon(
    num_examples=None,
    batch_size=None,
    epochs=None,
    noise_multiplier=None,
    delta=None,
    accountant="rdp",
    steps=None,
    sampling_rate=None,
):
    """Computes the epsilon of Poisson-sampled DP-SGD.

    Give either `num_examples`, `batch_size` and `epochs` (then the sampling rate is
    `batch_size / num_examples` and the number of steps `ceil(epochs * num_examples /
    batch_size)`), or `steps` and `sampling_rate` directly. (A `fit` on arrays runs
    `epochs * ceil(num_examples / batch_size)` steps; `keras_safe.privacy.DPSchedule` plans
    those.)

    Args:
        num_examples: number of training examples (also used for the default delta).
        batch_size: expected batch size (examples per noisy update).
        epochs: number of passes over the data; may be fractional.
        noise_multiplier: ratio of the Gaussian noise standard deviation to the clipping norm.
            0 means no noise and gives an infinite epsilon.
        delta: target delta in (0, 1). Defaults to `default_delta(num_examples)`.
        accountant: `"rdp"` (Renyi DP, orders `RDP_ORDERS`), `"pld"` (privacy loss
            distributions, tighter) or another registered accountant.
        steps: number of noisy updates (use with `sampling_rate` instead of the first form).
        sampling_rate: probability that an example joins a given batch, in (0, 1].

    Returns:
        Epsilon as a float (0.0 for zero steps, `math.inf` for zero noise).

    Raises:
        ArgumentError: if an argument is missing or out of range; the message names it.

    Example:
        >>> from keras_safe.privacy import compute_epsilon
        >>> round(compute_epsilon(steps=2250, sampling_rate=0.04, noise_multiplier=1.5,
        ...                       delta=1e-5), 3)
        7.329
        >>> round(compute_epsilon(60000, 256, 15, noise_multiplier=1.1, delta=1e-5), 2)
        1.28
    """
    steps, sampling_rate, num_examples = resolve_schedule(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    noise_multiplier = check_noise(noise_multiplier)
    delta = resolve_delta(delta, num_examples)
    accountant = check_accountant(accountant)
    return epsilon_of([(noise_multiplier, sampling_rate, steps)], delta, accountant)


def noise_multiplier_for_epsilon(
    target_epsilon,
    num_examples=None,
    batch_size=None,
    epochs=None,
    delta=None,
    accountant="rdp",
    steps=None,
    sampling_rate=None,
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
        delta: target delta in (0, 1). Defaults to `default_delta(num_examples)`.
        accountant: `"rdp"`, `"pld"` or another registered accountant.
        steps: number of noisy updates (with `sampling_rate`, instead of batch size/epochs).
        sampling_rate: probability that an example joins a given batch, in (0, 1].

    Returns:
        The noise multiplier as a float (0.0 when there are no steps to protect).

    Raises:
        ArgumentError: for out-of-range arguments, a non-positive `target_epsilon`, or a
            target that needs a noise multiplier above 1000 (unreachable).

    Example:
        >>> from keras_safe.privacy import compute_epsilon, noise_multiplier_for_epsilon
        >>> sigma = noise_multiplier_for_epsilon(3.0, 60000, 256, 15, delta=1e-5)
        >>> eps = compute_epsilon(60000, 256, 15, noise_multiplier=sigma, delta=1e-5)
        >>> 2.999 <= eps <= 3.0
        True
    """
    target_epsilon = check_target(target_epsilon)
    steps, sampling_rate, num_examples = resolve_schedule(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    delta = resolve_delta(delta, num_examples)
    accountant = check_accountant(accountant)
    return calibrate(target_epsilon, sampling_rate, steps, delta, accountant)


def calibrate(target_epsilon, sampling_rate, steps, delta, accountant, prior=()):
    """`calibrate_noise` with the RDP answer as the upper bracket of a PLD search."""
    upper = None
    if accountant == "pld":
        # PLD is never above RDP, so the RDP noise meets the target under PLD too: it bounds
        # the search from above and keeps the expensive PLD calls on moderate noise levels.
        upper = calibrate_noise(target_epsilon, sampling_rate, steps, delta, "rdp", prior)
        if upper == 0.0:
            return 0.0
    return calibrate_noise(target_epsilon, sampling_rate, steps, delta, accountant, prior, upper)
