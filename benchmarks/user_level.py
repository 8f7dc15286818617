"""User-level DP-SGD beside example-level DP-SGD: the cost of clipping users instead of examples.

For each model, three compiled steps on the same physical batch (the model's default batch of
rows from `dp_models.MODELS`), run alternately in one process, CPU time per step (both cores'
work; wall time on a shared machine swings):

- plain: Keras's step with the model's optimizer;
- example: the DP step with per-example clipping (`privacy_unit="example"`);
- user: the DP step with `privacy_unit="user"` and `examples_per_user=4`: the same rows laid
  out as `rows / 4` users' slots of 4 rows (every slot full), whose summed gradients are
  clipped, as `keras_safe.privacy.poisson_batches(..., users=...)` lays them out.

Reports `user_over_example` (target: at most 1.10) and each DP step over the plain step. Writes
`benchmarks/results/user_level.json`.

    python benchmarks/user_level.py [--repeats 5] [--models mlp cnn transformer]
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dp_models  # noqa: E402
import keras  # noqa: E402

import keras_safe  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "user_level.json")
EXAMPLES_PER_USER = 4


def _cpu_ms(fn, inner):
    fn()
    start = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - start) / inner * 1000


def steps_for(name):
    factory, batch, data, classes = dp_models.MODELS[name]
    batch -= batch % EXAMPLES_PER_USER  # whole slots (the CNN's 250 rows become 248)
    rng = np.random.default_rng(0)
    x, y = data(batch, rng), rng.integers(0, classes, batch)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    xb, yb = tf.constant(x), tf.constant(y)
    weights = tf.ones([batch], tf.float32)
    users = tf.constant(np.repeat(np.arange(batch // EXAMPLES_PER_USER), EXAMPLES_PER_USER))

    def dp_step(unit):
        model = factory()
        per_user = EXAMPLES_PER_USER if unit == "user" else None
        units = batch // EXAMPLES_PER_USER if unit == "user" else batch
        model.compile(
            optimizer=keras_safe.optimizers.DPSGD(
                learning_rate=0.01,
                l2_norm_clip=1.0,
                noise_multiplier=1.1,
                num_examples=units * 20,
                batch_size=units,
                privacy_unit=unit,
                examples_per_user=per_user,
            ),
            loss=loss,
        )
        keras_safe.privacy.make_private(model)
        keras_safe.training.verify_model(model, x[:4], y[:4])

        @tf.function
        def step():
            extra = {"users": users} if unit == "user" else {}
            grads = keras_safe.privacy.dp_gradients(model, xb, yb, weights, **extra)
            model.optimizer.apply(grads, model.trainable_variables)

        return step

    plain_model = factory()
    plain_model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)

    @tf.function
    def plain():
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(loss(yb, plain_model(xb, training=True)))
        grads = tape.gradient(value, plain_model.trainable_variables)
        plain_model.optimizer.apply(grads, plain_model.trainable_variables)

    return {"plain": plain, "example": dp_step("example"), "user": dp_step("user")}, batch


def measure(name, repeats, inner):
    steps, batch = steps_for(name)
    times = {key: [] for key in steps}
    for _ in range(repeats):  # alternating rounds
        for key, step in steps.items():
            times[key].append(_cpu_ms(step, inner))
    median = {key: float(np.median(t)) for key, t in times.items()}
    ratios = [u / e for u, e in zip(times["user"], times["example"])]
    return {
        "model": name,
        "rows": batch,
        "examples_per_user": EXAMPLES_PER_USER,
        "cpu_ms": {key: round(value, 2) for key, value in median.items()},
        "user_over_example": round(float(np.median(ratios)), 3),
        "user_over_example_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "example_dp_over_plain_speed": round(median["plain"] / median["example"], 3),
        "user_dp_over_plain_speed": round(median["plain"] / median["user"], 3),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    parser.add_argument("--inner", type=int, default=5, help="steps per timing")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "transformer"])
    args = parser.parse_args()
    rows = []
    for name in args.models:
        row = measure(name, args.repeats, args.inner)
        print(json.dumps(row))
        rows.append(row)
    result = {"rows": rows, "repeats": args.repeats, "cpus": os.cpu_count()}
    dp_models.write_result(RESULTS, result)


if __name__ == "__main__":
    main()
