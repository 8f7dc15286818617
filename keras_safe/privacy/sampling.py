"""Poisson sampling: the batch construction that DP-SGD's epsilon accounting assumes."""

from __future__ import annotations

import math
import random

import keras
import numpy as np
import tensorflow as tf


def default_max_batch_size(batch_size, num_examples):
    """A padded batch size that a Poisson batch exceeds with probability below about 1e-9."""
    q = batch_size / num_examples
    std = math.sqrt(num_examples * q * (1 - q))
    return int(min(num_examples, math.ceil(batch_size + 6.5 * std + 4)))


def poisson_batches(
    x,
    y=None,
    sample_weight=None,
    batch_size=256,
    epochs=1,
    seed=None,
    max_batch_size=None,
):
    """Batches in which every example is included independently with probability q.

    DP-SGD's accountants (`keras_safe.privacy.compute_epsilon`) assume Poisson sampling: at
    each step every example joins the batch with probability `q = batch_size / n`, so batch
    sizes vary around `batch_size`. Shuffled fixed-size batches (what `fit` does by default)
    are not covered by that analysis; the epsilon computed for Poisson sampling is then an
    estimate, commonly reported but not a proven guarantee (see Chua et al. 2024, "How
    Private are DP-SGD Implementations?").

    To keep shapes fixed (one traced step, XLA friendly), each batch is padded to
    `max_batch_size` rows; padding rows have sample weight 0, so their loss and gradient are
    zero and they do not count. In the rare event that more than `max_batch_size` examples are
    drawn, the extra ones are dropped (a truncated Poisson sample; the default size makes that
    less likely than 1e-9 per step). Give the DP optimizer the same `batch_size`, so it divides
    the noisy sum by the expected batch size rather than the padded one.

    Args:
        x: inputs: an array, or a dict/list/tuple of arrays with the same first dimension.
        y: targets (same structure rules), or None.
        sample_weight: optional per-example weights, multiplied with the padding mask.
        batch_size: the expected batch size `q * n`.
        epochs: the dataset yields `epochs * round(n / batch_size)` batches.
        seed: seed of the sampling; None draws one from Python's `random` (seeded by
            `keras.utils.set_random_seed`).
        max_batch_size: rows per padded batch; default `batch_size + 6.5 std + 4`.

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)` batches for `model.fit` (pass
        `epochs=1` to fit, or `steps_per_epoch=round(n / batch_size)` with `epochs`).

    Raises:
        ValueError: on a batch size that is not positive or exceeds the data, mismatched
            lengths, or empty data.

    Example:

    >>> import numpy as np, keras_safe
    >>> x, y = np.random.rand(1000, 4).astype("float32"), np.random.randint(0, 2, 1000)
    >>> ds = keras_safe.privacy.poisson_batches(x, y, batch_size=100, epochs=1, seed=0)
    >>> xb, yb, wb = next(iter(ds))
    >>> int(xb.shape[0]) >= 100
    True
    """
    arrays = keras.tree.flatten(x)
    if not arrays:
        raise ValueError("`x` is empty.")
    n = int(np.shape(arrays[0])[0])
    if n == 0:
        raise ValueError("`x` has no examples.")
    for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for array in keras.tree.flatten(part) if part is not None else []:
            if int(np.shape(array)[0]) != n:
                raise ValueError(f"`{name}` has {np.shape(array)[0]} rows but `x` has {n}.")
    if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if batch_size > n:
        raise ValueError(f"`batch_size` ({batch_size}) is larger than the data ({n} examples).")
    if epochs <= 0:
        raise ValueError(f"`epochs` must be positive, got {epochs!r}.")
    rows = int(max_batch_size or default_max_batch_size(batch_size, n))
    if rows < 1:
        raise ValueError(f"`max_batch_size` must be positive, got {max_batch_size!r}.")
    q = batch_size / n
    steps = int(round(epochs * n / batch_size))
    if seed is None:
        seed = random.randint(0, 2**31 - 1)
    weights = (
        np.ones(n, "float32") if sample_weight is None else np.asarray(sample_weight, "float32")
    )
    tensors = tf.nest.map_structure(
        tf.convert_to_tensor, (x, weights) if y is None else (x, y, weights)
    )

    def sample(step):
        draw = tf.random.stateless_uniform([n], seed=tf.stack([tf.cast(seed, tf.int64), step]))
        chosen = tf.where(draw < q)[:, 0][:rows]
        count = tf.shape(chosen)[0]
        padded = tf.pad(chosen, [[0, rows - count]])
        mask = tf.cast(tf.range(rows) < count, tf.float32)

        batch = tf.nest.map_structure(lambda t: tf.gather(t, padded), tensors)
        if y is None:
            return batch[0], None, batch[1] * mask
        return batch[0], batch[1], batch[2] * mask

    dataset = tf.data.Dataset.range(steps).map(sample, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(2)
