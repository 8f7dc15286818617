"""DP-SGD throughput over plain Keras throughput, measured side by side in one process.

The models are those of `dp_models.py` (synthetic data of the right shapes; speed does not
depend on the values): TF Privacy's tutorial CNN, an MLP, an Embedding text model, an LSTM,
a small transformer text classifier, a ResNet-20, a WideResNet-16-4 with GroupNorm, a LoRA
fine-tuned transformer (rank-8 adapters, key and output projections at full rank) and a tiny
keras-hub BERT classifier with `enable_lora(8)` (skipped, with a note, where keras-hub is not
installed).

Usage: python benchmarks/dp_overhead.py [--steps 30] [--repeats 5] [--models cnn,mlp,...]
       [--batch 256,1024] [--no-parts] [--results benchmarks/results/dp_overhead.json]
       [--sampling] [--physical 64]

For each model: the best examples/s of plain and DP `fit` and the median of the per-round
speed ratios (DP / plain) of epochs timed alternately (plain, DP, plain, DP, ...), so a change
of machine load hits both, after one untimed epoch of each on the same data: in CPU time
(`ratio`, both cores' work: it moves far less with the machine's load) and in wall time
(`wall_ratio`); then the parts of one step in milliseconds (`dp_parts.py`): the plain step, the
per-example norm pass, the clipped-sum pass, the noise draw, the whole DP step and the limit a
DP step can reach (plain step + noise draw), with the ratio DP step / limit of every round.
ResNet-20 and WRN-16-4, whose steps take seconds on a CPU, run 8 and 3 steps per epoch and
fewer rounds of parts. `--batch` overrides the models' default batch sizes (a comma-separated list
runs each). The figures are also written to `--results` (JSON: the settings, the machine's
load, the models skipped and why, and one row per model and batch), the file the README's
figures can name as their source. The DP `fit` of this comparison is given `shuffle=False`
(fixed batches in the data's order, as before Poisson batches became the default of a private
`fit` on arrays).

`--physical N` adds a third trainer to each round, DP with `physical_batch_size=N` (each batch
clipped in chunks of N rows, one after the other), and reports its ratio to plain
(`chunks_ratio`, CPU time) beside the whole batch's: the speed cost of the memory route that
`dp_memory.py --physical N` measures.

`--sampling` compares instead the two batch constructions of a private `fit` on arrays: the
default Poisson batches (a fresh Poisson sample per step, not padded) and the opt-in shuffled
fixed-size batches (`DPSGD(sampling="shuffle")`, Keras's own batches), with a plain epoch in each
round: CPU seconds per epoch (`time.process_time`, all threads: CPU time varies far less with
the machine's load than wall time), plain, Poisson and shuffled epochs alternating, and the
median of the per-round speed ratios Poisson / shuffled (1.00: as fast); written to
`benchmarks/results/dp_sampling.json` unless `--results` says otherwise.
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
from dp_models import MODELS, UNAVAILABLE  # noqa: E402
from dp_parts import time_parts  # noqa: E402

import keras_safe  # noqa: E402

DEFAULT_MODELS = "cnn,mlp,embedding,lstm,transformer,resnet,wrn,lora,hub"
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "dp_overhead.json"
SAMPLING_RESULTS = RESULTS.parent / "dp_sampling.json"


def _compiled(factory, dp, **dp_options):
    keras.utils.set_random_seed(0)
    model = factory()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if dp:
        optimizer = keras_safe.optimizers.DPSGD(
            learning_rate=0.05, l2_norm_clip=1.0, noise_multiplier=1.1, **dp_options
        )
        model.compile(optimizer=optimizer, loss=loss)
        keras_safe.privacy.make_private(model)
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    return model


def _epoch_cpu_seconds(model, x, y, batch_size):
    start = time.process_time()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    return time.process_time() - start


def compare_sampling(factory, x, y, batch_size, repeats):
    """CPU seconds per epoch of plain, DP-Poisson (the default) and DP-shuffled (the opt-in)
    epochs, alternating; returns `{name: [seconds per round]}`."""
    models = {
        "plain": _compiled(factory, False),
        "poisson": _compiled(factory, True),
        "shuffled": _compiled(factory, True, sampling="shuffle"),
    }
    for model in models.values():  # warm-up: tracing, compilation and verification
        _epoch_cpu_seconds(model, x, y, batch_size)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(_epoch_cpu_seconds(model, x, y, batch_size))
    return times


def _sampling_row(name, batch, times):
    plain, poisson, shuffled = (np.array(times[k]) for k in ("plain", "poisson", "shuffled"))
    ratios = np.sort(shuffled / poisson)  # per round: Poisson's speed over the shuffled one's
    row = {
        "model": name,
        "batch": batch,
        "cpu_seconds": {k: [float(t) for t in v] for k, v in times.items()},
        "poisson_over_plain_speed": float(np.median(plain / poisson)),
        "shuffled_over_plain_speed": float(np.median(plain / shuffled)),
        "poisson_over_shuffled_speed": float(np.median(ratios)),
        "ratios": [float(r) for r in ratios],
    }
    line = (
        f"{name:12} {batch:5d} {np.median(plain):9.2f} {np.median(poisson):9.2f} "
        f"{np.median(shuffled):10.2f} {row['poisson_over_plain_speed']:8.2f} "
        f"{row['shuffled_over_plain_speed']:8.2f} {row['poisson_over_shuffled_speed']:9.2f}  "
        f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
    )
    return row, line


def _models(parser, models):
    """The models of `--models` that can be built here, and `{name: why}` of the others (a
    printed note each)."""
    names = [n for n in models.split(",") if n]
    unknown = [n for n in names if n not in MODELS and n not in UNAVAILABLE]
    if unknown or not names:
        known = ",".join([*MODELS, *UNAVAILABLE])
        parser.error(f"--models={models!r}: use a comma-separated subset of {known}.")
    skipped = {n: UNAVAILABLE[n] for n in names if n in UNAVAILABLE}
    for name, why in skipped.items():
        print(f"{name} skipped: {why}", flush=True)
    return [n for n in names if n in MODELS], skipped


def main_sampling(args, names, skipped):
    """The `--sampling` comparison (see the module's description)."""
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    print(f"keras {keras.__version__}, keras_safe {keras_safe.__version__}")
    print(f"load average: {load:.2f}")
    results = {
        "keras": keras.__version__,
        "keras_safe": keras_safe.__version__,
        "steps": args.steps,
        "repeats": args.repeats,
        "physical_batch_size": args.physical,
        "clock": "process CPU time",
        "load_average_start": load,
        "skipped": skipped,
        "rows": [],
    }
    print(
        f"{'model':12} {'batch':>5} {'plain s':>9} {'Poisson s':>9} {'shuffled s':>10} "
        f"{'P/plain':>8} {'S/plain':>8} {'P/S speed':>9}  per round"
    )
    for name in names:
        factory, default_batch, make_x, classes = MODELS[name]
        batches = [int(b) for b in args.batch.split(",")] if args.batch else [default_batch]
        for batch in batches:
            n = batch * args.steps
            x, y = make_x(n, rng), rng.integers(0, classes, n)
            row, line = _sampling_row(
                name, batch, compare_sampling(factory, x, y, batch, args.repeats)
            )
            print(line, flush=True)
            results["rows"].append(row)
    results["load_average_end"] = os.getloadavg()[0]
    path = pathlib.Path(args.results or SAMPLING_RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


def _epoch_seconds(model, x, y, batch_size):
    """`(CPU seconds, wall seconds)` of one epoch."""
    cpu, wall = time.process_time(), time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.process_time() - cpu, time.perf_counter() - wall


def compare(factory, x, y, batch_size, repeats, physical=None):
    """Times plain and DP epochs alternately, so load changes hit both alike (with `physical`,
    DP in chunks of that many rows as a third trainer in each round).

    Returns the best examples/s of plain and DP (wall time) and the per-round speed ratios
    DP / plain, sorted: `{"cpu": [...], "wall": [...]}`, with `"chunks_cpu"` and
    `"chunks_wall"` (DP in chunks / plain) when `physical` is given.
    """
    trainers = [_compiled(factory, False), _compiled(factory, True)]
    if physical:
        trainers.append(_compiled(factory, True, physical_batch_size=physical))
    for model in trainers:  # warm-up: tracing, compilation and verification
        # on the timed epochs' own data: a private `fit` on a data set of another size costs
        # a second or more the first time (ten timed steps' worth on a small model)
        _epoch_seconds(model, x, y, batch_size)
    times = [[] for _ in trainers]
    for _ in range(repeats):
        for model, found in zip(trainers, times):
            found.append(_epoch_seconds(model, x, y, batch_size))
    ratios = {}
    for name, private_times in zip(("", "chunks_"), times[1:]):
        for i, clock in enumerate(("cpu", "wall")):
            ratios[name + clock] = sorted(p[i] / d[i] for p, d in zip(times[0], private_times))
    best = [len(x) / min(t[1] for t in found) for found in times[:2]]
    return best[0], best[1], ratios


# Steps per timed epoch and (rounds, calls per round) of the parts where a step takes seconds.
SLOW_MODELS = {"resnet": (8, (3, 2)), "wrn": (3, (3, 1))}


def _parts(factory, x, y, batch_size, rounds=5, calls=3):
    """The parts of one step (best ms/step of each), the per-round ratios DP step / limit, and
    the line that prints them."""
    keras.utils.set_random_seed(0)
    times = time_parts(factory(), x, y, batch_size, repeats=rounds, steps=calls)
    best = {part: min(values) for part, values in times.items()}
    limit = best["plain"] + best["noise"]
    per_round = sorted(d / (p + n) for d, p, n in zip(times["dp"], times["plain"], times["noise"]))
    line = (
        f"    parts (ms/step): plain {best['plain']:.1f}, norms {best['norms']:.1f}, "
        f"clipped sums {best['clipping'] - best['norms']:.1f}, noise {best['noise']:.1f}, "
        f"DP step {best['dp']:.1f}; limit (plain + noise) {limit:.1f}, "
        f"DP step / limit {best['dp'] / limit:.2f} (rounds {per_round[0]:.2f}-{per_round[-1]:.2f})"
    )
    row = {**best, "limit": limit, "dp_over_limit": best["dp"] / limit}
    return {**row, "dp_over_limit_rounds": per_round}, line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, help="training steps per timed epoch (default 30; ResNet 8, WRN 3)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed epochs")
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batch", help="batch sizes to run instead of each model's default")
    parser.add_argument("--no-parts", action="store_true", help="skip timing the step's parts")
    parser.add_argument("--physical", type=int, help="also DP in chunks of this many rows")
    parser.add_argument("--results", help=f"JSON file for the figures (default {RESULTS.name})")
    parser.add_argument(
        "--sampling",
        action="store_true",
        help="compare the default Poisson batches with the shuffled opt-in (CPU time)",
    )
    args = parser.parse_args(argv)
    names, skipped = _models(parser, args.models)
    if args.sampling:
        return main_sampling(args, names, skipped)
    rng = np.random.default_rng(0)
    load = os.getloadavg()[0]
    print(f"keras {keras.__version__}, keras_safe {keras_safe.__version__}")
    print(f"load average: {load:.2f}")
    results = {
        "keras": keras.__version__,
        "keras_safe": keras_safe.__version__,
        "repeats": args.repeats,
        "physical_batch_size": args.physical,
        "clock": "ratio: process CPU time per epoch; wall_ratio: wall time; parts: wall ms",
        "load_average_start": load,
        "skipped": skipped,
        "rows": [],
    }
    print(
        f"{'model':12} {'batch':>5} {'plain ex/s':>11} {'DP ex/s':>9} {'DP/plain CPU':>12}  "
        "rounds      wall"
    )
    for name in names:
        factory, default_batch, make_x, classes = MODELS[name]
        batches = [int(b) for b in args.batch.split(",")] if args.batch else [default_batch]
        steps, (rounds, calls) = SLOW_MODELS.get(name, (30, (5, 3)))
        steps = args.steps or steps
        for batch in batches:
            n = batch * steps
            x, y = make_x(n, rng), rng.integers(0, classes, n)
            plain, private, ratios = compare(factory, x, y, batch, args.repeats, args.physical)
            cpu, wall = ratios["cpu"], ratios["wall"]
            print(
                f"{name:12} {batch:5d} {plain:11.0f} {private:9.0f} "
                f"{cpu[len(cpu) // 2]:12.2f}  {cpu[0]:.2f}-{cpu[-1]:.2f}  "
                f"{wall[len(wall) // 2]:.2f}",
                flush=True,
            )
            row = {
                "model": name,
                "batch": batch,
                "steps": steps,
                "plain_examples_per_s": plain,
                "dp_examples_per_s": private,
                "ratio": cpu[len(cpu) // 2],
                "ratios": cpu,
                "wall_ratio": wall[len(wall) // 2],
                "wall_ratios": wall,
            }
            if args.physical:
                chunks = ratios["chunks_cpu"]
                row["chunks_ratio"] = chunks[len(chunks) // 2]
                row["chunks_ratios"] = chunks
                row["chunks_wall_ratio"] = ratios["chunks_wall"][len(chunks) // 2]
                print(
                    f"    in chunks of {args.physical}: DP/plain CPU "
                    f"{chunks[len(chunks) // 2]:.2f} (rounds {chunks[0]:.2f}-{chunks[-1]:.2f})",
                    flush=True,
                )
            if not args.no_parts:
                row["parts_ms"], line = _parts(factory, x, y, batch, rounds, calls)
                print(line, flush=True)
            results["rows"].append(row)
    results["load_average_end"] = os.getloadavg()[0]
    path = pathlib.Path(args.results or RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
