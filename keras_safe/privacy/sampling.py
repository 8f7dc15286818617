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
    `num_rows`: the rows of the data.

    With `users` (user-level sampling) the units are users: `num_examples` is the number of
    distinct users, `batch_size` the expected users per step, `max_batch_size` the slots of a
    batch (one per sampled user, `examples_per_user` rows each), `steps_per_epoch`
    `ceil(users / batch_size)`, and `pad_to_multiple_of` counts slots; `examples_per_user` is
    None for example-level sampling.
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
    examples_per_user: int = None
    num_rows: int = None


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
    users=None,
    examples_per_user=None,
):
    """Batches in which every example is included independently with probability q.

    DP-SGD's accountants (`keras_safe.accounting.compute_epsilon`) assume Poisson sampling: at
    each step every example joins the batch with probability `q = batch_size / n`, so batch
    sizes vary around `batch_size`. The sampling must be secret for the amplification the
    accountant counts on: the seed comes from the operating system's entropy unless given, and
    then every pass over the dataset (each epoch of `fit`, a second `fit`) draws new samples; a
    seeded dataset repeats its samples on every pass (and its steps are marked seeded).
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

    User-level sampling (`users=`, one user id per row): the privacy unit is a user, who may own
    many rows. At each step every user joins the batch independently with probability
    `q = batch_size / U` (U distinct users), and from each sampled user a uniformly random subset
    of `min(examples_per_user, rows of the user)` of their rows is taken (a new subset at every
    step). Each sampled user fills one slot of exactly `examples_per_user` consecutive rows:
    their rows first, then padding rows (weight 0); a batch is `slots * examples_per_user` rows,
    slot `s` being rows `s * examples_per_user` to `(s + 1) * examples_per_user - 1`, so a
    train step can clip each slot's summed gradient as one user's contribution (user-level DP,
    McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"). Slots
    are counted like rows above: `max_batch_size` is the most users of a batch (the batch has
    that many slots, empty ones all padding), and `pad_to_multiple_of` pads the number of slots.
    The elements are `(x, y, sample_weight, user_ids)`, `user_ids` (int64) giving each row's
    user and -1 on the padding rows. User-level sampling runs on one replica (no `strategy`
    with several).

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
            batch to the next multiple of `k` rows (not with several replicas); with `users`, the
            number of slots to the next multiple of `k` (`k=1`: no empty slot).
        users: None (every row is an example), or one non-negative integer user id per row
            (any ids, not necessarily 0..U-1) for user-level sampling; then `batch_size` is the
            expected users per step, `max_batch_size` the most users per batch, and `epochs`
            counts passes of `ceil(U / batch_size)` steps.
        examples_per_user: with `users`, the most rows taken from a sampled user at a step
            (the rows of a slot); required with `users`, not allowed without.

    Returns:
        A `tf.data.Dataset` of `(x, y, sample_weight)` batches for `model.fit` (pass
        `epochs=1` to fit), or with `users` of `(x, y, sample_weight, user_ids)` batches;
        `keras_safe.privacy.sampling.poisson_info(dataset)` tells what it was built with.

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

    User-level: 1000 rows of 50 users (ids 100 to 149), 10 users expected per step, at most 8
    rows of each:

    >>> users = 100 + np.arange(1000) % 50
    >>> ds = keras_safe.privacy.poisson_batches(
    ...     x, y, batch_size=10, seed=0, users=users, examples_per_user=8)
    >>> info = keras_safe.privacy.sampling.poisson_info(ds)
    >>> info.num_examples, info.num_rows, info.examples_per_user, info.steps
    (50, 1000, 8, 5)
    >>> xb, yb, wb, ids = next(iter(ds))
    >>> int(xb.shape[0]) == info.max_batch_size * 8
    True
    >>> slots = ids.numpy().reshape(-1, 8)
    >>> all(len(set(slot[slot >= 0])) <= 1 for slot in slots)
    True
    """
    epochs = check_number("epochs", epochs, low=0, low_inclusive=False)
    return _build(
        x, y, sample_weight, batch_size, epochs, None, seed, max_batch_size, strategy,
        pad_to_multiple_of, fresh_each_iteration=False, users=users,
        examples_per_user=examples_per_user,
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
    users=None,
    examples_per_user=None,
):
    """One epoch of Poisson batches that draws new samples every time it is iterated.

    What a private model's `fit` on arrays trains on: `fit` iterates the dataset once per epoch,
    and every epoch's batches are fresh Poisson samples (secret seed from the operating
    system). An epoch is `steps_per_epoch` batches, by default `ceil(n / batch_size)`.

    With `pad_to_multiple_of=1` the batches are not padded at all (a sample may be empty) and,
    without `sample_weight`, they are `(x, y)` pairs, as Keras's own batches are; otherwise
    `(x, y, sample_weight)` with weight 0 on the padding rows.

    With `users` and `examples_per_user`, user-level batches as `poisson_batches` describes:
    `(x, y, sample_weight, user_ids)`, users sampled at rate `batch_size / U`, a fresh random
    subset of each sampled user's rows every step and every pass; an epoch is by default
    `ceil(U / batch_size)` batches.

    Example:

    >>> import numpy as np
    >>> x, users = np.random.rand(60, 3).astype("float32"), np.arange(60) // 4
    >>> ds = epoch_batches(x, batch_size=5, users=users, examples_per_user=2,
    ...                    pad_to_multiple_of=1)
    >>> xb, yb, wb, ids = next(iter(ds))
    >>> yb is None, int(xb.shape[0]) % 2, bool(np.all((ids.numpy() >= 0) == (wb.numpy() > 0)))
    (True, 0, True)
    """
    return _build(
        x, y, sample_weight, batch_size, 1, steps_per_epoch, None, max_batch_size, strategy,
        pad_to_multiple_of, fresh_each_iteration=True,
        with_weights=sample_weight is not None or pad_to_multiple_of != 1, users=users,
        examples_per_user=examples_per_user,
    )  # fmt: skip


