"""Command line: `python -m keras_safe demo` and `python -m keras_safe epsilon`.

`--help` and `epsilon` need only the accounting (dp-accounting): they never import TensorFlow
or Keras and answer in about a second. `demo` imports TensorFlow quietly: the C++ start-up log
lines TensorFlow writes before its logging is set up (oneDNN, CUDA, CPU features) are held back,
and absl's Python logging is set to errors only.
"""

import argparse
import contextlib
import logging
import os
import re
import sys
import tempfile

from keras_safe._validation import ArgumentError
from keras_safe._version import __version__
from keras_safe.accounting.accountants import accountant_names
from keras_safe.accounting.compute import (
    compute_epsilon,
    noise_multiplier_for_epsilon,
    resolve_delta,
    resolve_schedule,
)
from keras_safe.accounting.statement import privacy_statement

__all__ = ["add_epsilon_arguments", "build_parser", "main", "quiet_tensorflow_start", "run_epsilon"]

# An absl/TensorFlow C++ log line: severity letter, date, time, thread, file:line].
_CPP_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ [^\]]+\] ")
_CPP_LOG_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "To enable the following instructions:",  # second line of TensorFlow's CPU feature notice
)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_safe",
        description="keras_safe: differentially private training and privacy audits for Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"keras_safe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help=(
            "train a small model on bundled digits data plainly, with DP-SGD and with adversarial "
            "training, and compare"
        ),
        description=(
            "Trains a small classifier on scikit-learn's bundled digits data three times: plainly, "
            "with DP-SGD and with PGD adversarial training; audits each with membership inference "
            "and a PGD attack and prints a comparison table (needs the audit extra: "
            'pip install "keras-safe[audit]").'
        ),
    )
    demo.add_argument("--epochs", type=int, default=60, help="training epochs (default: 60)")
    demo.add_argument(
        "--target-epsilon",
        type=float,
        default=3.0,
        help="privacy budget of the DP model at delta=1e-4 (default: 3.0)",
    )
    demo.add_argument(
        "--output",
        default="demo_output",
        help="folder for the report (JSON) and plots (default: ./demo_output)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    epsilon = commands.add_parser(
        "epsilon",
        help="compute the (epsilon, delta) of DP-SGD settings and print a privacy statement",
        description="Computes epsilon for Poisson-sampled DP-SGD and prints a privacy statement.",
    )
    add_epsilon_arguments(epsilon)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        # Deferred: the demo needs TensorFlow and the optional `audit` extra (scikit-learn,
        # matplotlib); --help and epsilon need neither.
        try:
            with quiet_tensorflow_start():
                from keras_safe import demo  # noqa: PLC0415
        except ModuleNotFoundError as error:
            if error.name not in ("sklearn", "matplotlib"):
                raise
            print(
                f"error: the demo needs {error.name}, which the audit extra installs. Fix: "
                'pip install "keras-safe[audit]"',
                file=sys.stderr,
            )
            return 2

        return demo.run(
            epochs=args.epochs,
            target_epsilon=args.target_epsilon,
            output=args.output,
            seed=args.seed,
        )
    return run_epsilon(args)


@contextlib.contextmanager
def quiet_tensorflow_start():
    """Imports made inside this block start TensorFlow without its start-up log lines.

    TensorFlow 2.20+ writes its C++ start-up notices (oneDNN, CUDA drivers, CPU features) to
    standard error before its logging is set up, whatever `TF_CPP_MIN_LOG_LEVEL` says. This block
    sets `TF_CPP_MIN_LOG_LEVEL=3` unless it is set, holds standard error back at the file
    descriptor level, and afterwards passes on every line except the C++ log lines below that
    level (and absl's notice that logging is not set up yet), so a real error still shows. It
    also sets the Python loggers of absl and TensorFlow to errors only.

    Example:
        >>> with quiet_tensorflow_start():
        ...     import math
        >>> math.sqrt(4.0)
        2.0
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        min_level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        min_level = 0
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (some embedded interpreters): nothing to hold back
        saved = None
    with tempfile.TemporaryFile(mode="w+b") as held:
        if saved is not None:
            os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                kept = [
                    line
                    for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not _is_noise(line, min_level)
                ]
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _is_noise(line, min_level):
    """True for a TensorFlow/absl C++ start-up line below `TF_CPP_MIN_LOG_LEVEL`."""
    if min_level <= 0:
        return False
    if line.startswith(_CPP_LOG_NOISE):
        return True
    match = _CPP_LOG_LINE.match(line)
    return bool(match) and "IWEF".index(match.group(1)) < min_level


def add_epsilon_arguments(parser):
    """Adds the options of `python -m keras_safe epsilon` to an `argparse` parser.

    Args:
        parser: an `argparse.ArgumentParser` (or sub-parser).

    Returns:
        The same parser.

    Example:
        >>> import argparse
        >>> parser = add_epsilon_arguments(argparse.ArgumentParser())
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
        "--privacy-unit",
        choices=("example", "user"),
        default="example",
        help="what the guarantee covers: one example (default) or one user with all of their "
        "examples (then --num-examples and --batch-size count users)",
    )
    parser.add_argument(
        "--examples-per-user",
        type=int,
        default=None,
        help="example-level: the most examples one user has; the statement adds the "
        "user-level epsilon by group privacy",
    )
    parser.add_argument(
        "--accountant",
        choices=accountant_names(),
        default="rdp",
        help="rdp (Renyi DP, default) or pld (privacy loss distributions, tighter)",
    )
    return parser


def run_epsilon(args):
    """Runs `python -m keras_safe epsilon` with parsed arguments and prints the result.

    With `--noise-multiplier` it prints epsilon and the privacy statement; with
    `--target-epsilon` it prints the calibrated noise multiplier, then the statement for it.

    Args:
        args: an `argparse.Namespace` from a parser set up by `add_epsilon_arguments`.

    Returns:
        The process exit status: 0 on success, 2 when an argument is invalid (the reason is
        printed to standard error).

    Example:
        >>> import argparse
        >>> parser = add_epsilon_arguments(argparse.ArgumentParser())
        >>> status = run_epsilon(parser.parse_args(
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
        steps, sampling_rate, num_examples = resolve_schedule(
            args.num_examples, args.batch_size, args.epochs, args.steps, args.sampling_rate
        )
        delta = resolve_delta(args.delta, num_examples)
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
                f"{sampling_rate:.6g}; unit of privacy: "
                + (
                    "one user (all of their examples))"
                    if getattr(args, "privacy_unit", "example") == "user"
                    else "one training example)"
                )
            )
        print()
        unit = {
            "privacy_unit": getattr(args, "privacy_unit", "example"),
            "examples_per_user": getattr(args, "examples_per_user", None),
        }
        print(privacy_statement(noise_multiplier=noise, **schedule, **unit), end="")
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
