"""DP-SGD throughput over plain Keras throughput, measured side by side in one process.

The models are those of `dp_models.py` (synthetic data of the right shapes; speed does not
depend on the values): TF Privacy's tutorial CNN, an MLP, an Embedding text model, an LSTM,
a small transformer text classifier, a ResNet-20 and a WideResNet-16-4 with GroupNorm.

Usage: python benchmarks/dp_overhead.py [--steps 30] [--repeats 5] [--models cnn,mlp,...]
       [--batch 256,1024] [--no-parts] [--results benchmarks/results/dp_overhead.json]

For each model: the best examples/s of plain and DP `fit` and the median of the per-round
ratios (DP / plain) of epochs timed alternately (plain, DP, plain, DP, ...), so a change of
machine load hits both; then the parts of one step in milliseconds (`dp_parts.py`): the plain
step, the per-example norm pass, the clipped-sum pass, the noise draw, the whole DP step and
the limit a DP step can reach (plain step + noise draw). `--batch` overrides the models'
default batch sizes (a comma-separated list runs each). The figures are also written to
`--results` (JSON: the settings, the machine's load and one row per model and batch), the file
the README's figures can name as their source.
"""

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from dp_models import MODELS  # noqa: E402
from dp_parts import time_parts  # noqa: E402

import keras_safe  # noqa: E402

DEFAULT_MODELS = "cnn,mlp,embedding,lstm,transformer,resnet,wrn"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "dp_overhead.json"


def _compiled(factory, dp):
    keras.utils.set_random_seed(0)
    model = factory()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if dp:
        optimizer = keras_safe.optimizers.DPSGD(
            learning_rate=0.05, l2_norm_clip=1.0, noise_multiplier=1.1
        )
        model.compile(optimizer=optimizer, loss=loss)
        keras_safe.privacy.make_private(model)
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    return model


def _epoch_seconds(model, x, y, batch_size):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def compare(factory, x, y, batch_size, repeats):
    """Times plain and DP epochs alternately, so load changes hit both alike.

    Returns the best examples/s of each and the per-round ratios DP / plain, sorted.
    """
    plain, private = _compiled(factory, False), _compiled(factory, True)
    for model in (plain, private):  # warm-up: tracing, compilation and verification
        model.fit(x[: batch_size * 2], y[: batch_size * 2], batch_size=batch_size, verbose=0)
    plain_times, private_times = [], []
    for _ in range(repeats):
        plain_times.append(_epoch_seconds(plain, x, y, batch_size))
        private_times.append(_epoch_seconds(private, x, y, batch_size))
    ratios = sorted(p / d for p, d in zip(plain_times, private_times))
    return len(x) / min(plain_times), len(x) / min(private_times), ratios


def _parts(factory, x, y, batch_size):
    """The parts of one step (best ms/step of each) and the line that prints them."""
    keras.utils.set_random_seed(0)
    times = time_parts(factory(), x, y, batch_size)
    best = {part: min(values) for part, values in times.items()}
    limit = best["plain"] + best["noise"]
    line = (
        f"    parts (ms/step): plain {best['plain']:.1f}, norms {best['norms']:.1f}, "
        f"clipped sums {best['clipping'] - best['norms']:.1f}, noise {best['noise']:.1f}, "
        f"DP step {best['dp']:.1f}; limit (plain + noise) {limit:.1f}, "
        f"DP step / limit {best['dp'] / limit:.2f}"
    )
    return {**best, "limit": limit, "dp_over_limit": best["dp"] / limit}, line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed epochs")
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch", help="batch sizes to run instead of each model's default")
    parser.add_argument("--no-parts", action="store_true", help="skip timing the step's parts")
    parser.add_argument("--results", default=str(RESULTS), help="JSON file for the figures")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    print(f"keras {keras.__version__}, keras_safe {keras_safe.__version__}")
    print(f"load average: {load:.2f}")
    results = {
        "keras": keras.__version__,
        "keras_safe": keras_safe.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_average_start": load,
        "rows": [],
    }
    print(f"{'model':12} {'batch':>5} {'plain ex/s':>11} {'DP ex/s':>9} {'DP/plain':>9}  ratios")
    for name in args.models.split(","):
        factory, default_batch, make_x, classes = MODELS[name]
        batches = [int(b) for b in args.batch.split(",")] if args.batch else [default_batch]
        for batch in batches:
            n = batch * args.steps
            x, y = make_x(n, rng), rng.integers(0, classes, n)
            plain, private, ratios = compare(factory, x, y, batch, args.repeats)
            print(
                f"{name:12} {batch:5d} {plain:11.0f} {private:9.0f} "
                f"{ratios[len(ratios) // 2]:9.2f}  {ratios[0]:.2f}-{ratios[-1]:.2f}",
                flush=True,
            )
            row = {
                "model": name,
                "batch": batch,
                "plain_examples_per_s": plain,
                "dp_examples_per_s": private,
                "ratio": ratios[len(ratios) // 2],
                "ratios": ratios,
            }
            if not args.no_parts:
                row["parts_ms"], line = _parts(factory, x, y, batch)
                print(line, flush=True)
            results["rows"].append(row)
    results["load_average_end"] = os.getloadavg()[0]
    path = pathlib.Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
