"""Poisson sampling: the batch construction that DP-SGD's epsilon accounting assumes."""

import dataclasses
import functools
import math
import secrets

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import check_number, fail

__all__ = [
    "PoissonInfo",
    "default_max_batch_size",
    "epoch_batches",
    "poisson_batches",
    "poisson_info",
]

# The most a padded batch may be exceeded with, per step, for `max_batch_size` to be accepted.
MAX_OVERFLOW_PROBABILITY = 1e-6
_INFO = "_keras_safe_poisson"


@dataclasses.dataclass(frozen=True)
class PoissonInfo:
    """What a `poisson_batches` dataset was built with (read by `fit` on a private model).

    `max_batch_size` is the padded rows of one shard's sample; a batch holds `shards` of them.
    `steps` is the batches of one pass over the dataset; `fresh_each_iteration`: each pass
    draws new samples (the batches `fit` on arrays makes, one pass per epoch); `seeded`: the
    samples come from a seed given by the user.
    `pad_to_multiple_of`: None when every batch is padded to `max_batch_size`, else the
    multiple a batch's rows are padded to.
    """

    num_examples: int
    batch_size: int
    max_batch_size: int
    steps: int
    steps_per_epoch: int
    shards: int = 1
    pad_to_multiple_of: int = None
    fresh_each_iteration: bool = False
    seeded: bool = False


def poisson_info(dataset):
    """The `PoissonInfo` of a dataset made by `poisson_batches`, else None."""
    return getattr(dataset, _INFO, None)


def _overflow_bound(n, q, rows):
    """Chernoff bound on P(Binomial(n, q) > rows)."""
    k = rows + 1
    if k > n:
        return 0.0
    if k <= n * q:
        return 1.0
    a = k / n
    kl = a * math.log(a / q) + ((1 - a) * math.log((1 - a) / (1 - q)) if a < 1 else -math.log(q))
    return math.exp(-n * kl)


def default_max_batch_size(batch_size, num_examples):
    """A padded batch size that a Poisson batch exceeds with probability below about 1e-9."""
    q = batch_size / num_examples
    std = math.sqrt(num_examples * q * (1 - q))
    return int(min(num_examples, math.ceil(batch_size + 6.5 * std + 4)))


def _shard_count(strategy, n):
    if strategy is None:
        return 1
    count = getattr(strategy, "num_replicas_in_sync", None)
    if not isinstance(count, int) or count < 1:
        fail("strategy", strategy, "a tf.distribute.Strategy or None")
    if count > n:
        fail("strategy", strategy, f"a strategy with at most {n} replicas (one per example)")
    return count


