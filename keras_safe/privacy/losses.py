"""Per-example losses from a compiled Keras model's loss configuration.

DP-SGD clips each example's gradient, so it needs each example's loss. The per-example loss is
defined as the loss Keras would report for a batch holding that example alone (sample weight
and output mask included, weight regularisers excluded): for a sequence output that is the
mean over its (unmasked) time steps. Plain Keras averages these over the batch; DP-SGD sums
their clipped gradients and divides by the (expected) batch size.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError, fail

__all__ = ["PerExampleLoss", "check_per_example"]

# Examples in the probe batch of `check_per_example`.
_PROBE = 3


class PerExampleLoss:
    """Turns `model.loss` (as given to `compile`) into a function returning a `[B]` vector.

    Args:
        model: a compiled Keras model.

    Every loss function is probed once (eagerly, on a few random examples shaped like the
    model's outputs, see `check_per_example`): it must return one value per example, and each
    example's value must not change when another example of the batch changes. A loss that
    reduces over the batch axis would otherwise be taken for per-example losses, and clipping
    its "per-example" gradients would not bound one example's influence.

    Raises:
        keras_safe._validation.ArgumentError: if the model is not compiled with a loss, or a
            loss is not a string, `keras.losses.Loss` or function.
        keras_safe._validation.PrivacyError: if a loss does not give one value per example that
            depends on that example alone.
    """

    def __init__(self, model):
        if getattr(model, "loss", None) is None:
            fail(
                "loss",
                None,
                "given to `model.compile`",
                "compile with a loss, for example `model.compile(optimizer=DPSGD(...), "
                "loss='sparse_categorical_crossentropy')`.",
            )
        self.model = model
        loss = model.loss
        weights = None
        if model.compiled:
            with tf.init_scope():  # the compile config serializes eagerly
                weights = model.get_compile_config().get("loss_weights")
        self._losses = loss
        self._weights = weights
        self._checked = set()

    def _loss_for_output(self, index, name, num_outputs):
        loss = self._losses
        if isinstance(loss, dict):
            if name not in loss:
                return None
            loss = loss[name]
        elif isinstance(loss, (list, tuple)):
            loss = loss[index]
        if loss is None:
            return None
        return _resolve(loss)

    def _weight_for_output(self, index, name):
        weights = self._weights
        if weights is None:
            return 1.0
        if isinstance(weights, dict):
            return float(weights.get(name, 1.0))
        if isinstance(weights, (list, tuple)):
            return float(weights[index])
        return float(weights)

    def __call__(self, y, y_pred, sample_weight=None):
        """Returns the per-example losses, shape `[B]`."""
        if isinstance(y_pred, dict):
            names = sorted(y_pred)
            preds = [y_pred[n] for n in names]
            ys = [y[n] for n in names] if isinstance(y, dict) else keras.tree.flatten(y)
            sws = _per_output(sample_weight, names, len(preds))
        elif isinstance(y_pred, (list, tuple)):
            preds = list(y_pred)
            names = list(getattr(self.model, "output_names", None) or [None] * len(preds))
            if isinstance(y, dict):
                ys = [y[n] for n in names]
            else:
                ys = list(y) if isinstance(y, (list, tuple)) else [y]
            sws = _per_output(sample_weight, names, len(preds))
        else:
            preds, ys, sws = [y_pred], [y], [sample_weight]
            names = list(getattr(self.model, "output_names", None) or [None])
        total = None
        for i, (pred, target, sw) in enumerate(zip(preds, ys, sws)):
            name = names[i] if i < len(names) else None
            fn = self._loss_for_output(i, name, len(preds))
            if fn is None or target is None:
                continue
            key = (i, tuple(pred.shape[1:]), tuple(np.shape(target)[1:]))
            if key not in self._checked:
                check_per_example(fn, target, pred, name=_loss_name(self._losses, i, name))
                self._checked.add(key)
            per_example = _per_example(fn, target, pred, sw) * self._weight_for_output(i, name)
            total = per_example if total is None else total + per_example
        if total is None:
            fail("loss", self._losses, "a loss for at least one output of the model")
        return total


def _per_output(sample_weight, names, count):
    if sample_weight is None:
        return [None] * count
    if isinstance(sample_weight, dict):
        return [sample_weight.get(n) for n in names]
    if isinstance(sample_weight, (list, tuple)):
        return list(sample_weight)
    return [sample_weight] * count


def _resolve(loss):
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    if isinstance(loss, str):
        resolved = keras.losses.get(loss)
        return resolved.call if isinstance(resolved, keras.losses.Loss) else resolved
    if callable(loss):
        return loss
    fail("loss", loss, "a string, a keras.losses.Loss or a function for DP training")


def _per_example(fn, y_true, y_pred, sample_weight):
    mask = getattr(y_pred, "_keras_mask", None)  # keras-internal: keras-mask
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = _match_target_rank(tf.cast(tf.convert_to_tensor(y_true), y_pred.dtype), y_pred)
    values = tf.convert_to_tensor(fn(y_true, y_pred))
    if values.shape.rank == 0:
        raise PrivacyError(
            "The loss function returned a scalar for the whole batch, so DP-SGD cannot tell "
            "examples apart. Fix: use a Keras loss (string or keras.losses.Loss), or a function "
            "that returns one value per example (no reduction over the batch)."
        )
    values = tf.cast(values, tf.float32)
    weight = tf.ones_like(values)
    if sample_weight is not None:
        weight = weight * _match_rank(tf.cast(sample_weight, tf.float32), values)
    if mask is not None:
        mask = _match_rank(tf.cast(mask, tf.float32), values)
        weight = weight * mask
    axes = list(range(1, values.shape.rank))
    if not axes:
        return values * weight
    summed = tf.reduce_sum(values * weight, axis=axes)
    if mask is not None:
        count = tf.maximum(tf.reduce_sum(mask * tf.ones_like(values), axis=axes), 1.0)
    else:
        count = tf.cast(tf.reduce_prod(tf.shape(values)[1:]), tf.float32)
    return summed / count


def _match_target_rank(y_true, y_pred):
    """Targets with one axis more or less than the predictions, on a unit axis, reshaped to
    match them (as Keras does before calling a loss: labels `[B]` for outputs `[B, 1]`)."""
    t, p = y_true.shape.rank, y_pred.shape.rank
    if t is None or p is None:
        return y_true
    if p == t + 1 and y_pred.shape[-1] == 1:
        return tf.expand_dims(y_true, -1)
    if t == p + 1 and y_true.shape[-1] == 1:
        return tf.squeeze(y_true, -1)
    return y_true


def _match_rank(weight, values):
    """Squeezes or expands trailing unit axes so `weight` broadcasts against `values`."""
    while weight.shape.rank > values.shape.rank and weight.shape[-1] == 1:
        weight = tf.squeeze(weight, -1)
    while weight.shape.rank < values.shape.rank:
        weight = weight[..., None]
    return weight


def _loss_name(losses, index, output):
    loss = losses
    if isinstance(losses, dict):
        loss = losses.get(output)
    elif isinstance(losses, (list, tuple)):
        loss = losses[index]
    if isinstance(loss, str):
        return loss
    return getattr(loss, "name", None) or getattr(loss, "__name__", None) or type(loss).__name__


def _probe_like(tensor, rng, examples=_PROBE):
    """Random values of `tensor`'s dtype and trailing shape, `examples` rows."""
    shape = [examples] + [1 if d is None else int(d) for d in tensor.shape[1:]]
    dtype = tf.as_dtype(tensor.dtype)
    if dtype.is_integer or dtype.is_bool:
        return tf.zeros(shape, dtype)
    return tf.constant(rng.uniform(0.05, 0.95, size=shape), dtype)


def check_per_example(fn, y_true, y_pred, name="loss"):
    """Checks that `fn(y_true, y_pred)` gives one value per example depending on it alone.

    Runs `fn` eagerly on a probe batch of random examples shaped like `y_true` and `y_pred`
    (whatever the calling context: it also works while a train step is being traced), then
    changes the first example's prediction and checks that no other example's loss moved.

    Args:
        fn: the loss function `fn(y_true, y_pred)` (no reduction over the batch expected).
        y_true: a tensor shaped like the targets (only its dtype and trailing shape are used).
        y_pred: a tensor shaped like the predictions (likewise).
        name: the loss's name for the error message.

    Raises:
        keras_safe._validation.PrivacyError: naming the loss when it reduces over the batch or
            mixes examples.

    Example:
        >>> import keras, tensorflow as tf
        >>> check_per_example(keras.losses.get("mse"), tf.zeros((4, 3)), tf.zeros((4, 3)))
        >>> try:
        ...     check_per_example(lambda t, p: tf.reduce_mean((t - p) ** 2, axis=0),
        ...                       tf.zeros((4, 3)), tf.zeros((4, 3)), name="batch_mse")
        ... except Exception as error:
        ...     print(type(error).__name__)
        PrivacyError
    """
    rng = np.random.default_rng(0)
    with tf.init_scope():
        target = _probe_like(y_true, rng)
        pred = _probe_like(y_pred, rng)
        if not tf.as_dtype(pred.dtype).is_floating:
            return
        target = _match_target_rank(tf.cast(target, pred.dtype), pred)
        base = _reduce(fn(target, pred))
        changed = tf.concat([pred[:1] * 0.5 + 0.25, pred[1:]], axis=0)
        moved = _reduce(fn(target, changed))
        problem = None
        if base.shape.rank == 0:
            problem = "it returned a single value for the whole batch"
        elif base.shape.rank != 1 or base.shape[0] != _PROBE:
            problem = (
                f"it returned shape {tuple(base.shape)} for a batch of {_PROBE} examples, not "
                "one value per example"
            )
        elif not np.allclose(base.numpy()[1:], moved.numpy()[1:], rtol=1e-6, atol=1e-9):
            problem = "changing one example changed the loss of other examples"
    if problem:
        raise PrivacyError(
            f"The loss {name!r} cannot be split per example for DP-SGD: {problem}. A loss "
            "that averages over the batch (or mixes examples) would make per-example clipping "
            "meaningless. Fix: use a Keras loss (string or keras.losses.Loss), or a function "
            "that returns one value per example, computed from that example alone."
        )


def _reduce(values):
    """Per-example values `[B]` from a loss output, averaging any trailing axes."""
    values = tf.convert_to_tensor(values)
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values
