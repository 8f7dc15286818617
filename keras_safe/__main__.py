"""Command line: `python -m keras_safe demo` and `python -m keras_safe epsilon`."""

from __future__ import annotations

import argparse
import os
import sys


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_safe",
        description="keras_safe: differentially private training and privacy audits for Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo",
        help="train a small model on bundled digits data, plainly and with DP-SGD, and compare",
        description=(
            "Trains a small classifier on scikit-learn's bundled digits data twice, plainly and "
            "with DP-SGD, audits both with membership inference and prints a comparison table."
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
    from keras_safe.privacy import accounting

    accounting.add_cli_arguments(epsilon)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from keras_safe import demo

        return demo.run(
            epochs=args.epochs,
            target_epsilon=args.target_epsilon,
            output=args.output,
            seed=args.seed,
        )
    from keras_safe.privacy import accounting

    return accounting.run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
