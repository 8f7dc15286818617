"""TensorFlow Privacy's DP-SGD trainers against plain Keras, measured side by side in one process.

This is the reference that keras_safe's own ``benchmarks/dp_overhead.py`` is compared with.
TensorFlow Privacy 0.9.0 needs TensorFlow 2.15 (Keras 2), so this script runs in its own virtual
environment (see ``benchmarks/legacy/README.md``), never in the keras_safe environment.

Models (synthetic data of the right shapes; speed does not depend on the values):
- cnn: TF Privacy's tutorial CNN on 28x28x1, batch 250: Conv2D(16, 8, stride 2, same),
  MaxPool2D(2, 1), Conv2D(32, 4, stride 2, valid), MaxPool2D(2, 1), Flatten, Dense(32), Dense(10).
- mlp: Dense 784-512-512-10, batch 256.

Trainers (SGD, learning rate 0.25; DP ones with l2_norm_clip=1.0, noise_multiplier=1.1 and one
example per microbatch):
- plain: ``tf.keras.Sequential`` with ``tf.keras.optimizers.SGD`` (the 1.0 reference).
- DPKerasSGDOptimizer: per-example loss vector, gradients one microbatch at a time (cnn only).
- VectorizedDPKerasSGDOptimizer: per-example loss vector, vectorized Jacobian (cnn only).
- DPSequential: the DP model class, per-example gradients with ``tf.vectorized_map``, XLA.
- DPSequential+registry: the same with the fast gradient clipping layer registry (ghost norms); its
  fast path applies only when every trainable layer is registered (Dense and Embedding in 0.9.0), so
  the cnn falls back to the vectorized path. The "path" column says which one ran.

Throughput is the best of ``--repeats`` timed ``fit`` epochs of ``--steps`` batches after a warm-up
``fit``; the two slow optimizers time ``--slow-steps`` batches instead (one step takes seconds).

Usage:
    benchmarks/legacy/.venv/bin/python benchmarks/legacy/tf_privacy_cnn.py \
        [--steps 30] [--slow-steps 3] [--repeats 3] [--models cnn,mlp]
Prints, per model, examples/s of each trainer and its ratio to plain Keras.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_privacy  # noqa: E402
from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry  # noqa: E402
from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPSequential  # noqa: E402

# TF Privacy and pfor log warnings per traced layer ("uses a while_loop", AutoGraph); keep errors.
tf.get_logger().setLevel("ERROR")

L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.25


def cnn_layers():
    """Returns the layers of TF Privacy's tutorial CNN (28x28x1 input, 10 logits)."""
    return [
        tf.keras.Input((28, 28, 1)),
        tf.keras.layers.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
        tf.keras.layers.MaxPool2D(2, 1),
        tf.keras.layers.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
        tf.keras.layers.MaxPool2D(2, 1),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(32, activation="relu"),
        tf.keras.layers.Dense(10),
    ]


def mlp_layers():
    """Returns the layers of a 784-512-512-10 multilayer perceptron (10 logits)."""
    return [
        tf.keras.Input((784,)),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(10),
    ]


# name: (layer factory, batch size, input shape, trainers)
MODELS = {
    "cnn": (
        cnn_layers,
        250,
        (28, 28, 1),
        (
            "plain",
            "DPKerasSGDOptimizer",
            "VectorizedDPKerasSGDOptimizer",
            "DPSequential",
            "DPSequential+registry",
        ),
    ),
    "mlp": (
        mlp_layers,
        256,
        (784,),
        ("plain", "DPSequential", "DPSequential+registry"),
    ),
}
ROW = "{:5} {:>5} {:30} {:15} {:>5} {:>10}  {}"
SLOW = ("DPKerasSGDOptimizer", "VectorizedDPKerasSGDOptimizer")


