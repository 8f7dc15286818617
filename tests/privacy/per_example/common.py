"""Shared helpers of the per-example tests.

`assert_fit_matches_reference` is the end-to-end check: with noise 0 and SGD at learning rate 1,
one `fit` step must move the weights by exactly the mean of the clipped gradients that a
one-example-at-a-time loop computes (each gradient on a batch holding that example alone, with
Keras's own `model.compute_loss`, clipped in numpy). The public oracle
`keras_safe.testing.assert_dp_matches_reference` checks the clipped sum itself, faster.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_safe

RNG = np.random.default_rng(0)
B = 8


def reference_update(model, x, y, clip, sample_weight=None, microbatches=None):
    """Mean of clipped gradients, one example (or microbatch) at a time."""
    variables = model.trainable_variables
    n = len(keras.tree.flatten(x)[0])
    groups = microbatches or n
    size = n // groups
    clipped = []
    for j in range(groups):
        part = slice(j * size, (j + 1) * size)
        xi = keras.tree.map_structure(lambda a, part=part: a[part], x)
        yi = keras.tree.map_structure(lambda a, part=part: a[part], y)
        wi = None if sample_weight is None else sample_weight[part]
        with tf.GradientTape() as tape:
            pred = model(xi, training=True)
            loss = model.compute_loss(x=xi, y=yi, y_pred=pred, sample_weight=wi, training=True)
        grads = tape.gradient(loss, variables)
        grads = [
            np.zeros(v.shape, "float32") if g is None else np.asarray(tf.convert_to_tensor(g))
            for g, v in zip(grads, variables)
        ]
        norm = np.sqrt(sum(float(np.sum(g.astype("float64") ** 2)) for g in grads))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped.append([g * factor for g in grads])
    return [np.mean([c[k] for c in clipped], axis=0) for k in range(len(variables))]


def per_example_norms(model, x, y):
    norms = []
    for i in range(len(keras.tree.flatten(x)[0])):
        xi = keras.tree.map_structure(lambda a, i=i: a[i : i + 1], x)
        yi = keras.tree.map_structure(lambda a, i=i: a[i : i + 1], y)
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=xi, y=yi, y_pred=model(xi, training=True))
        grads = [g for g in tape.gradient(loss, model.trainable_variables) if g is not None]
        norms.append(np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in grads)))
    return np.array(norms)


def assert_fit_matches_reference(
    model, x, y, loss=None, sample_weight=None, microbatches=None, loss_weights=None, xla=False
):
    """One DP `fit` step (noise 0, SGD at rate 1) moves the weights by the reference mean."""
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(
            learning_rate=1.0,
            l2_norm_clip=1.0,
            noise_multiplier=0.0,
            num_microbatches=microbatches,
        ),
        loss=loss,
        loss_weights=loss_weights,
        jit_compile=xla,
    )
    # A clip bound between the per-example norms, so some examples are clipped and some not.
    clip = float(np.median(per_example_norms(model, x, y)))
    model.optimizer.l2_norm_clip = clip
    keras_safe.privacy.make_private(model)
    before = [np.array(v) for v in model.trainable_variables]
    expected = reference_update(model, x, y, clip, sample_weight, microbatches)
    model.fit(x, y, sample_weight=sample_weight, batch_size=B, epochs=1, shuffle=False, verbose=0)
    after = [np.array(v) for v in model.trainable_variables]
    for b, a, e, v in zip(before, after, expected, model.trainable_variables):
        np.testing.assert_allclose(b - a, e, atol=1e-5, err_msg=v.path)


def check_with_oracle(model, x, y, loss=None, **kwargs):
    """Compiles `model` with `loss` and runs the public oracle on `(x, y)`."""
    model.compile(loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return keras_safe.testing.assert_dp_matches_reference(model, x, y, **kwargs)


def labels(classes=3, count=B):
    return RNG.integers(0, classes, count)


def classifier(layers, input_shape, dtype="float32", classes=3):
    """`Input -> layers -> (Flatten) -> Dense(classes)`."""
    inputs = keras.Input(input_shape, dtype=dtype)
    h = inputs
    for layer in layers:
        h = layer(h)
    if len(h.shape) > 2:
        h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(classes)(h))