def _epoch_steps(units, batch_size, epochs, steps_per_epoch):
    """`(steps per epoch, steps)`: `ceil(units / batch_size)` (or `steps_per_epoch`) per epoch,
    `ceil(epochs * per epoch)` in all, as `keras_safe.accounting.DPSchedule` counts them."""
    per_epoch = math.ceil(units / batch_size)
    if steps_per_epoch is not None:
        per_epoch = check_number("steps_per_epoch", steps_per_epoch, low=1, integer=True)
    return per_epoch, math.ceil(epochs * per_epoch - 1e-9)


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
    users=None,
    examples_per_user=None,
):
    arrays = keras.tree.flatten(x)
    if not arrays or int(np.shape(arrays[0])[0]) == 0:
        fail("x", type(x).__name__, "non-empty data", "pass at least one example.")
    n = int(np.shape(arrays[0])[0])
    for name, part in (("x", x), ("y", y), ("sample_weight", sample_weight)):
        for array in keras.tree.flatten(part) if part is not None else []:
            if int(np.shape(array)[0]) != n:
                fail(name, f"{np.shape(array)[0]} rows", f"{n} rows, as many as `x`")
    if users is not None or examples_per_user is not None:
        return _build_users(
            x, y, sample_weight, n, users, examples_per_user, batch_size, epochs, steps_per_epoch,
            seed, max_batch_size, strategy, pad_to_multiple_of, fresh_each_iteration,
        )  # fmt: skip
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
    per_epoch, steps = _epoch_steps(n, batch_size, epochs, steps_per_epoch)
    seeded = seed is not None
    # Without a seed every pass draws new samples (fit over several epochs, or a second fit on
    # the same dataset, never replays a sample the ledger would charge as a fresh one).
    fresh_each_iteration = fresh_each_iteration or not seeded
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
        n, batch_size, rows, steps, per_epoch, len(sizes), multiple, fresh_each_iteration, seeded,
        num_rows=n,
    )  # fmt: skip
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
            if multiple is None:
                padded = tf.ensure_shape(padded, [rows])  # one static shape for every batch
        return padded, tf.cast(tf.range(padded_rows) < count, tf.float32)

    def indices(step):
        parts = [shard_sample(step, i, bounds[i], size) for i, size in enumerate(sizes)]
        chosen = tf.concat([p for p, _ in parts], axis=0) if len(parts) > 1 else parts[0][0]
        if multiple == 1:
            return chosen, tf.zeros([0])
        return chosen, tf.concat([m for _, m in parts], axis=0)

    return tf.data.Dataset.range(steps).map(tf.autograph.experimental.do_not_convert(indices))