def _loss(per_example):
    """Sparse categorical crossentropy from logits; a per-example vector when asked."""
    if per_example:
        return tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE
        )
    return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build(trainer, layers_fn, batch_size):
    """Builds and compiles one trainer.

    Args:
        trainer: one of the trainer names in ``MODELS``.
        layers_fn: a function returning fresh layers (first item a ``tf.keras.Input``).
        batch_size: the training batch size (one example per microbatch).

    Returns:
        A tuple ``(model, path)``: the compiled model and how it computes per-example gradients.

    Raises:
        ValueError: if ``trainer`` is not a known trainer name.
    """
    tf.keras.utils.set_random_seed(0)
    if trainer == "plain":
        model = tf.keras.Sequential(layers_fn())
        model.compile(optimizer=tf.keras.optimizers.SGD(LEARNING_RATE), loss=_loss(False))
        return model, "-"
    if trainer in SLOW:
        cls = getattr(tensorflow_privacy, trainer)
        optimizer = cls(
            l2_norm_clip=L2_NORM_CLIP,
            noise_multiplier=NOISE_MULTIPLIER,
            num_microbatches=batch_size,
            learning_rate=LEARNING_RATE,
        )
        model = tf.keras.Sequential(layers_fn())
        model.compile(optimizer=optimizer, loss=_loss(True))
        return model, "jacobian, loop" if trainer == "DPKerasSGDOptimizer" else "jacobian, vmap"
    if trainer in ("DPSequential", "DPSequential+registry"):
        registry = None
        if trainer == "DPSequential+registry":
            registry = layer_registry.make_default_layer_registry()
        model = DPSequential(
            l2_norm_clip=L2_NORM_CLIP,
            noise_multiplier=NOISE_MULTIPLIER,
            num_microbatches=None,
            use_xla=True,
            layer_registry=registry,
            layers=layers_fn(),
        )
        model.compile(optimizer=tf.keras.optimizers.SGD(LEARNING_RATE), loss=_loss(False))
        # Read only to report which of TF Privacy's two clipping paths ran.
        fast = getattr(model, "_enable_fast_peg_computation", False)
        return model, "ghost norms" if fast else "vmap, XLA"
    known = sorted({t for model in MODELS.values() for t in model[3]})
    raise ValueError(f"trainer={trainer!r} is unknown; use one of {known}.")


def throughput(model, x, y, batch_size, steps, repeats, warmup_steps):
    """Best examples/s of ``repeats`` timed one-epoch fits of ``steps`` batches after a warm-up."""
    n = batch_size * steps
    model.fit(
        x[: batch_size * warmup_steps],
        y[: batch_size * warmup_steps],
        batch_size=batch_size,
        verbose=0,
    )
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(x[:n], y[:n], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        best = max(best, n / (time.perf_counter() - start))
    return best


def _ratio(value, reference):
    if value >= reference:
        return f"{value / reference:.2f}"
    return f"{value / reference:.3f} (1/{reference / value:.0f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="batches per timed fit")
    parser.add_argument(
        "--slow-steps",
        type=int,
        default=3,
        help="batches per timed fit for the two slow optimizers",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per trainer (best kept)")
    parser.add_argument(
        "--models", default="cnn,mlp", help=f"comma-separated, from {','.join(MODELS)}"
    )
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(
            f"--models has unknown model(s) {unknown}; "
            f"use a comma-separated subset of {','.join(MODELS)}."
        )
    for flag in ("steps", "slow_steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}.")

    print(
        f"python {platform.python_version()}, tensorflow {tf.__version__}, "
        f"tensorflow-privacy {tensorflow_privacy.__version__}, {os.cpu_count()} CPUs"
    )
    print("load average at start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    rng = np.random.default_rng(0)
    header = ROW.format("model", "batch", "trainer", "path", "steps", "examples/s", "vs plain")
    print(header)
    print("-" * len(header))
    for name in names:
        layers_fn, batch, shape, trainers = MODELS[name]
        n = batch * max(args.steps, args.slow_steps)
        x = rng.normal(size=(n, *shape)).astype("float32")
        y = rng.integers(0, 10, n)
        plain = None
        for trainer in trainers:
            model, path = build(trainer, layers_fn, batch)
            slow = trainer in SLOW
            steps = args.slow_steps if slow else args.steps
            speed = throughput(model, x, y, batch, steps, args.repeats, 1 if slow else 2)
            plain = speed if plain is None else plain
            print(
                ROW.format(
                    name, batch, trainer, path, steps, f"{speed:,.0f}", _ratio(speed, plain)
                ),
                flush=True,
            )
            del model
            tf.keras.backend.clear_session()
    print("load average at end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
