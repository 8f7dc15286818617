"""DP-SGD under `tf.distribute`: the strategies keras_safe supports and the checks that keep a
distributed private `fit` exactly as private as the same `fit` on one device.

Supported: no strategy, `tf.distribute.OneDeviceStrategy`, `tf.distribute.MirroredStrategy`
(several devices of one machine) and `tf.distribute.MultiWorkerMirroredStrategy` (several
processes, synchronous). Every other strategy is refused before a private step is traced:
parameter-server training applies the workers' updates asynchronously (no global step for the
ledger to count), and TPU, central-storage and custom strategies are not tested.

What a private step does under a strategy with R replicas (see `keras_safe.optimizers.replicas`
for the arithmetic): each replica clips the examples of its part of the global batch, adds
noise of standard deviation `sigma * C / sqrt(R)` from its own counter, the noisy sums are
summed over the replicas and divided by the expected *global* batch size, and the privacy
ledger counts one step per global step at the global sampling rate (its example counts are
summed over the replicas).

What the accounting assumes:

- `MirroredStrategy`: Keras splits each global batch between the replicas, so fit on arrays
  (batch_size is the global batch) and `poisson_batches` (with or without `strategy=`) are
  accounted as on one device.
- `MultiWorkerMirroredStrategy`: every worker runs its own input pipeline, and Keras keeps on
  each worker only its replicas' slices of the global batch. Slices of batches that different
  workers shuffled or sampled with different seeds do not make a shuffled or Poisson batch, so
  a private `fit` takes `poisson_batches(..., strategy=strategy)` (each replica Poisson-samples
  its own disjoint shard of the data at the global rate `q = batch_size / num_examples`, with
  its worker's own OS-entropy seed: the union of the shards' samples is a Poisson sample of the
  whole data) or a dataset whose sampling the user vouches for through declared `num_examples`
  and `batch_size`; it refuses arrays and a `poisson_batches` dataset built without the
  strategy. Every worker must hold the same training data in the same order.
- The batch size keras_safe divides by and accounts with is always the global one.

Not supported with several replicas, and refused with the fix: `num_microbatches`, clipping or
gradient accumulation set on the optimizer inside the DP optimizer (wrap the DP optimizer in
`GradientClip` instead), and a batch that every replica receives whole (`train_on_batch`).

Keras 3 itself: under `MultiWorkerMirroredStrategy`, its `fit` cannot start on a model created
inside the strategy's scope (keras-team/keras#20585). Create the model object outside the scope
without an `Input`, then build, compile, make private and `fit` it inside the scope.
"""

import threading

import keras
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.optimizers import replicas
from keras_safe.optimizers.wrapper import OptimizerWrapper, optimizer_chain
from keras_safe.privacy.sampling import poisson_info

__all__ = [
    "SUPPORTED_STRATEGIES",
    "check_batch_is_split",
    "check_fit_data",
    "check_private_step",
    "check_strategy",
    "logs_for_fit",
    "loss_for_gradients",
    "loss_for_report",
]

#: The `tf.distribute` strategy classes under which keras_safe trains privately.
SUPPORTED_STRATEGIES = (
    tf.distribute.MirroredStrategy,
    tf.distribute.MultiWorkerMirroredStrategy,
    tf.distribute.OneDeviceStrategy,
)


def _default_strategy_type():
    # Strategy scopes are per thread: a fresh thread sees TensorFlow's default strategy.
    found = []
    thread = threading.Thread(target=lambda: found.append(type(tf.distribute.get_strategy())))
    thread.start()
    thread.join()
    return found[0]


_DEFAULT_STRATEGY = _default_strategy_type()

_UNSUPPORTED = (
    "keras_safe cannot train privately under {name}: {why} Fix: train under "
    "tf.distribute.MirroredStrategy (one machine) or tf.distribute.MultiWorkerMirroredStrategy "
    "(several), or without a strategy."
)