def _user_rows(users, n):
    """The rows grouped by user, on the host: `(ids, order, starts, counts)` where user `u` (of
    id `ids[u]`, ids sorted) owns the rows `order[starts[u]:starts[u] + counts[u]]`."""
    ids = np.asarray(users)
    if ids.ndim != 1 or ids.shape[0] != n:
        fail(
            "users",
            f"an array of shape {ids.shape}",
            f"one user id per row of `x`, of shape ({n},)",
            "pass users[i] = the id of the user who contributed row i.",
        )
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        fail(
            "users",
            f"an array of {ids.dtype}",
            "integer user ids",
            "map other ids to integers first, e.g. users = np.unique(ids, return_inverse=True)[1].",
        )
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if unique[0] < 0 or unique[-1] > np.iinfo(np.int64).max:
        fail(
            "users",
            f"ids from {unique[0]} to {unique[-1]}",
            "non-negative ids that fit in int64 (-1 marks the padding rows of a batch)",
            "map the ids to 0..U-1, e.g. users = np.unique(ids, return_inverse=True)[1].",
        )
    order = np.argsort(inverse.reshape(-1), kind="stable")
    starts = np.cumsum(counts) - counts
    return tuple(a.astype("int64") for a in (unique, order, starts, counts))


def _build_users(
    x,
    y,
    sample_weight,
    n,
    users,
    examples_per_user,
    batch_size,
    epochs,
    steps_per_epoch,
    seed,
    max_batch_size,
    strategy,
    pad_to_multiple_of,
    fresh_each_iteration,
):
    """User-level Poisson batches: users sampled at rate q, each in a slot of `k` rows."""
    if users is None:
        fail(
            "examples_per_user",
            examples_per_user,
            "None without `users` (it is the rows taken from each sampled user)",
            "pass users= (one user id per row) for user-level sampling, or leave it out.",
        )
    k = check_number(
        "examples_per_user",
        examples_per_user,
        low=1,
        integer=True,
        fix="pass the most rows taken from a sampled user at each step (an integer >= 1), "
        "e.g. examples_per_user=16.",
    )
    ids, order, starts, counts = _user_rows(users, n)
    num_users = len(ids)
    batch_size = check_number(
        "batch_size",
        batch_size,
        low=1,
        high=num_users,
        integer=True,
        fix=f"with `users`, pass the expected users per step, between 1 and the {num_users} "
        "distinct users.",
    )
    q = batch_size / num_users
    if strategy is not None:
        replicas = getattr(strategy, "num_replicas_in_sync", None)
        if isinstance(replicas, int) and replicas > 1:
            fail(
                "strategy",
                strategy,
                "None or a strategy with one replica when sampling `users` (user-level sampling "
                "runs on one replica)",
                "leave strategy out, or sample examples (users=None) under several replicas.",
            )
        _shard_count(strategy, num_users)
    multiple = check_number(
        "pad_to_multiple_of", pad_to_multiple_of, low=1, integer=True, allow_none=True
    )
    default_slots = default_max_batch_size(batch_size, num_users)
    slots = check_number(
        "max_batch_size",
        max_batch_size if max_batch_size else default_slots,
        low=1,
        integer=True,
    )
    overflow = _overflow_bound(num_users, q, slots)
    if overflow > MAX_OVERFLOW_PROBABILITY:
        fail(
            "max_batch_size",
            slots,
            f"large enough to hold a Poisson sample of mean {batch_size} users (with `users` it "
            f"counts users, one slot of examples_per_user rows each; a batch would overflow with "
            f"probability up to {overflow:.2g} per step)",
            f"leave it out (default {default_slots}) or pass at least {default_slots}.",
        )
    per_epoch, steps = _epoch_steps(num_users, batch_size, epochs, steps_per_epoch)
    seeded = seed is not None
    generator = None
    fresh_each_iteration = fresh_each_iteration or not seeded  # no replayed samples
    if fresh_each_iteration:
        with tf.init_scope():
            generator = tf.random.Generator.from_seed(secrets.randbits(62))
    elif seed is None:
        seed = secrets.randbits(62)
    weights = (
        np.ones(n, "float32") if sample_weight is None else np.asarray(sample_weight, "float32")
    )
    parts = (x,) if y is None else (x, y)
    tensors = tf.nest.map_structure(tf.convert_to_tensor, (*parts, weights))
    groups = tuple(tf.convert_to_tensor(a) for a in (ids, order, starts, counts))
    sample = _user_sample(q, k, slots, multiple, num_users, seed, generator)

    def gather(picks, data):
        chosen, mask, user_ids = picks
        batch = tf.nest.map_structure(lambda t: tf.gather(t, chosen), data)
        weights = batch[-1] * tf.reshape(mask, [-1] + [1] * (len(batch[-1].shape) - 1))
        return batch[0], None if y is None else batch[1], weights, user_ids

    # The data and the users' rows enter the maps as inputs (repeated elements), not as
    # captured constants (see `_build`).
    picks = tf.data.Dataset.zip(
        (tf.data.Dataset.range(steps), tf.data.Dataset.from_tensors(groups).repeat())
    ).map(tf.autograph.experimental.do_not_convert(sample))
    data = tf.data.Dataset.from_tensors(tensors).repeat()
    dataset = tf.data.Dataset.zip((picks, data)).map(
        tf.autograph.experimental.do_not_convert(gather), num_parallel_calls=tf.data.AUTOTUNE
    )
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    if generator is not None:
        # The generator's state is meant to move on; the dataset is not checkpointed.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    dataset = dataset.with_options(options).prefetch(2)
    info = PoissonInfo(
        num_users, batch_size, slots, steps, per_epoch, 1, multiple, fresh_each_iteration, seeded,
        examples_per_user=k, num_rows=n,
    )  # fmt: skip
    # keras-internal: untracked-attribute
    object.__setattr__(dataset, _INFO, info)
    # The generator lives as long as the dataset whose map draws from it.
    # keras-internal: untracked-attribute
    object.__setattr__(dataset, "_keras_safe_generator", generator)
    return dataset


