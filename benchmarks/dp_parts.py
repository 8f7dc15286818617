"""The parts of a DP-SGD step, timed one by one, and the limit they leave.

A DP step is the forward pass, one backward pass to the recorded layer outputs, the per-example
norm bounds, the clipped sums (the weight gradients, with every example scaled by its clip
factor), the Gaussian noise and the optimizer's update. Each part is compiled as its own
`tf.function` on the same model and batch:

- plain: forward, backward and SGD update of plain Keras training (a reference step);
- norms: forward, backward to the recorded outputs, and each example's norm bound;
- clipping: `norms` plus the clipped sums;
- noise: drawing the Gaussian noise, one value per trainable parameter;
- dp: the whole DP step (`clipping`, the noise, the division and the SGD update).

So `clipping - norms` is the clipped-sum pass, and `plain + noise` is the limit a DP step can
reach (the clipped sums cost what plain training's weight gradients cost).
"""

import time

import keras
import numpy as np
import tensorflow as tf

from keras_safe.optimizers.replicas import noise_share
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example.clipping import clip_factors, per_example_forms
from keras_safe.privacy.per_example.embedding_form import data_dependent_shapes

__all__ = ["PARTS", "time_parts"]

PARTS = ("plain", "norms", "clipping", "noise", "dp")


def _step_functions(model, batch_size, clip=1.0, stddev=1.1):
    mean_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=mean_loss)
    variables = model.trainable_variables
    size = sum(int(np.prod(v.shape)) for v in variables)
    per_example = PerExampleLoss(model)
    draws = tf.Variable(0, dtype=tf.int64)
    sgd = keras.optimizers.SGD(0.01)
    sgd.build(variables)

    def forms(x, y):
        def forward():
            pred = model(x, training=True)
            return per_example(y, pred), pred

        return per_example_forms(model, variables, forward)

    def sums(x, y):
        with data_dependent_shapes():  # as keras_safe's train step without XLA
            result = forms(x, y)
            factors, _ = clip_factors(result.forms, clip, result.checks)
            return [
                tf.cast(f.clipped_sum(factors), v.dtype) for f, v in zip(result.forms, variables)
            ]

    @tf.function
    def plain(x, y):
        with tf.GradientTape() as tape:
            loss = mean_loss(y, model(x, training=True))
        sgd.apply(tape.gradient(loss, variables), variables)

    @tf.function
    def norms(x, y):
        with data_dependent_shapes():
            result = forms(x, y)
            return tf.reduce_sum(clip_factors(result.forms, clip, result.checks)[0])

    @tf.function
    def clipping(x, y):
        return tf.add_n([tf.reduce_sum(s) for s in sums(x, y)])

    @tf.function
    def noise(x, y):
        draws.assign_add(1)
        return tf.reduce_sum(noise_share(12345, draws, size, stddev))

    @tf.function
    def dp(x, y):
        draws.assign_add(1)
        grads = sums(x, y)
        flat = noise_share(12345, draws, size, stddev)
        pieces = tf.split(flat, [int(np.prod(v.shape)) for v in variables])
        grads = [(g + tf.reshape(n, g.shape)) / batch_size for g, n in zip(grads, pieces)]
        sgd.apply(grads, variables)

    return {"plain": plain, "norms": norms, "clipping": clipping, "noise": noise, "dp": dp}


def time_parts(model, x, y, batch_size, repeats=5, steps=3):
    """Milliseconds per step of each part: `{part: [ms of each round]}`.

    The parts are timed in turn within each round (`steps` calls each, after one call to trace),
    so a change of machine load hits all of them.
    """
    functions = _step_functions(model, batch_size)
    xb = tf.constant(x[:batch_size])
    yb = tf.constant(y[:batch_size])
    for function in functions.values():
        function(xb, yb)  # trace and warm up
    times = {part: [] for part in functions}
    for _ in range(repeats):
        for part, function in functions.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = function(xb, yb)
            if out is not None:
                out.numpy()
            times[part].append(1000 * (time.perf_counter() - start) / steps)
    return times
