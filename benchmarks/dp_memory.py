"""Peak memory of DP-SGD `fit` over plain `fit`, per model (see `dp_models.py`).

Each trainer runs in its own Python process (peak resident memory cannot be reset inside one).
Reported: the process's peak RSS, and the growth of RSS during `fit` over the RSS after the
model and data were set up. For the MLP, the "per-example Jacobian" row materialises every
example's gradient (keras_safe's fallback path forced on all layers), the cost that ghost
clipping avoids (`--jacobian`).

With `--physical N`, a third trainer, `dp_chunks`: the same DP `fit` with `physical_batch_size=N`
(each batch clipped in chunks of N rows, one after the other, the noise drawn once per batch),
the memory route for the conv nets, whose per-example kernel gradients are what a whole batch
holds at once; `dp_overhead.py --physical N` times what it costs.

Usage: python benchmarks/dp_memory.py [--models mlp,cnn,...] [--batch 256] [--steps 4] [--jacobian]
       [--physical 64] [--results benchmarks/results/dp_memory.json]

The figures are also written to `--results` (JSON: one row per model, each trainer's peak and
growth in MB and `dp_over_plain`, the peak ratio), the file the README's figures name.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dp_models import write_result  # noqa: E402

DEFAULT_MODELS = "mlp,cnn,embedding,lstm,transformer,resnet,wrn,lora,hub"
RESULTS = HERE / "results" / "dp_memory.json"


def rss_mb():
    """This process's resident memory now, in MB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name, mode, batch, steps, physical=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf
    from dp_models import MODELS

    import keras_safe
    from keras_safe.optimizers import provenance
    from keras_safe.privacy.losses import PerExampleLoss
    from keras_safe.privacy.per_example.clipping import clipped_gradient_sum

    factory, _, make_x, classes = MODELS[name]
    rng = np.random.default_rng(0)
    x = make_x(batch * steps, rng)
    y = rng.integers(0, classes, batch * steps)
    keras.utils.set_random_seed(0)
    model = factory()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    else:
        chunks = physical if mode == "dp_chunks" else None
        dp = keras_safe.optimizers.DPSGD(
            0.05, l2_norm_clip=1.0, noise_multiplier=1.1, physical_batch_size=chunks
        )
        model.compile(optimizer=dp, loss=loss)
        keras_safe.privacy.make_private(model)
    baseline = rss_mb()
    if mode == "jacobian":
        per_example_loss = PerExampleLoss(model)
        variables = model.trainable_variables

        @tf.function
        def step(xb, yb):
            def forward():
                pred = model(xb, training=True)
                return per_example_loss(yb, pred), pred

            sums, *_ = clipped_gradient_sum(model, variables, forward, 1.0, use_rules=False)
            with provenance.releasing():  # as keras_safe's step calls it
                release = dp.privatize(sums, batch, variables)
            model.optimizer.apply(release, variables)

        for i in range(steps):
            step(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch])
    else:
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    print(json.dumps({"peak": _peak_mb(), "growth": _peak_mb() - baseline}))


def _run(name, mode, batch, steps, physical=None):
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            f"--worker={name}:{mode}",
            f"--batch={batch}",
            f"--steps={steps}",
        ]
        + ([f"--physical={physical}"] if physical else []),
        capture_output=True,
        text=True,
    )
    if out.returncode:
        tail = out.stderr.strip().splitlines()[-1:] or ["?"]
        return {"error": tail[0][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--jacobian", action="store_true", help="also the MLP's Jacobian path")
    parser.add_argument("--physical", type=int, help="also DP in chunks of this many rows")
    parser.add_argument("--results", default=str(RESULTS), help="JSON file for the figures")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        name, mode = args.worker.split(":")
        return worker(name, mode, args.batch, args.steps, args.physical)
    print(f"peak RSS of fit, batch {args.batch}, {args.steps} steps, one process per trainer")
    print(f"{'model':12} {'trainer':9} {'peak MB':>8} {'growth MB':>10} {'peak/plain':>11}")
    rows = []
    for name in args.models.split(","):
        modes = ["plain", "dp"] + (["jacobian"] if args.jacobian and name == "mlp" else [])
        modes += ["dp_chunks"] if args.physical else []
        results = {mode: _run(name, mode, args.batch, args.steps, args.physical) for mode in modes}
        plain = results["plain"]
        row = {"model": name, "batch": args.batch, "steps": args.steps, "trainers": results}
        if args.physical:
            row["physical_batch_size"] = args.physical
        for mode, key in (("dp", "dp_over_plain"), ("dp_chunks", "dp_chunks_over_plain")):
            if mode in results and "error" not in plain and "error" not in results[mode]:
                row[key] = round(results[mode]["peak"] / plain["peak"], 3)
        rows.append(row)
        for mode in modes:
            r = results[mode]
            if "error" in r or "error" in plain:
                print(f"{name:12} {mode:9} failed: {r.get('error', plain.get('error'))}")
                continue
            print(
                f"{name:12} {mode:9} {r['peak']:8.0f} {r['growth']:10.0f} "
                f"{r['peak'] / plain['peak']:11.2f}",
                flush=True,
            )
    write_result(args.results, {"rows": rows, "clock": "peak resident memory (ru_maxrss)"})
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