def check_strategy(strategy):
    """Refuses a strategy keras_safe does not support for DP training.

    Args:
        strategy: a `tf.distribute.Strategy`, or None.

    Raises:
        keras_safe._validation.PrivacyError: for a strategy other than the default one,
            `OneDeviceStrategy`, `MirroredStrategy` or `MultiWorkerMirroredStrategy`.

    Example:

    >>> import tensorflow as tf
    >>> check_strategy(tf.distribute.OneDeviceStrategy("/cpu:0"))
    >>> try:
    ...     check_strategy(tf.distribute.experimental.CentralStorageStrategy())
    ... except PrivacyError as error:
    ...     print(str(error).split(":")[0])
    keras_safe cannot train privately under CentralStorageStrategy
    """
    if strategy is None or type(strategy) is _DEFAULT_STRATEGY:
        return
    if isinstance(strategy, SUPPORTED_STRATEGIES):
        return
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.ParameterServerStrategy):
        why = (
            "parameter-server training applies the workers' updates asynchronously, so there "
            "is no global step whose noise and sampling rate the privacy ledger could count."
        )
    else:
        why = (
            "its way of summing the replicas' gradients is not tested with keras_safe's noise "
            "split and ledger, so the step's noise and its accounting could not be proven."
        )
    raise PrivacyError(_UNSUPPORTED.format(name=name, why=why))


def check_private_step(model, dp):
    """Refuses, while a private step is traced, what the distributed step does not support.

    Under any number of replicas: an unsupported strategy. Under several replicas in sync:
    microbatches (each replica would split its own part of the batch), an optimizer wrapper
    below the DP optimizer, and gradient clipping or accumulation set on the optimizer the DP
    optimizer wraps (Keras applies them to each replica's share of the update, not to the
    update).

    Raises:
        keras_safe._validation.PrivacyError: naming the setting and the fix.
    """
    check_strategy(tf.distribute.get_strategy())
    check_strategy(getattr(model, "distribute_strategy", None))
    count = replicas.num_replicas()
    if count == 1:
        return
    where = f"under a tf.distribute strategy with {count} replicas"
    if dp.num_microbatches:
        raise PrivacyError(
            f"num_microbatches is not supported {where}: each replica would split only its own "
            "part of the batch, and the divisor and the accounting assume the global batch. "
            "Fix: leave num_microbatches out (per-example clipping)."
        )
    chain = optimizer_chain(dp)
    below = [o for o in chain[1:] if isinstance(o, OptimizerWrapper)]
    if below:
        raise PrivacyError(
            f"{type(below[0]).__name__} inside {type(dp).__name__} is not supported {where}: it "
            "would see each replica's share of the update instead of the update. Fix: wrap the "
            f"DP optimizer instead, e.g. GradientClip({type(dp).__name__}(...))."
        )
    inner = chain[-1]
    for option in ("clipnorm", "clipvalue", "global_clipnorm"):
        if getattr(inner, option, None) is not None:
            raise PrivacyError(
                f"{option}={getattr(inner, option)!r} on the optimizer inside "
                f"{type(dp).__name__} is not supported {where}: Keras applies it to each "
                "replica's share of the update, not to the update. Fix: leave it out and wrap "
                "the DP optimizer in keras_safe.optimizers.GradientClip(..., clip_norm=...)."
            )
    if dp.accumulation_steps > 1:
        raise PrivacyError(
            f"gradient_accumulation_steps is not supported with DP-SGD {where}. Fix: leave it "
            "out and use a larger global batch (more replicas or a larger batch_size)."
        )


