"""The one-example-at-a-time reference: each example's gradient on a batch holding it alone.

Independent of the layer rules and of the Jacobian fallback: a plain `tf.GradientTape` over a
forward pass of the model on one example (or one microbatch) at a time, clipped and summed in
float64 numpy. `verify` and `keras_safe.testing.assert_dp_matches_reference` build on it.
"""

import keras
import numpy as np
import tensorflow as tf

__all__ = ["clip_and_sum", "example_count", "gradients_alone", "take", "unit_slices"]


def example_count(x):
    """The number of examples in `x` (an array or a nested structure of arrays)."""
    return int(keras.tree.flatten(x)[0].shape[0])


def take(data, part):
    """`data[part]` for an array or every array of a nested structure; None stays None."""
    if data is None:
        return None
    if not isinstance(part, slice):
        return keras.tree.map_structure(lambda a: None if a is None else np.asarray(a)[part], data)
    return keras.tree.map_structure(lambda a: None if a is None else a[part], data)


def unit_slices(count, num_microbatches=None):
    """Slices of the units: one example each, or `num_microbatches` consecutive blocks."""
    groups = num_microbatches or count
    size = count // groups
    return [slice(j * size, (j + 1) * size) for j in range(groups)]


def gradients_alone(model, variables, unit_loss, x, y=None, sample_weight=None, units=None):
    """Each unit's gradient computed on a batch holding that unit alone.

    Args:
        model: the model (used only through `unit_loss`).
        variables: the variables to differentiate.
        unit_loss: `unit_loss(x_u, y_u, sample_weight_u)` returns the unit's scalar loss; it runs
            the model's forward pass itself.
        x, y, sample_weight: the batch (arrays or nested structures of arrays).
        units: a list of slices (default: one example each).

    Returns:
        `(grads, losses)`: per unit a list of float64 arrays aligned with `variables` (zeros
        for a variable the loss does not use), and the float64 unit losses.
    """
    del model  # the forward pass runs inside `unit_loss`
    units = units or unit_slices(example_count(x))
    grads, losses = [], []
    for part in units:
        with tf.GradientTape() as tape:
            loss = unit_loss(take(x, part), take(y, part), take(sample_weight, part))
        unit = tape.gradient(loss, variables)
        grads.append(
            [
                np.zeros(v.shape, "float64")
                if g is None
                else np.asarray(tf.convert_to_tensor(g), "float64")
                for g, v in zip(unit, variables)
            ]
        )
        losses.append(float(loss))
    return grads, np.array(losses)


def clip_and_sum(grads, l2_norm_clip):
    """Clips each unit's gradient to `l2_norm_clip` and sums, in float64.

    Returns:
        `(sums, norms)`: the clipped sum per variable and each unit's norm.
    """
    norms = np.array([np.sqrt(sum(float(np.sum(g**2)) for g in unit)) for unit in grads])
    factors = np.minimum(1.0, l2_norm_clip / np.maximum(norms, 1e-300))
    sums = [sum(f * unit[k] for f, unit in zip(factors, grads)) for k in range(len(grads[0]))]
    return sums, norms