def _shard_bounds(n, shards):
    """Contiguous shards of `range(n)` whose sizes differ by at most one."""
    return [n * i // shards for i in range(shards + 1)]


def poisson_batches(
    x,
    y=None,
    sample_weight=None,
    batch_size=256,
    epochs=1,
    seed=None,
    max_batch_size=None,
    strategy=None,
    pad_to_multiple_of=None,
):
    """Batches in which every example is included independently with probability q.

    DP-SGD's accountants (`keras_safe.accounting.compute_epsilon`) assume Poisson sampling: at
    each step every example joins the batch with probability `q = batch_size / n`, so batch
    sizes vary around `batch_size`. The sampling must be secret for the amplification the
    accountant counts on: the seed comes from the operating system's entropy unless given.
    Shuffled fixed-size batches are not covered by that analysis (see Chua et al. 2024, "How
    Private are DP-SGD Implementations?"). A private model's `fit` on arrays samples this way
    by itself; build the batches here for more control (or to see them).

    Padding: by default each batch is padded to `max_batch_size` rows (one shape: one traced
    step, XLA friendly); with `pad_to_multiple_of=k`, only to the next multiple of `k` rows (at
    least `k`; `k=1` leaves batches unpadded and a sample may be empty: a dynamic batch
    dimension, as fast as Keras's own batches without XLA). Padding rows have sample weight 0,
    so their loss and gradient are
    zero and they do not count. A sample is never truncated: `max_batch_size` must make an
    overflow less likely than 1e-6 per step (the default, `batch_size + 6.5 std + 4`, makes it
    less likely than 1e-9), and a batch that would overflow anyway stops the input pipeline
    with an error instead of dropping examples. A private model's `fit` reads `num_examples`
    and `batch_size` from the dataset (it divides the noisy sum by the expected batch size,
    not the padded one).

    Under a `tf.distribute` strategy, pass it as `strategy`: the data is split into one
    contiguous shard per replica, each shard is Poisson-sampled at the same global rate `q` and
    padded on its own to `max_batch_size`, and a batch is the concatenation of the shards'
    samples, which Keras's `fit` splits so that each replica gets its own shard's sample. Under
    `MultiWorkerMirroredStrategy` each worker keeps only its replicas' shards, sampled with the
    worker's own seed; the union of the shards' samples is still one Poisson sample of the whole
    data at rate `q` (every example is in exactly one shard, included independently), so the
    accounting is that of one device. Every worker must pass the same data in the same order.

    Args:
        x: inputs: an array, or a dict/list/tuple of arrays with the same first dimension.
        y: targets (same structure rules), or None.
        sample_weight: optional per-example (or per-token, `[n, T]`) weights, multiplied with
            the padding mask.
        batch_size: the expected batch size `q * n`.
        epochs: the dataset yields `ceil(epochs * ceil(n / batch_size))` batches, as many as
            `fit` on arrays runs for `epochs` epochs (`keras_safe.accounting.DPSchedule`'s epoch).
        seed: seed of the sampling; None (the default) draws one from the operating system's
            entropy. A fixed seed makes the batches predictable, which voids the amplification
            by sampling in a release.
        max_batch_size: the most rows of a sample (per shard with `strategy`); default
            `batch_size + 6.5 std + 4` of the (shard's) expected sample.
        strategy: the `tf.distribute` strategy `fit` will run under, or None; with several
            replicas in sync, one shard per replica as described above.
        pad_to_multiple_of: None (pad to `max_batch_size`) or a positive integer `k`: pad each
            batch to the next multiple of `k` rows (not with several replicas).

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)` batches for `model.fit` (pass
        `epochs=1` to fit); `keras_safe.privacy.sampling.poisson_info(dataset)` tells what it
        was built with.

    Raises:
        keras_safe._validation.ArgumentError: on a batch size that is not positive or exceeds
            the data, mismatched lengths, empty data, or a `max_batch_size` too small to hold
            a Poisson sample.

    Example:

    >>> import numpy as np, keras_safe
    >>> x, y = np.random.rand(1000, 4).astype("float32"), np.random.randint(0, 2, 1000)
    >>> ds = keras_safe.privacy.poisson_batches(x, y, batch_size=100, epochs=1, seed=0)
    >>> xb, yb, wb = next(iter(ds))
    >>> int(xb.shape[0]) >= 100
    True
    """
    epochs = check_number("epochs", epochs, low=0, low_inclusive=False)
    return _build(
        x, y, sample_weight, batch_size, epochs, None, seed, max_batch_size, strategy,
        pad_to_multiple_of, fresh_each_iteration=False,
    )  # fmt: skip


def epoch_batches(
    x,
    y=None,
    sample_weight=None,
    batch_size=32,
    steps_per_epoch=None,
    max_batch_size=None,
    strategy=None,
    pad_to_multiple_of=None,
):
    """One epoch of Poisson batches that draws new samples every time it is iterated.

    What a private model's `fit` on arrays trains on: `fit` iterates the dataset once per epoch,
    and every epoch's batches are fresh Poisson samples (secret seed from the operating
    system). An epoch is `steps_per_epoch` batches, by default `ceil(n / batch_size)`.

    With `pad_to_multiple_of=1` the batches are not padded at all (a sample may be empty) and,
    without `sample_weight`, they are `(x, y)` pairs, as Keras's own batches are; otherwise
    `(x, y, sample_weight)` with weight 0 on the padding rows.
    """
    return _build(
        x, y, sample_weight, batch_size, 1, steps_per_epoch, None, max_batch_size, strategy,
        pad_to_multiple_of, fresh_each_iteration=True,
        with_weights=sample_weight is not None or pad_to_multiple_of != 1,
    )  # fmt: skip


def _build(
    x,
    y,
    sample_weight,
    batch_size,
    epochs,
    steps_per_epoch,
    seed,
    max_batch_size,
    strategy,
    pad_to_multiple_of,
    fresh_each_iteration,
    with_weights=True,
):
    arrays = keras.tree.flatten(x)
    if not arrays or int(np.shape(arrays[0])[0]) == 0:
        fail("x", type(x).__name__, "non-empty data", "pass at least one example.")
    n = int(np.shape(arrays[0])[0])
    for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for array in keras.tree.flatten(part) if part is not None else []:
            if int(np.shape(array)[0]) != n:
                fail(name, f"{np.shape(array)[0]} rows", f"{n} rows, as many as `x`")
    batch_size = check_number("batch_size", batch_size, low=1, high=n, integer=True)
    q = batch_size / n
    bounds = _shard_bounds(n, _shard_count(strategy, n))
    sizes = [high - low for low, high in zip(bounds[:-1], bounds[1:])]
    multiple = check_number(
        "pad_to_multiple_of", pad_to_multiple_of, low=1, integer=True, allow_none=True
    )
    if multiple is not None and len(sizes) > 1:
        fail(
            "pad_to_multiple_of",
            multiple,
            "None with several replicas (each replica's part of a batch must have one size)",
            "leave pad_to_multiple_of out under a tf.distribute strategy.",
        )
    default_rows = max(default_max_batch_size(batch_size * size / n, size) for size in sizes)
    rows = check_number(
        "max_batch_size", max_batch_size if max_batch_size else default_rows, low=1, integer=True
    )
    overflow = max(_overflow_bound(size, q, rows) for size in sizes)
    if overflow > MAX_OVERFLOW_PROBABILITY:
        fail(
            "max_batch_size",
            rows,
            f"large enough to hold a Poisson sample of mean {q * max(sizes):g} (a batch would "
            f"overflow with probability up to {overflow:.2g} per step)",
            f"leave it out (default {default_rows}) or pass at least {default_rows}.",
        )
    per_epoch = math.ceil(n / batch_size)
    if steps_per_epoch is not None:
        per_epoch = check_number("steps_per_epoch", steps_per_epoch, low=1, integer=True)
    steps = math.ceil(epochs * per_epoch - 1e-9)
    seeded = seed is not None
    if seed is None:
        seed = secrets.randbits(62)
    weights = (
        np.ones(n, "float32") if sample_weight is None else np.asarray(sample_weight, "float32")
    )
    if not with_weights:
        weights = None
    parts = (x,) if y is None else (x, y)
    tensors = tf.nest.map_structure(
        tf.convert_to_tensor, (*parts, weights) if with_weights else parts
    )
    if fresh_each_iteration:
        picks, stateful = _fresh_picks(q, tuple(bounds), rows, multiple, steps), True
    else:
        picks, stateful = _picks(q, bounds, rows, multiple, steps, seed, None), False

    def gather(chosen_and_mask, data):
        chosen, mask = chosen_and_mask
        batch = tf.nest.map_structure(lambda t: tf.gather(t, chosen), data)

        def unpadded(weights):  # per-example or per-token weights, 0 on the padding rows
            if multiple == 1:
                return weights
            return weights * tf.reshape(mask, [-1] + [1] * (len(weights.shape) - 1))

        if not with_weights:
            return batch[0] if y is None else (batch[0], batch[1])
        if y is None:
            return batch[0], None, unpadded(batch[1])
        return batch[0], batch[1], unpadded(batch[2])

    # As Keras batches arrays: the data enters the map as an input (a repeated element), not as
    # a captured constant that tf.data's default optimizations would copy into a graph at every
    # fit; the functions hold plain TensorFlow ops only (no autograph conversion).
    data = tf.data.Dataset.from_tensors(tensors).repeat()
    dataset = tf.data.Dataset.zip((picks, data)).map(
        tf.autograph.experimental.do_not_convert(gather), num_parallel_calls=tf.data.AUTOTUNE
    )
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    if stateful:
        # The generator's state is meant to move on; the dataset is not checkpointed.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    dataset = dataset.with_options(options).prefetch(2)
    if len(sizes) > 1:
        # Each worker keeps its replicas' slices of every batch (never a shard split in two).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        dataset = dataset.with_options(options)
    info = PoissonInfo(
        n, batch_size, rows, steps, per_epoch, len(sizes), multiple, fresh_each_iteration, seeded
    )
    # keras-internal: untracked-attribute
    object.__setattr__(dataset, _INFO, info)
    return dataset


@functools.lru_cache(maxsize=8)
def _fresh_picks(q, bounds, rows, multiple, steps):
    """The row indices of fresh Poisson samples, drawn by a generator keyed by a secret seed whose
    state moves on at every draw: every pass (every epoch of fit) draws new, independent samples.
    Cached by the settings (it depends on no data), so repeated fits trace it once."""
    with tf.init_scope():
        generator = tf.random.Generator.from_seed(secrets.randbits(62))
    return _picks(q, list(bounds), rows, multiple, steps, None, generator)


def _picks(q, bounds, rows, multiple, steps, seed, generator):
    """A dataset of `(row indices, padding mask)` per step: the Poisson samples of each shard."""
    sizes = [high - low for low, high in zip(bounds[:-1], bounds[1:])]
    key = None if seed is None else tf.constant([seed & (2**31 - 1), seed >> 31], tf.int64)

    def uniform(step, shard, size):
        if generator is not None:
            return generator.uniform([size])
        # One key per (step, shard): reproducible for a given seed, every draw independent.
        draw_key = tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(key, step), shard
        )
        return tf.random.stateless_uniform([size], seed=draw_key)

    def shard_sample(step, shard, low, size):
        chosen = tf.where(uniform(step, shard, size) < q)[:, 0] + low
        if multiple == 1:  # no padding: nothing to truncate, every row is an example
            return chosen, None
        count = tf.shape(chosen)[0]
        check = tf.debugging.assert_less_equal(
            count,
            rows,
            message=f"A Poisson batch drew more than max_batch_size={rows} examples; keras_safe "
            "never truncates a Poisson sample. Fix: pass a larger max_batch_size.",
        )
        with tf.control_dependencies([check]):
            if multiple is None:
                padded_rows = rows
            elif multiple == 1:
                padded_rows = count  # no padding: an empty sample is an empty batch
            else:
                padded_rows = tf.maximum(1, (count + multiple - 1) // multiple) * multiple
            padded = tf.pad(chosen, [[0, padded_rows - count]])
        return padded, tf.cast(tf.range(padded_rows) < count, tf.float32)

    def indices(step):
        parts = [shard_sample(step, i, bounds[i], size) for i, size in enumerate(sizes)]
        chosen = tf.concat([p for p, _ in parts], axis=0) if len(parts) > 1 else parts[0][0]
        if multiple == 1:
            return chosen, tf.zeros([0])
        return chosen, tf.concat([m for _, m in parts], axis=0)

    return tf.data.Dataset.range(steps).map(tf.autograph.experimental.do_not_convert(indices))
