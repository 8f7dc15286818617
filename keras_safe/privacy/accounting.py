"""Privacy accounting for DP-SGD: epsilon, noise calibration and a plain-language statement.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") clips every example's
gradient to an L2 norm `C`, adds Gaussian noise of standard deviation `noise_multiplier * C` to
the sum, and takes one such step per batch. Each step is a *Poisson-subsampled Gaussian
mechanism*: every example joins a batch independently with probability
`q = batch_size / num_examples`. This module turns those settings into an `(epsilon, delta)`
guarantee with Google's `dp_accounting` library:

- `accountant="rdp"`: Renyi-DP accounting (Mironov 2017; Mironov, Talwar and Zhang 2019,
  "Renyi Differential Privacy of the Sampled Gaussian Mechanism"), converted to
  `(epsilon, delta)` with the tighter conversion of Canonne, Kamath and Steinke 2020 that
  `dp_accounting` uses. The RDP orders are `RDP_ORDERS`: 1.1 to 11.0 in steps of 0.1, the
  integers 12 to 63, and 128, 256, 512, 1024 (156 orders; the same grid as `dp_accounting`'s
  default). tensorflow-privacy 0.9.0's `compute_dp_sgd_privacy` uses a coarser grid (1.25 to 4.5,
  the integers 5 to 63, and 128, 256, 512); the finer grid can only give an equal or smaller
  epsilon (for example 2.5617 at order 8.2 instead of 2.5630 at order 8 for the MNIST tutorial
  settings: 60,000 examples, batch 250, noise 1.1, 60 epochs, delta 1e-5).
- `accountant="pld"`: privacy-loss-distribution accounting (Koskela et al. 2020; Doroshenko et
  al. 2022, "Connect the Dots"), a numerically tight, pessimistic estimate that is never above
  the RDP figure, at a higher cost (about a quarter of a second per call for 15,000 steps).

The guarantee is example-level, for add-or-remove-one-example adjacency, and covers the release
of every intermediate model, not only the final one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import sys
import textwrap

import dp_accounting

__all__ = [
    "RDP_ORDERS",
    "add_cli_arguments",
    "compute_epsilon",
    "default_delta",
    "noise_multiplier_for_epsilon",
    "privacy_statement",
    "run_cli",
]

RDP_ORDERS = tuple(
    [round(1.0 + i / 10.0, 1) for i in range(1, 101)]
    + [float(order) for order in range(12, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)
"""The Renyi-DP orders the `"rdp"` accountant optimises epsilon over."""

_ACCOUNTANTS = ("rdp", "pld")
# Noise multipliers above this are not useful for training; a target that needs more is
# reported as unreachable.
_MAX_NOISE_MULTIPLIER = 1000.0


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_int(name, value, fix):
    if not _is_number(value) or not float(value).is_integer() or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}. Fix: {fix}")
    return int(value)


def _check_delta(delta):
    if not _is_number(delta) or not 0.0 < float(delta) < 1.0:
        raise ValueError(
            f"`delta` must be a number strictly between 0 and 1, got {delta!r}. Fix: pass a "
            "small probability well below 1/num_examples, for example "
            "keras_safe.privacy.default_delta(num_examples)."
        )
    return float(delta)


def _check_noise(noise_multiplier):
    if noise_multiplier is None:
        raise ValueError(
            "`noise_multiplier` is required. Fix: pass the ratio of the noise standard "
            "deviation to the clipping norm (for example 1.1), or use "
            "noise_multiplier_for_epsilon(...) to calibrate it for a target epsilon."
        )
    if not _is_number(noise_multiplier) or not math.isfinite(noise_multiplier):
        raise ValueError(
            f"`noise_multiplier` must be a finite number, got {noise_multiplier!r}. Fix: pass "
            "a non-negative float such as 1.1."
        )
    if noise_multiplier < 0:
        raise ValueError(
            f"`noise_multiplier` must be non-negative, got {noise_multiplier!r}. Fix: pass the "
            "ratio of the noise standard deviation to the clipping norm, for example 1.1 "
            "(0 means no noise and an infinite epsilon)."
        )
    return float(noise_multiplier)


def _check_accountant(accountant):
    name = str(accountant).lower() if isinstance(accountant, str) else accountant
    if name not in _ACCOUNTANTS:
        raise ValueError(
            f"`accountant` must be one of {_ACCOUNTANTS}, got {accountant!r}. Fix: use 'rdp' "
            "(Renyi DP, the usual figure) or 'pld' (privacy loss distributions, tighter)."
        )
    return name


def _resolve_schedule(num_examples, batch_size, epochs, steps, sampling_rate):
    """Returns `(steps, sampling_rate, num_examples)` from either form of the arguments."""
    if steps is not None or sampling_rate is not None:
        if batch_size is not None or epochs is not None:
            raise ValueError(
                "Pass either `num_examples`, `batch_size` and `epochs`, or `steps` and "
                "`sampling_rate`, not both forms. Fix: drop `batch_size`/`epochs` or drop "
                "`steps`/`sampling_rate`."
            )
        if steps is None or sampling_rate is None:
            missing = "steps" if steps is None else "sampling_rate"
            raise ValueError(
                f"`{missing}` is required when using the steps/sampling_rate form. Fix: pass "
                "both `steps` (number of noisy updates) and `sampling_rate` (expected batch "
                "size / number of examples)."
            )
        if not _is_number(steps) or not float(steps).is_integer() or steps < 0:
            raise ValueError(
                f"`steps` must be a non-negative integer, got {steps!r}. Fix: pass the number "
                "of noisy updates taken."
            )
        if not _is_number(sampling_rate) or not 0.0 < float(sampling_rate) <= 1.0:
            raise ValueError(
                f"`sampling_rate` must be in (0, 1], got {sampling_rate!r}. Fix: pass expected "
                "batch size / number of training examples."
            )
        if num_examples is not None:
            num_examples = _positive_int(
                "num_examples", num_examples, "pass the number of training examples."
            )
        return int(steps), float(sampling_rate), num_examples

    for name, value in (
        ("num_examples", num_examples),
        ("batch_size", batch_size),
        ("epochs", epochs),
    ):
        if value is None:
            raise ValueError(
                f"`{name}` is required. Fix: pass `num_examples`, `batch_size` and `epochs`, "
                "or pass `steps` and `sampling_rate` instead."
            )
    num_examples = _positive_int(
        "num_examples", num_examples, "pass the number of training examples."
    )
    if not _is_number(batch_size) or not float(batch_size).is_integer() or batch_size <= 0:
        raise ValueError(
            f"`batch_size` must be a positive integer, got {batch_size!r}. Fix: pass the "
            "expected number of examples per batch."
        )
    batch_size = int(batch_size)
    if batch_size > num_examples:
        raise ValueError(
            f"`batch_size` ({batch_size}) is larger than `num_examples` ({num_examples}). Fix: "
            "use a batch size no larger than the training set."
        )
    if not _is_number(epochs) or not math.isfinite(epochs) or epochs <= 0:
        raise ValueError(
            f"`epochs` must be a positive number, got {epochs!r}. Fix: pass the number of "
            "passes over the data (it may be fractional)."
        )
    sampling_rate = batch_size / num_examples
    steps = math.ceil(epochs * num_examples / batch_size - 1e-9)
    return steps, sampling_rate, num_examples


def _resolve_delta(delta, num_examples):
    if delta is None:
        if num_examples is None:
            raise ValueError(
                "`delta` is required when `num_examples` is not given. Fix: pass `delta`, or "
                "`num_examples` to use default_delta(num_examples)."
            )
        return default_delta(num_examples)
    return _check_delta(delta)


# ---------------------------------------------------------------------------------------------
# Accounting
# ---------------------------------------------------------------------------------------------


def _make_accountant(accountant):
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS))
    return dp_accounting.pld.PLDAccountant()


def _dp_sgd_event(noise_multiplier, sampling_rate, steps):
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        gaussian = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(gaussian, steps)


class _SkipOrderNotices(logging.Filter):
    """Drops `dp_accounting`'s notice that a fractional RDP order did not converge.

    For large sampling rates the series for the smallest orders (such as 1.1) may not converge;
    `dp_accounting` then leaves that order out of the minimum, which can only raise epsilon
    (a safe figure), and logs a warning on every call. The notice is not actionable.
    """

    def filter(self, record):
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_order_notices():
    logger = logging.getLogger("absl")
    quiet = _SkipOrderNotices()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant):
    """Epsilon of `steps` Poisson-sampled Gaussian steps; inputs already validated."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    acc = _make_accountant(accountant)
    with _quiet_order_notices():
        acc.compose(_dp_sgd_event(noise_multiplier, sampling_rate, steps))
        return float(acc.get_epsilon(delta))


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
        ValueError: if `num_examples` is not a positive integer.

    Example:
        >>> from keras_safe.privacy import default_delta
        >>> round(default_delta(60000), 8)
        5.55e-06
    """
    n = _positive_int("num_examples", num_examples, "pass the number of training examples.")
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
    batch_size)`), or `steps` and `sampling_rate` directly.

    Args:
        num_examples: number of training examples (also used for the default delta).
        batch_size: expected batch size (examples per noisy update).
        epochs: number of passes over the data; may be fractional.
        noise_multiplier: ratio of the Gaussian noise standard deviation to the clipping norm.
            0 means no noise and gives an infinite epsilon.
        delta: target delta in (0, 1). Defaults to `default_delta(num_examples)`.
        accountant: `"rdp"` (Renyi DP, orders `RDP_ORDERS`) or `"pld"` (privacy loss
            distributions, tighter).
        steps: number of noisy updates (use with `sampling_rate` instead of the first form).
        sampling_rate: probability that an example joins a given batch, in (0, 1].

    Returns:
        Epsilon as a float (0.0 for zero steps, `math.inf` for zero noise).

    Raises:
        ValueError: if an argument is missing or out of range (non-positive batch size, batch
            larger than the data, delta outside (0, 1), negative noise, unknown accountant,
            both forms mixed); the message names the argument.

    Example:
        >>> from keras_safe.privacy import compute_epsilon
        >>> round(compute_epsilon(steps=2250, sampling_rate=0.04, noise_multiplier=1.5,
        ...                       delta=1e-5), 3)
        7.329
        >>> round(compute_epsilon(60000, 256, 15, noise_multiplier=1.1, delta=1e-5), 2)
        1.28
    """
    steps, sampling_rate, num_examples = _resolve_schedule(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    noise_multiplier = _check_noise(noise_multiplier)
    delta = _resolve_delta(delta, num_examples)
    accountant = _check_accountant(accountant)
    return _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant)


