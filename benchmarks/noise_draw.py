"""The cost of DP-SGD's Gaussian noise: the draw per million values, and what it adds to a step.

Times, as CPU time (both cores' work; wall time on a shared machine swings), alternating in one
process:

- the default draw (`keras_safe.optimizers.noise.gaussian_noise`: radius from a float64
  logarithm, angle from a fraction exact in float64) and the snapped release of
  `secure_noise=True` (`snapped_gaussian_sum`, float64 throughout), per million values;
- a float32 Box-Muller draw of the kind that gives exact zeros (a float32 uniform angle), as a
  floor for what a sampler with float32 uniforms costs;
- the DP step of the MLP (784-512-512-10, batch 256) with `secure_noise` off and on.

Writes `benchmarks/results/noise_draw.json`.

    python benchmarks/noise_draw.py [--repeats 9]
"""

import argparse
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dp_models  # noqa: E402
import keras  # noqa: E402

import keras_safe  # noqa: E402
from keras_safe.optimizers.noise import gaussian_noise, snapped_gaussian_sum  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "noise_draw.json")
MILLION = 1_000_000


def float32_box_muller(size, seed):
    """A Box-Muller draw from a float32 uniform angle (2^23 directions): the cheap kind."""
    half = (size + 1) // 2
    u = tf.random.stateless_uniform([half], seed=seed, dtype=tf.float64)
    v = tf.random.stateless_uniform([half], seed=seed + [0, 1], dtype=tf.float32)
    radius = tf.sqrt(-2.0 * tf.math.log(tf.cast(1.0 - u, tf.float32)))
    angle = (2.0 * math.pi) * v
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)[:size]


def _cpu_ms(fn, repeats, inner=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(inner):
            fn()
        times.append((time.process_time() - start) / inner * 1000)
    return times


def draws(repeats):
    seed = tf.constant([1, 2], tf.int64)
    total = tf.zeros([MILLION], tf.float64)
    functions = {
        "float32_uniform_angle": tf.function(lambda: float32_box_muller(MILLION, seed)),
        "default": tf.function(lambda: gaussian_noise(MILLION, seed)),
        "secure_noise": tf.function(lambda: snapped_gaussian_sum(total, 1.0, 2.0**-36, seed)),
    }
    results = {name: [] for name in functions}
    for _ in range(repeats):  # alternating, one round each
        for name, fn in functions.items():
            results[name].append(float(np.median(_cpu_ms(lambda f=fn: f().numpy(), 1))))
    return {name: float(np.median(times)) for name, times in results.items()}


def mlp_steps(repeats):
    factory, batch, data, classes = dp_models.MODELS["mlp"]
    rng = np.random.default_rng(0)
    x, y = data(batch * 4, rng), rng.integers(0, classes, batch * 4)

    def step_for(secure):
        model = factory()
        model.compile(
            optimizer=keras_safe.optimizers.DPSGD(
                learning_rate=0.01,
                l2_norm_clip=1.0,
                noise_multiplier=1.1,
                num_examples=len(x),
                batch_size=batch,
                secure_noise=secure,
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        keras_safe.privacy.make_private(model)
        keras_safe.training.verify_model(model, x[:4], y[:4])
        xb, yb = tf.constant(x[:batch]), tf.constant(y[:batch])

        @tf.function
        def step():
            grads = keras_safe.privacy.dp_gradients(model, xb, yb)
            model.optimizer.apply(grads, model.trainable_variables)

        return step

    steps = {"default": step_for(False), "secure_noise": step_for(True)}
    results = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            results[name].append(float(np.median(_cpu_ms(step, 1, inner=10))))
    return {name: float(np.median(times)) for name, times in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="alternating rounds")
    args = parser.parse_args()
    per_million = draws(args.repeats)
    step = mlp_steps(args.repeats)
    result = {
        "cpu_ms_per_million_values": {k: round(v, 2) for k, v in per_million.items()},
        "mlp_dp_step_cpu_ms": {k: round(v, 2) for k, v in step.items()},
        "secure_over_default_step": round(step["secure_noise"] / step["default"], 2),
        "default_over_float32_draw": round(
            per_million["default"] / per_million["float32_uniform_angle"], 2
        ),
        "secure_over_default_draw": round(per_million["secure_noise"] / per_million["default"], 2),
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
    }
    for name, value in result.items():
        print(f"{name}: {value}")
    dp_models.write_result(RESULTS, result)


if __name__ == "__main__":
    main()