def _user_sample(q, k, slots, multiple, num_users, seed, generator):
    """The function from `(step, users' rows)` to one step's `(row indices, padding mask, user
    ids)`: every user sampled independently with probability `q`, then from each sampled user
    a uniformly random subset of `min(k, rows of the user)` rows, without replacement.

    The subsets: every row of the sampled users gets a random key `slot * 2**bits + r` (`r`
    uniform below `2**bits`, so the keys of one slot stay within it), one sort of these keys
    lists each slot's rows in a uniformly random order, and the first `k` of each slot are
    taken (a random permutation's prefix is a uniform subset)."""
    bits = 63 - max(1, num_users.bit_length())  # a slot index (< num_users) and `bits` random bits
    key = None if seed is None else tf.constant([seed & (2**31 - 1), seed >> 31], tf.int64)

    def sample(step, groups):
        ids, order, starts, counts = groups
        if generator is not None:
            sampled = tf.where(generator.uniform([num_users]) < q)[:, 0]
        else:
            step_key = tf.random.experimental.stateless_fold_in(key, step)
            users_key = tf.random.experimental.stateless_fold_in(step_key, 0)
            sampled = tf.where(tf.random.stateless_uniform([num_users], seed=users_key) < q)[:, 0]
        count = tf.shape(sampled, out_type=tf.int64)[0]
        size = tf.gather(counts, sampled)
        total = tf.reduce_sum(size)
        first = tf.cumsum(size, exclusive=True)  # where each slot's rows start in `rows`
        slot = tf.repeat(tf.range(count), size)
        position = tf.range(total) - tf.gather(first, slot)
        rows = tf.gather(order, tf.gather(tf.gather(starts, sampled), slot) + position)
        if generator is not None:
            noise = generator.uniform([total], 0, 2**bits, dtype=tf.int64)
        else:
            rows_key = tf.random.experimental.stateless_fold_in(step_key, 1)
            noise = tf.random.stateless_uniform(
                [total], seed=rows_key, minval=0, maxval=2**bits, dtype=tf.int64
            )
        shuffled = tf.gather(rows, tf.argsort(slot * 2**bits + noise))
        shuffled = tf.concat([shuffled, tf.zeros([1], tf.int64)], 0)  # a padding row: row 0
        if multiple == 1:
            padded = count
        else:
            check = tf.debugging.assert_less_equal(
                count,
                tf.constant(slots, tf.int64),
                message=f"A user-level Poisson batch drew more than max_batch_size={slots} users; "
                "keras_safe never truncates a Poisson sample. Fix: pass a larger max_batch_size.",
            )
            with tf.control_dependencies([check]):
                if multiple is None:
                    padded = tf.constant(slots, tf.int64)
                else:
                    # At least one multiple (an empty sample is one empty slot group).
                    padded = tf.maximum(count + multiple - 1, multiple) // multiple * multiple
        extra = [[0, padded - count]]
        taken = tf.pad(tf.minimum(size, k), extra)
        valid = tf.range(k, dtype=tf.int64)[None, :] < taken[:, None]  # [slots, k]
        index = tf.where(valid, tf.pad(first, extra)[:, None] + tf.range(k, dtype=tf.int64), total)
        user = tf.where(valid, tf.pad(tf.gather(ids, sampled), extra)[:, None], -1)
        shape = [slots * k if multiple is None else -1]  # one static shape: one traced step
        return (
            tf.reshape(tf.gather(shuffled, index), shape),
            tf.reshape(tf.cast(valid, tf.float32), shape),
            tf.reshape(user, shape),
        )

    return sample
