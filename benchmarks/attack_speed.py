"""PGD throughput: keras_safe's `pgd` against a hand-written `tf.function` + `GradientTape` loop.

Both attack the same Keras model, on the same inputs, with the same settings (L-inf PGD from a
random start, cross-entropy on logits, projection onto the ball and the input range [0, 1]).
The hand-written loop gets its best case: the batches are tensors before the clock starts, and
only its calls and the copy of the results to numpy are timed; keras_safe's `pgd` is timed as a
user calls it, numpy in and numpy out. Runs are interleaved and the best of `--repeats` is kept.

    python benchmarks/attack_speed.py                   # digits MLP and a small CNN, PGD-20
    python benchmarks/attack_speed.py --models mlp --steps 40 --batch 512

Prints examples per second, the ratio keras_safe / hand-written (target: >= 0.9), and the
accuracy each attack leaves (the two must agree to within random-start noise). `--jit` also
times keras_safe's attack compiled with XLA.

Example output (2 shared CPU cores, load average 5.5 at the start and 3.4 at the end):

    PGD-20, linf eps=0.1, step 0.0125, batch 256, 7,188 examples, best of 7
    model attack                  examples/s  vs hand  adv acc
    ----------------------------------------------------------
    mlp   hand-written loop           13,468     1.00    0.578
    mlp   keras_safe pgd              13,368     0.99    0.579
    mlp   keras_safe pgd (XLA)         9,081     0.67    0.578
    cnn   hand-written loop              987     1.00    0.599
    cnn   keras_safe pgd               1,137     1.15    0.599
    cnn   keras_safe pgd (XLA)           240     0.24    0.600

On these CPUs XLA makes the attack slower (its convolutions especially); it is off by default.
ART's PGD on the same models: `benchmarks/art/` (about 1/10 of the hand-written loop's speed).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_safe.security import pgd  # noqa: E402


def digits(repeat):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return np.tile(x, (repeat, 1)), np.tile(y, repeat).astype("int32")


def build(name):
    if name == "mlp":
        layers = [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    elif name == "cnn":
        layers = [
            keras.Input((64,)),
            keras.layers.Reshape((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    else:
        raise SystemExit(f"unknown model {name!r}; use mlp or cnn")
    model = keras.Sequential(layers)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def hand_written(model, epsilon, step_size, steps):
    """The loop a user would write: random start, sign steps, projection, clipping."""

    @tf.function(reduce_retracing=True)
    def attack(x, y):
        x_adv = x + tf.random.uniform(tf.shape(x), -epsilon, epsilon)
        x_adv = tf.clip_by_value(x_adv, 0.0, 1.0)
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                logits = model(x_adv, training=False)
                loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
            grad = tape.gradient(loss, x_adv)
            x_adv = x_adv + step_size * tf.sign(grad)
            x_adv = tf.clip_by_value(x_adv, x - epsilon, x + epsilon)
            x_adv = tf.clip_by_value(x_adv, 0.0, 1.0)
        return x_adv

    return attack


def accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, batch_size=1024, verbose=0), 1) == y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat-data", type=int, default=4, help="copies of the 1,797 digits")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jit", action="store_true", help="also time pgd(..., jit_compile=True)")
    args = parser.parse_args()
    x, y = digits(args.repeat_data)
    step = 2.5 * args.epsilon / args.steps
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(
        f"PGD-{args.steps}, linf eps={args.epsilon:g}, step {step:.4f}, batch {args.batch}, "
        f"{len(x):,} examples, best of {args.repeats}"
    )
    header = f"{'model':5} {'attack':22} {'examples/s':>11} {'vs hand':>8} {'adv acc':>8}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        model = build(name)
        model.fit(x[:1500], y[:1500], epochs=5, batch_size=64, verbose=0)
        reference = hand_written(model, args.epsilon, step, args.steps)
        batches = [
            (tf.constant(x[i : i + args.batch]), tf.constant(y[i : i + args.batch]))
            for i in range(0, len(x), args.batch)
        ]

        def run_reference(batches=batches, reference=reference):
            return np.concatenate([reference(xb, yb).numpy() for xb, yb in batches])

        settings = dict(epsilon=args.epsilon, step_size=step, steps=args.steps)
        settings.update(clip_min=0.0, clip_max=1.0, batch_size=args.batch, from_logits=True)
        runners = {
            "hand-written loop": run_reference,
            "keras_safe pgd": lambda m=model, s=settings: pgd(m, x, y, **s),
        }
        if args.jit:
            runners["keras_safe pgd (XLA)"] = lambda m=model, s=settings: pgd(
                m, x, y, jit_compile=True, **s
            )
        best = dict.fromkeys(runners, np.inf)
        outputs = {}
        for label, runner in runners.items():  # warm-up: tracing and compiling
            outputs[label] = runner()
        for _ in range(args.repeats):
            for label, runner in runners.items():
                start = time.perf_counter()
                outputs[label] = runner()
                best[label] = min(best[label], time.perf_counter() - start)
        base = len(x) / best["hand-written loop"]
        for label in runners:
            rate = len(x) / best[label]
            adv = accuracy(model, outputs[label], y)
            print(f"{name:5} {label:22} {rate:11,.0f} {rate / base:8.2f} {adv:8.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
