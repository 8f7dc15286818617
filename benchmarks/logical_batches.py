"""Large logical batches: DP-SGD at a logical batch of 4096 clipped in physical chunks of 256.

For each model, `fit` epochs alternating in one process, CPU time per epoch (both cores' work;
wall time on a shared machine swings), printed beside wall time:

- plain: Keras's `fit` with the model's optimizer at `batch_size=4096`;
- dp: a private `fit` at `batch_size=4096` (Poisson logical batches at rate 4096 / n, padded to
  a multiple of 256) with `physical_batch_size=256`: each logical batch is clipped in chunks of
  256 rows and draws its noise once;
- accumulation (with `--accumulation`): the older way to a large batch, a private `fit` at
  `batch_size=256` with `gradient_accumulation_steps=16` (noise on every physical batch, each
  accounted as its own Poisson sample at a sixteenth of the noise variance), and its epsilon
  beside the logical batch's for the same epochs.

Reports `dp_over_plain_speed` (targets: 0.85 for MLP, CNN and transformer). Beside it,
`plain_chunks`: plain Keras passing the same 256-row batches (`SGD(gradient_accumulation_steps=16)`,
the same update every 4096 examples), timed in the same rounds: `plain_chunks_over_plain_speed`
is what 256-row passes cost plain Keras itself, and `dp_over_plain_chunks_speed` the DP step's
distance to that limit. Writes `benchmarks/results/logical_batches.json`.

With `--plain-in-chunks`, plain Keras reaches the logical batch by accumulating 16 batches of 256
(`SGD(gradient_accumulation_steps=16)`, the same update every 4096 examples) instead of one batch
of 4096: for the conv nets, whose plain activations at 4096 rows outgrow the machine's memory.
`--results` names another result file (default `logical_batches.json`).

With `--memory`, instead: the peak resident memory of two steps of `fit` at the logical batch,
each trainer in its own process (plain Keras, DP in physical chunks, DP on the whole logical
batch at once), written to `benchmarks/results/logical_batches_memory.json`.

    python benchmarks/logical_batches.py [--repeats 3] [--models mlp cnn transformer]
    python benchmarks/logical_batches.py --memory [--models cnn]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dp_models  # noqa: E402
import keras  # noqa: E402

import keras_safe  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "logical_batches.json")
MEMORY_RESULTS = os.path.join(HERE, "results", "logical_batches_memory.json")
MEMORY_MODES = ("plain", "dp_chunks", "dp_whole")
LOGICAL, PHYSICAL, NOISE = 4096, 256, 1.1


def _epoch(model, x, y, batch_size):
    cpu, wall = time.process_time(), time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    return time.process_time() - cpu, time.perf_counter() - wall


def _trainers(name, examples, accumulation, plain_in_chunks=False):
    factory, _, data, classes = dp_models.MODELS[name]
    rng = np.random.default_rng(0)
    x, y = data(examples, rng), rng.integers(0, classes, examples)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def plain(in_chunks):
        model = factory()
        if in_chunks:
            steps = LOGICAL // PHYSICAL
            sgd = keras.optimizers.SGD(0.01, gradient_accumulation_steps=steps)
            model.compile(optimizer=sgd, loss=loss)
            return model, PHYSICAL
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        return model, LOGICAL

    def dp(batch, **options):
        model = factory()
        inner = (
            {"gradient_accumulation_steps": options.pop("accumulate")}
            if options.get("accumulate")
            else {}
        )
        options.pop("accumulate", None)
        model.compile(
            optimizer=keras_safe.optimizers.DPSGD(
                learning_rate=0.01, l2_norm_clip=1.0, noise_multiplier=NOISE, **inner, **options
            ),
            loss=loss,
        )
        return keras_safe.privacy.make_private(model), batch

    trainers = {"plain": plain(plain_in_chunks), "dp": dp(LOGICAL, physical_batch_size=PHYSICAL)}
    if not plain_in_chunks:
        # What plain Keras does with the same 256-row passes: the limit of a step in chunks.
        trainers["plain_chunks"] = plain(True)
    if accumulation:
        trainers["accumulation"] = dp(PHYSICAL, accumulate=LOGICAL // PHYSICAL)
    return trainers, x, y


def measure(name, examples, repeats, accumulation, plain_in_chunks=False):
    trainers, x, y = _trainers(name, examples, accumulation, plain_in_chunks)
    for model, batch in trainers.values():  # warm-up epoch: tracing, verification
        _epoch(model, x, y, batch)
    cpu = {key: [] for key in trainers}
    wall = {key: [] for key in trainers}
    for _ in range(repeats):
        for key, (model, batch) in trainers.items():
            c, w = _epoch(model, x, y, batch)
            cpu[key].append(c)
            wall[key].append(w)
    speed = [p / d for p, d in zip(cpu["plain"], cpu["dp"])]
    row = {
        "model": name,
        "examples": examples,
        "logical_batch": LOGICAL,
        "physical_batch": PHYSICAL,
        "plain": f"accumulated {PHYSICAL}-row batches" if plain_in_chunks else "one batch",
        "cpu_seconds": {k: [round(v, 3) for v in t] for k, t in cpu.items()},
        "wall_seconds": {k: [round(v, 3) for v in t] for k, t in wall.items()},
        "dp_over_plain_speed": round(float(np.median(speed)), 3),
        "dp_over_plain_speed_range": [round(min(speed), 3), round(max(speed), 3)],
        "dp_over_plain_wall_speed": round(
            float(np.median([p / d for p, d in zip(wall["plain"], wall["dp"])])), 3
        ),
    }
    if "plain_chunks" in cpu:
        limit = [p / d for p, d in zip(cpu["plain_chunks"], cpu["dp"])]
        row["dp_over_plain_chunks_speed"] = round(float(np.median(limit)), 3)
        chunked = [p / c for p, c in zip(cpu["plain"], cpu["plain_chunks"])]
        row["plain_chunks_over_plain_speed"] = round(float(np.median(chunked)), 3)
    if accumulation:
        acc = [p / a for p, a in zip(cpu["plain"], cpu["accumulation"])]
        row["accumulation_over_plain_speed"] = round(float(np.median(acc)), 3)
        ledgers = {
            key: keras_safe.privacy.get_ledger(trainers[key][0]) for key in ("dp", "accumulation")
        }
        epochs = repeats + 1
        row["epsilon_after_epochs"] = epochs
        row["epsilon"] = {key: round(ledger.epsilon(1e-5), 3) for key, ledger in ledgers.items()}
    return row


def memory_worker(name, mode, examples):
    """Peak RSS (MB) of two `fit` steps at the logical batch, in this process."""
    factory, _, data, classes = dp_models.MODELS[name]
    rng = np.random.default_rng(0)
    x, y = data(examples, rng), rng.integers(0, classes, examples)
    model = factory()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    else:
        physical = PHYSICAL if mode == "dp_chunks" else None
        model.compile(
            optimizer=keras_safe.optimizers.DPSGD(
                learning_rate=0.01,
                l2_norm_clip=1.0,
                noise_multiplier=NOISE,
                physical_batch_size=physical,
            ),
            loss=loss,
        )
        model = keras_safe.privacy.make_private(model)
    model.fit(x, y, batch_size=LOGICAL, epochs=1, steps_per_epoch=2, verbose=0)
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(models, examples):
    rows = []
    for name in models:
        row = {"model": name, "logical_batch": LOGICAL, "physical_batch": PHYSICAL}
        for mode in MEMORY_MODES:
            command = [sys.executable, __file__, "--memory-worker", name, mode]
            command += ["--examples", str(examples)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            row[f"{mode}_peak_mb"] = round(json.loads(out.strip().splitlines()[-1])["peak_mb"])
        row["chunks_over_plain"] = round(row["dp_chunks_peak_mb"] / row["plain_peak_mb"], 3)
        row["whole_over_plain"] = round(row["dp_whole_peak_mb"] / row["plain_peak_mb"], 3)
        print(json.dumps(row))
        rows.append(row)
    dp_models.write_result(MEMORY_RESULTS, {"rows": rows, "examples": examples})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating epochs")
    parser.add_argument("--examples", type=int, default=32768, help="training examples")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    parser.add_argument("--accumulation", action="store_true", help="also time accumulation")
    parser.add_argument("--memory", action="store_true", help="peak memory instead of speed")
    parser.add_argument(
        "--plain-in-chunks", action="store_true", help="plain Keras accumulates 256-row batches"
    )
    parser.add_argument("--results", default=RESULTS, help="the speed result file")
    parser.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(*args.memory_worker, args.examples)
    if args.memory:
        return memory(args.models, args.examples)
    rows = []
    for name in args.models:
        row = measure(name, args.examples, args.repeats, args.accumulation, args.plain_in_chunks)
        print(json.dumps({k: v for k, v in row.items() if "seconds" not in k}))
        rows.append(row)
    result = {
        "rows": rows,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "load_average_start": os.getloadavg()[0],
        "clock": "process CPU time per epoch (wall time beside it)",
    }
    dp_models.write_result(args.results, result)


if __name__ == "__main__":
    main()