def _check_target(target_epsilon):
    if not _is_number(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise ValueError(
            f"`target_epsilon` must be a positive finite number, got {target_epsilon!r}. Fix: "
            "pass the privacy budget you want to meet, for example 3.0."
        )
    return float(target_epsilon)


def _calibrate_noise(target_epsilon, sampling_rate, steps, delta, accountant, upper=None):
    """Smallest noise multiplier (within 1e-6) whose epsilon is at most `target_epsilon`."""
    if steps == 0:
        return 0.0

    def epsilon_of(noise):
        return _epsilon(noise, sampling_rate, steps, delta, accountant)

    hi = upper if upper is not None else 1.0
    while epsilon_of(hi) > target_epsilon:
        if hi >= _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"`target_epsilon`={target_epsilon} is unreachable: even noise_multiplier="
                f"{_MAX_NOISE_MULTIPLIER:g} gives epsilon {epsilon_of(hi):.4g} for {steps} "
                f"steps at sampling rate {sampling_rate:.4g} and delta={delta:.3g}. Fix: raise "
                "target_epsilon, train fewer steps or epochs, use a smaller batch, or a larger "
                "delta."
            )
        hi = min(2.0 * hi, _MAX_NOISE_MULTIPLIER)
    # Shrink the lower end gently when starting from a good upper bound: PLD accounting gets
    # expensive at small noise multipliers, so the search should not wander far below.
    shrink = 0.5 if upper is None else 0.85
    lo = hi * shrink
    while epsilon_of(lo) <= target_epsilon:
        hi = lo
        lo = lo * shrink
        if lo < 1e-3:
            return hi
    with _quiet_order_notices():
        root = dp_accounting.calibrate_dp_mechanism(
            lambda: _make_accountant(accountant),
            lambda noise: _dp_sgd_event(noise, sampling_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
            tol=1e-6,
        )
    return float(root)


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
    guarantees that the returned noise gives an epsilon at or below `target_epsilon`, never
    above it.

    Args:
        target_epsilon: the privacy budget to meet, a positive number.
        num_examples: number of training examples.
        batch_size: expected batch size.
        epochs: number of passes over the data; may be fractional.
        delta: target delta in (0, 1). Defaults to `default_delta(num_examples)`.
        accountant: `"rdp"` or `"pld"` (see `compute_epsilon`).
        steps: number of noisy updates (with `sampling_rate`, instead of batch size/epochs).
        sampling_rate: probability that an example joins a given batch, in (0, 1].

    Returns:
        The noise multiplier as a float (0.0 when there are no steps to protect).

    Raises:
        ValueError: for out-of-range arguments (see `compute_epsilon`), a non-positive
            `target_epsilon`, or a target that needs a noise multiplier above 1000
            (unreachable); the message names the argument.

    Example:
        >>> from keras_safe.privacy import compute_epsilon, noise_multiplier_for_epsilon
        >>> sigma = noise_multiplier_for_epsilon(3.0, 60000, 256, 15, delta=1e-5)
        >>> eps = compute_epsilon(60000, 256, 15, noise_multiplier=sigma, delta=1e-5)
        >>> 2.999 <= eps <= 3.0
        True
    """
    target_epsilon = _check_target(target_epsilon)
    steps, sampling_rate, num_examples = _resolve_schedule(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    delta = _resolve_delta(delta, num_examples)
    accountant = _check_accountant(accountant)
    upper = None
    if accountant == "pld":
        # PLD is never above RDP, so the RDP noise meets the target under PLD too: it bounds
        # the search from above and keeps the expensive PLD calls on moderate noise levels.
        upper = _calibrate_noise(target_epsilon, sampling_rate, steps, delta, "rdp")
        if upper == 0.0:
            return 0.0
    return _calibrate_noise(target_epsilon, sampling_rate, steps, delta, accountant, upper)


# ---------------------------------------------------------------------------------------------
# Statement
# ---------------------------------------------------------------------------------------------


def _fill(text):
    return textwrap.fill(" ".join(text.split()), width=88)


def privacy_statement(
    num_examples=None,
    batch_size=None,
    epochs=None,
    noise_multiplier=None,
    delta=None,
    accountant="rdp",
    steps=None,
    sampling_rate=None,
):
    """Writes a plain-language report of the privacy guarantee of DP-SGD settings.

    The report states the settings, epsilon under Poisson sampling (the figure usually
    quoted), epsilon under the conservative assumption that each example is used once per
    epoch in an arbitrary order (no amplification by sampling), what changes when batches come
    from a shuffled pass over the data instead of Poisson sampling, the unit of privacy (one
    training example) and the assumptions the figures rest on.

    Args:
        num_examples: number of training examples.
        batch_size: expected batch size.
        epochs: number of passes over the data; may be fractional.
        noise_multiplier: ratio of the noise standard deviation to the clipping norm.
        delta: target delta in (0, 1). Defaults to `default_delta(num_examples)` (stated).
        accountant: `"rdp"` or `"pld"`.
        steps: number of noisy updates (with `sampling_rate`, instead of batch size/epochs).
        sampling_rate: probability that an example joins a given batch, in (0, 1].

    Returns:
        A multi-paragraph string ending with a newline.

    Raises:
        ValueError: for out-of-range arguments, as `compute_epsilon`.

    Example:
        >>> from keras_safe.privacy import privacy_statement
        >>> text = privacy_statement(60000, 256, 15, noise_multiplier=1.1, delta=1e-5)
        >>> "Poisson sampling" in text and "1.281" in text
        True
    """
    given_delta = delta
    steps, sampling_rate, num_examples = _resolve_schedule(
        num_examples, batch_size, epochs, steps, sampling_rate
    )
    noise_multiplier = _check_noise(noise_multiplier)
    delta = _resolve_delta(delta, num_examples)
    accountant = _check_accountant(accountant)

    passes = float(epochs) if epochs is not None else steps * sampling_rate
    eps_poisson = _epsilon(noise_multiplier, sampling_rate, steps, delta, accountant)
    eps_once_per_epoch = _epsilon(
        noise_multiplier, 1.0, math.ceil(passes - 1e-9), delta, accountant
    )
    method = "Renyi DP (RDP)" if accountant == "rdp" else "privacy loss distribution (PLD)"

    if batch_size is not None:
        settings = (
            f"DP-SGD over {num_examples} examples with an expected {batch_size} examples per "
            f"step (sampling rate {sampling_rate:.6g}), noise multiplier {noise_multiplier:g}, "
            f"for {epochs:g} epochs ({steps} noisy steps)."
        )
    else:
        over = f" over {num_examples} examples" if num_examples is not None else ""
        settings = (
            f"DP-SGD{over} with {steps} noisy steps at sampling rate {sampling_rate:.6g} "
            f"(about {passes:.4g} epochs), noise multiplier {noise_multiplier:g}."
        )
    delta_note = ""
    if given_delta is None:
        delta_note = (
            f" delta was not given, so the default rule delta = 1/n^1.1 with n = "
            f"{num_examples} was used."
        )
    paragraphs = [
        _fill(settings),
        _fill(
            f"Example-level differential privacy, add-or-remove-one-example adjacency, at "
            f"delta = {delta:.3g}, computed with {method} accounting.{delta_note}"
        )
        + "\n"
        + f"    epsilon assuming Poisson sampling (*):                 {eps_poisson:12.3f}\n"
        + f"    epsilon with each example used once per epoch (**):   {eps_once_per_epoch:12.3f}",
        _fill(
            "Unit of privacy: one training example (one row of a batch). The guarantee bounds "
            "how much any single example can change the distribution of everything training "
            "releases, including every intermediate model and checkpoint, not only the final "
            "one. It says nothing about a person who contributes several examples unless "
            "each person has one example: a person with k examples is protected only at "
            "roughly k times this epsilon (group privacy)."
        ),
        _fill(
            "(*) Poisson sampling: every example joins each step's batch independently with "
            "probability equal to the sampling rate, so batch sizes vary. This is the setting "
            "the usual DP-SGD figure assumes."
        ),
        _fill(
            "(**) Shuffled batches: most pipelines shuffle the data and cut it into fixed-size "
            "batches instead. Then every example is used exactly once per epoch, and without "
            "extra assumptions only the second figure (the composition of one Gaussian "
            "mechanism per epoch, with no amplification by sampling) is proven. With a random "
            "shuffle kept secret, the true epsilon is believed to be close to the Poisson "
            "figure, but that is not a proof: use Poisson sampling where the guarantee must "
            "be exact."
        ),
        _fill(
            "Assumptions: each example's gradient is clipped to the L2 norm bound before "
            "averaging, with no microbatching of several examples together (which doubles "
            "the sensitivity); the Gaussian noise has standard deviation noise_multiplier x "
            "clipping norm; no other step reads the training data (data-dependent "
            "preprocessing, hyperparameter tuning on the same data or repeated runs are not "
            "counted); and the random numbers are unpredictable to an attacker."
        ),
    ]
    return "\n\n".join(paragraphs) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line: `python -m keras_safe epsilon`
# ---------------------------------------------------------------------------------------------


def add_cli_arguments(parser):
    """Adds the options of `python -m keras_safe epsilon` to an `argparse` parser.

    Args:
        parser: an `argparse.ArgumentParser` (or sub-parser).

    Returns:
        The same parser.

    Example:
        >>> import argparse
        >>> from keras_safe.privacy import accounting
        >>> parser = accounting.add_cli_arguments(argparse.ArgumentParser())
        >>> args = parser.parse_args(["--num-examples", "60000", "--batch-size", "256",
        ...                           "--epochs", "15", "--noise-multiplier", "1.1"])
        >>> args.accountant
        'rdp'
    """
    parser.add_argument(
        "--num-examples", type=int, default=None, help="number of training examples"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="expected batch size")
    parser.add_argument(
        "--epochs", type=float, default=None, help="passes over the data (may be fractional)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="number of noisy steps (with --sampling-rate, instead of --batch-size/--epochs)",
    )
    parser.add_argument(
        "--sampling-rate",
        type=float,
        default=None,
        help="probability that an example joins a batch (with --steps)",
    )
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="noise standard deviation / clipping norm: print epsilon and the statement",
    )
    noise.add_argument(
        "--target-epsilon",
        type=float,
        default=None,
        help="privacy budget: print the smallest noise multiplier that meets it",
    )
    parser.add_argument(
        "--delta",
        type=float,
        default=None,
        help="target delta (default: 1/num_examples^1.1)",
    )
    parser.add_argument(
        "--accountant",
        choices=_ACCOUNTANTS,
        default="rdp",
        help="rdp (Renyi DP, default) or pld (privacy loss distributions, tighter)",
    )
    return parser


def run_cli(args):
    """Runs `python -m keras_safe epsilon` with parsed arguments and prints the result.

    With `--noise-multiplier` it prints epsilon and the privacy statement; with
    `--target-epsilon` it prints the calibrated noise multiplier, then the statement for it.

    Args:
        args: an `argparse.Namespace` from a parser set up by `add_cli_arguments`.

    Returns:
        The process exit status: 0 on success, 2 when an argument is invalid (the reason is
        printed to standard error).

    Example:
        >>> import argparse
        >>> from keras_safe.privacy import accounting
        >>> parser = accounting.add_cli_arguments(argparse.ArgumentParser())
        >>> status = accounting.run_cli(parser.parse_args(
        ...     ["--steps", "2250", "--sampling-rate", "0.04", "--noise-multiplier", "1.5",
        ...      "--delta", "1e-5"]))  # doctest: +ELLIPSIS
        epsilon = 7.329 ...
        >>> status
        0
    """
    schedule = {
        "num_examples": args.num_examples,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "steps": args.steps,
        "sampling_rate": args.sampling_rate,
        "delta": args.delta,
        "accountant": args.accountant,
    }
    try:
        steps, sampling_rate, num_examples = _resolve_schedule(
            args.num_examples, args.batch_size, args.epochs, args.steps, args.sampling_rate
        )
        delta = _resolve_delta(args.delta, num_examples)
        if args.target_epsilon is not None:
            noise = noise_multiplier_for_epsilon(args.target_epsilon, **schedule)
            epsilon = compute_epsilon(noise_multiplier=noise, **schedule)
            print(
                f"noise_multiplier = {noise:.6f} (smallest meeting target epsilon "
                f"{args.target_epsilon:g}: epsilon = {epsilon:.4f} at delta = {delta:.3g}, "
                f"{args.accountant.upper()} accountant, {steps} steps at sampling rate "
                f"{sampling_rate:.6g})"
            )
        else:
            noise = args.noise_multiplier
            epsilon = compute_epsilon(noise_multiplier=noise, **schedule)
            print(
                f"epsilon = {epsilon:.3f} at delta = {delta:.3g} ({args.accountant.upper()} "
                f"accountant, Poisson sampling, {steps} steps at sampling rate "
                f"{sampling_rate:.6g})"
            )
        print()
        print(privacy_statement(noise_multiplier=noise, **schedule), end="")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