def check_batch_is_split(x):
    """Refuses, while a private step is traced, a batch that every replica received whole.

    `fit` splits each global batch between the replicas. `train_on_batch`, and a custom loop
    that passes the same tensors to `strategy.run`, give every replica the whole batch instead:
    each example would be clipped and summed once per replica, and its influence on the update
    would be a multiple of the clipping norm the noise is calibrated for. Checked among the
    replicas of one worker (the inputs of other workers cannot be compared while tracing).

    Raises:
        keras_safe._validation.PrivacyError: when the replicas of this worker share the batch.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return
    if len(tf.distribute.get_strategy().extended.worker_devices) < 2:
        return
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    split = context.merge_call(
        lambda _, value: isinstance(value, tf.distribute.DistributedValues), args=(first,)
    )
    if not split:
        raise PrivacyError(
            f"Every one of the {context.num_replicas_in_sync} replicas received the whole batch, "
            "so each example would be clipped and counted once per replica, and its influence "
            "on the update would exceed the clipping norm the noise is calibrated for. This "
            "happens with train_on_batch under a strategy, or when a custom loop passes the same "
            "tensors to strategy.run. Fix: train with fit (it splits each batch between the "
            "replicas), or in a custom loop feed strategy.experimental_distribute_dataset(...) "
            "batches."
        )


def check_fit_data(model, x, settings):
    """Refuses, before a private `fit` under a strategy, data the accounting cannot cover.

    Args:
        model: the private model (its `distribute_strategy` is the one `fit` runs under).
        x: the `x` given to `fit`.
        settings: the `keras_safe.training.state.DataSettings` read from the data and the
            declarations (its `batch_size` is the global batch the step divides by).

    Raises:
        keras_safe._validation.PrivacyError: an unsupported strategy; under
            `MultiWorkerMirroredStrategy`, arrays or a `poisson_batches` dataset not built
            for the strategy; under several replicas, a dataset whose global batch (the
            dataset's batch, times the replicas for a per-replica distributed dataset)
            differs from the declared batch size.
    """
    strategy = getattr(model, "distribute_strategy", None)
    check_strategy(strategy)
    count = 1 if strategy is None else int(strategy.num_replicas_in_sync)
    if count == 1:
        return
    info = poisson_info(x)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _check_multi_worker_data(x, info, count)
    if info is not None or settings.batch_size is None:
        return
    global_batch = _static_global_batch(x, count)
    if global_batch is not None and global_batch != settings.batch_size:
        raise PrivacyError(
            f"The global batch of this fit holds {global_batch} examples (under a strategy with "
            f"{count} replicas), but the DP step would divide by and account for "
            f"batch_size={settings.batch_size}; epsilon would be misstated. Fix: declare the "
            "global batch size (all replicas together) as batch_size on the DP optimizer."
        )


def _check_multi_worker_data(x, info, count):
    fix = (
        "Fix: build the data with keras_safe.privacy.poisson_batches(x, y, batch_size=..., "
        "strategy=strategy), where each replica samples its own shard of the data."
    )
    if info is not None and info.shards % count:
        raise PrivacyError(
            f"This poisson_batches dataset was built for {info.shards} replica(s), but "
            f"MultiWorkerMirroredStrategy trains on {count}: every worker would keep its "
            "slice of its own, differently seeded sample, and the union is not a Poisson "
            f"sample. {fix}"
        )
    if info is None and isinstance(x, (tf.data.Dataset, tf.distribute.DistributedDataset)):
        return
    if info is None:
        raise PrivacyError(
            "A private fit on arrays under MultiWorkerMirroredStrategy is not supported: every "
            "worker shuffles the arrays on its own and keeps its slice of each batch, so the "
            "global batches are neither shuffled batches nor Poisson samples of the data and "
            f"epsilon would not describe them. {fix}"
        )


def _static_global_batch(x, count):
    if isinstance(x, tf.distribute.DistributedDataset):
        per_replica = _leading_dimension(x.element_spec)
        return None if per_replica is None else per_replica * count
    if isinstance(x, tf.data.Dataset):
        return _leading_dimension(x.element_spec)
    return None


def _leading_dimension(spec):
    for leaf in keras.tree.flatten(spec):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) > 0:
            return None if shape[0] is None else int(shape[0])
    return None


def _loss_replicas():
    # The replica count Keras scales a compiled loss by (`compute_loss` under a strategy).
    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def loss_for_report(loss):
    """The loss of `model.compute_loss` as one device reports it (Keras divides it by R).

    Example:

    >>> float(loss_for_report(tf.constant(0.5)))  # outside a strategy
    0.5
    """
    count = _loss_replicas()
    return loss if count == 1 else loss * tf.cast(count, loss.dtype)


def loss_for_gradients(loss):
    """The share of a batch-mean loss whose gradient one replica contributes (`loss / R`).

    Keras's optimizer sums the replicas' gradients, so each replica differentiates `1 / R` of
    its mean loss (what `model.compute_loss` returns under a strategy).

    Example:

    >>> float(loss_for_gradients(tf.constant(0.5)))  # outside a strategy
    0.5
    """
    count = _loss_replicas()
    return loss if count == 1 else loss / tf.cast(count, loss.dtype)


def _multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and int(
        strategy.num_replicas_in_sync
    ) > len(strategy.extended.worker_devices)


def logs_for_fit(logs):
    """The train step's logs in the shape Keras's `fit` can average over the replicas.

    Under `MultiWorkerMirroredStrategy` with several workers, Keras 3 averages each log over
    the replicas with `strategy.reduce("MEAN", value, axis=0)`, which fails on a scalar; each
    scalar log then gets a leading axis of length 1 (the average is the same).

    Example:

    >>> logs_for_fit({"loss": tf.constant(0.5)})["loss"].shape  # outside a strategy
    TensorShape([])
    """
    if not _multi_worker(tf.distribute.get_strategy()):
        return logs

    def with_axis(value):
        value = tf.convert_to_tensor(value)
        return tf.reshape(value, [1]) if value.shape.rank == 0 else value

    return keras.tree.map_structure(with_axis, logs)
