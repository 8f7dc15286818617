"""DP fine-tuning with LoRA adapters: DP-SGD speed and peak memory over plain Keras.

Models (synthetic data of the right shapes; speed does not depend on the values):
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

import keras_safe  # noqa: E402

try:
    import keras_hub
except ImportError:  # the optional `hub` extra
    keras_hub = None

LORA_RANK = 8
SEQUENCE = 64
VOCABULARY = 2000


def _block(h, width, heads, feed_forward):
    attention = keras.layers.MultiHeadAttention(heads, width // heads)
    h = keras.layers.LayerNormalization()(h + attention(h, h))
    ff = keras.layers.Dense(feed_forward, activation="relu")(h)
    return keras.layers.LayerNormalization()(h + keras.layers.Dense(width)(ff)), attention


def transformer(width=128, heads=4, feed_forward=256, blocks=2):
    """The LoRA text classifier: base weights frozen, adapters and the head trainable."""
    ids = keras.Input((SEQUENCE,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, width)(ids)
    places = keras.ops.cumsum(keras.ops.ones_like(ids), axis=1) - 1
    h = h + keras.layers.Embedding(SEQUENCE, width)(places)
    attentions = []
    for _ in range(blocks):
        h, attention = _block(h, width, heads, feed_forward)
        attentions.append(attention)
    h = keras.layers.GlobalAveragePooling1D()(h)
    head = keras.layers.Dense(2)
    model = keras.Model(ids, head(h))
    dense = [lyr for lyr in model.layers if isinstance(lyr, keras.layers.Dense)]
    adapted = [a.query_dense for a in attentions] + [a.value_dense for a in attentions]
    adapted += [lyr for lyr in dense if lyr is not head]
    for layer in model.layers:
        layer.trainable = layer is head
    for attention in attentions:  # its query and value projections get adapters
        attention.trainable = True
        attention.key_dense.trainable = False
        attention.output_dense.trainable = False
    for layer in adapted:
        layer.trainable = False
        layer.enable_lora(LORA_RANK)  # adds the adapters, trainable; freezes the kernel
        layer.trainable = True
        for variable in layer.weights:
            variable.trainable = variable.name.startswith("lora_")
    return model


def hub_classifier():
    """A tiny keras-hub BERT classifier with LoRA on the backbone (random weights)."""
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=SEQUENCE,
    )
    backbone.enable_lora(LORA_RANK)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0
    )


def _token_data(n, rng, hub):
    ids = rng.integers(1, VOCABULARY, (n, SEQUENCE)).astype("int32")
    if not hub:
        return ids
    lengths = rng.integers(SEQUENCE // 2, SEQUENCE + 1, n)
    mask = np.arange(SEQUENCE)[None, :] < lengths[:, None]
    ids = np.where(mask, ids, 0).astype("int32")
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}


MODELS = {"transformer": (transformer, 64), "hub": (hub_classifier, 64)}


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


def _head(x, count):
    return keras.tree.map_structure(lambda a: a[:count], x)


def _epoch_seconds(model, x, y, batch_size):
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return time.perf_counter() - start


def speed(name, steps, repeats):
    """Best examples/s of plain and DP training, and the median DP / plain ratio."""
    x, y, batch = _data(name, steps)
    plain, private = _compiled(name, False), _compiled(name, True)
    for model in (plain, private):  # warm-up: tracing, compilation, verification
        model.fit(_head(x, batch * 2), y[: batch * 2], batch_size=batch, verbose=0)
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
