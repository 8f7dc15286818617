"""Peak memory of DP-SGD `fit` over plain `fit`: MLP 784-512-512-10 at batch 1024.

Each trainer runs in its own Python process (peak resident memory cannot be reset inside
one). Reported: the process's peak RSS, and the growth of RSS during `fit` over the RSS
after the model and data were set up. The "per-example Jacobian" row materialises every
example's gradient (keras_safe's fallback path forced on all layers), the cost that ghost
clipping avoids.

Usage: python benchmarks/dp_memory.py [--batch 1024] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

MODES = ("plain", "dp", "jacobian")


def _rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode, batch, steps):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_safe
    from keras_safe.privacy.losses import PerExampleLoss
    from keras_safe.privacy.per_example import clipped_gradient_sum

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 784)).astype("float32")
    y = rng.integers(0, 10, batch * steps)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    else:
        dp = keras_safe.optimizers.DPSGD(0.05, l2_norm_clip=1.0, noise_multiplier=1.1)
        model.compile(optimizer=dp, loss=loss)
        keras_safe.privacy.make_private(model)
    baseline = _rss_mb()
    if mode == "jacobian":
        per_example_loss = PerExampleLoss(model)
        variables = model.trainable_variables

        @tf.function
        def step(xb, yb):
            def forward():
                pred = model(xb, training=True)
                return per_example_loss(yb, pred), pred

            sums, *_ = clipped_gradient_sum(model, variables, forward, 1.0, use_taps=False)
            model.optimizer.apply(dp.privatize(sums, batch, variables), variables)

        for i in range(steps):
            step(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch])
    else:
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    print(json.dumps({"peak": _peak_mb(), "growth": _peak_mb() - baseline}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.batch, args.steps)
    results = {}
    for mode in MODES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                mode,
                f"--batch={args.batch}",
                f"--steps={args.steps}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    plain = results["plain"]
    print(f"MLP 784-512-512-10, batch {args.batch}")
    print(
        f"{'trainer':22} {'peak MB':>8} {'growth MB':>10} {'peak/plain':>11} {'growth/plain':>13}"
    )
    names = {"plain": "plain Keras", "dp": "keras_safe DP-SGD", "jacobian": "per-example Jacobian"}
    for mode in MODES:
        r = results[mode]
        print(
            f"{names[mode]:22} {r['peak']:8.0f} {r['growth']:10.0f} "
            f"{r['peak'] / plain['peak']:11.2f} {r['growth'] / plain['growth']:13.2f}"
        )


if __name__ == "__main__":
    main()
