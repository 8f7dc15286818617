"""DP fine-tuning with LoRA adapters: DP-SGD speed and peak memory over plain Keras.

Models (from `dp_models.py`; synthetic data of the right shapes; speed does not depend on the
values):
- transformer: a text classifier, token and position embeddings, 2 transformer blocks
  (d=128, 4 heads, feed-forward 256), average pooling and a 2-class head; LoRA rank 8 on the
  attention query/value projections and on the feed-forward Dense layers; every base weight
  frozen (only the adapters and the head train). Sequences of 64 tokens, batch 64.
- hub: a tiny keras-hub BERT backbone (2 layers, d=64) with `backbone.enable_lora(8)` and a
  `BertTextClassifier` head, built from its config with random weights (no download); skipped
  where keras-hub is not installed.

Usage: python benchmarks/dp_lora.py [--steps 30] [--repeats 5] [--models transformer,hub]
       [--results benchmarks/results/dp_lora.json]

Speed: plain and DP epochs timed alternately in one process (plain, DP, plain, DP, ...), so a
change of machine load hits both; printed are the best examples/s of each and the median of
the per-round ratios. Memory: each trainer runs in its own process (peak resident memory
cannot be reset inside one); printed are the peak RSS and its growth during `fit` over the
RSS after the model and data were set up, and their ratios DP / plain. The figures are also
written to `--results` (JSON), the file the README's figures can name as their source.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from dp_memory import rss_mb  # noqa: E402  (benchmarks/ is on the path as the script's folder)
from dp_models import LORA_TOKENS, LORA_VOCABULARY, bert_classifier, lora_transformer  # noqa: E402

import keras_safe  # noqa: E402

try:
    import keras_hub
except ImportError:  # the optional `hub` extra
    keras_hub = None

SEQUENCE = LORA_TOKENS
VOCABULARY = LORA_VOCABULARY


def _token_data(n, rng, hub):
    ids = rng.integers(1, VOCABULARY, (n, SEQUENCE)).astype("int32")
    if not hub:
        return ids
    lengths = rng.integers(SEQUENCE // 2, SEQUENCE + 1, n)
    mask = np.arange(SEQUENCE)[None, :] < lengths[:, None]
    ids = np.where(mask, ids, 0).astype("int32")
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}


MODELS = {"transformer": (lora_transformer, 64), "hub": (bert_classifier, 64)}


def _compiled(name, dp):
    keras.utils.set_random_seed(0)
    model = MODELS[name][0]()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if dp:
        optimizer = keras_safe.optimizers.DPSGD(
            learning_rate=0.05, l2_norm_clip=1.0, noise_multiplier=1.1
        )
        model.compile(optimizer=optimizer, loss=loss)
        model = keras_safe.privacy.make_private(model)
    else:
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss)
    return model


def _data(name, steps, seed=0):
    batch = MODELS[name][1]
    rng = np.random.default_rng(seed)
    n = batch * steps
    return _token_data(n, rng, name == "hub"), rng.integers(0, 2, n), batch


def _epoch_seconds(model, x, y, batch_size):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def speed(name, steps, repeats):
    """Best examples/s of plain and DP training, and the median DP / plain ratio."""
    x, y, batch = _data(name, steps)
    plain, private = _compiled(name, False), _compiled(name, True)
    for model in (plain, private):  # warm-up: tracing, compilation, verification
        # on the timed epochs' own data: a private `fit` on a data set of another size costs
        # a second or more the first time
        _epoch_seconds(model, x, y, batch)
    plain_times, private_times = [], []
    for _ in range(repeats):
        plain_times.append(_epoch_seconds(plain, x, y, batch))
        private_times.append(_epoch_seconds(private, x, y, batch))
    ratios = sorted(p / d for p, d in zip(plain_times, private_times))
    n = len(y)
    return n / min(plain_times), n / min(private_times), ratios[len(ratios) // 2], ratios


def memory_worker(name, mode, steps):
    x, y, batch = _data(name, steps)
    model = _compiled(name, mode == "dp")
    baseline = rss_mb()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak": peak, "growth": peak - baseline}))


def memory(name, steps):
    results = {}
    for mode in ("plain", "dp"):
        command = [sys.executable, __file__, f"--worker={mode}", f"--models={name}"]
        out = subprocess.run(command + [f"--steps={steps}"], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed epochs")
    parser.add_argument("--models", default="transformer,hub")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--worker", choices=("plain", "dp"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--results",
        default=str(pathlib.Path(__file__).resolve().parent / "results" / "dp_lora.json"),
        help="JSON file for the figures",
    )
    args = parser.parse_args(argv)
    if args.worker:
        return memory_worker(args.models, args.worker, args.steps)
    hub = keras_hub.__version__ if keras_hub else "not installed"
    load = os.getloadavg()[0]
    print(f"keras {keras.__version__}, keras_safe {keras_safe.__version__}, keras-hub {hub}")
    print(f"load average: {load:.2f}")
    results = {
        "keras": keras.__version__,
        "keras_safe": keras_safe.__version__,
        "keras_hub": hub,
        "steps": args.steps,
        "repeats": args.repeats,
        "load_average_start": load,
        "rows": [],
    }
    header = f"{'model':12} {'batch':>5} {'plain ex/s':>11} {'DP ex/s':>9} {'DP/plain':>9}"
    if not args.no_memory:
        header += f" {'peak DP/plain':>14} {'growth DP/plain':>16}"
    print(header)
    for name in args.models.split(","):
        if name == "hub" and keras_hub is None:
            print(f"{name:12} skipped: keras-hub is not installed (pip install keras_safe[hub])")
            continue
        plain, private, ratio, ratios = speed(name, args.steps, args.repeats)
        line = f"{name:12} {MODELS[name][1]:5d} {plain:11.0f} {private:9.0f} {ratio:9.2f}"
        row = {
            "model": name,
            "batch": MODELS[name][1],
            "plain_examples_per_s": plain,
            "dp_examples_per_s": private,
            "ratio": ratio,
            "ratios": sorted(ratios),
        }
        if not args.no_memory:
            mem = memory(name, args.steps)
            peak = mem["dp"]["peak"] / mem["plain"]["peak"]
            growth = mem["dp"]["growth"] / max(mem["plain"]["growth"], 1e-9)
            line += f" {peak:14.2f} {growth:16.2f}"
            row.update(memory_mb=mem, peak_ratio=peak, growth_ratio=growth)
        print(line, f"(ratios {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
        results["rows"].append(row)
    results["load_average_end"] = os.getloadavg()[0]
    path = pathlib.Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
