"""Per-example losses from a compiled Keras model's loss configuration.

DP-SGD clips each example's gradient, so it needs each example's loss. The per-example loss is
defined as the loss Keras would report for a batch holding that example alone (sample weight
and output mask included, weight regularisers excluded): for a sequence output that is the
mean over its (unmasked) time steps. Plain Keras averages these over the batch; DP-SGD sums
their clipped gradients and divides by the (expected) batch size.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class PerExampleLoss:
    """Turns `model.loss` (as given to `compile`) into a function returning a `[B]` vector.

    Args:
        model: a compiled Keras model.

    Raises:
        ValueError: if the model is not compiled with a loss, or a loss cannot be split into
            per-example terms.
    """

    def __init__(self, model):
        if getattr(model, "loss", None) is None:
            raise ValueError(
                "DP training needs the model compiled with a `loss` (for example "
                "`model.compile(optimizer=DPSGD(...), loss='sparse_categorical_crossentropy')`)."
            )
        self.model = model
        loss = model.loss
        weights = None
        if model.compiled:
            with tf.init_scope():  # the compile config serializes eagerly
                weights = model.get_compile_config().get("loss_weights")
        self._losses = loss
        self._weights = weights

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
            per_example = _per_example(fn, target, pred, sw) * self._weight_for_output(i, name)
            total = per_example if total is None else total + per_example
        if total is None:
            raise ValueError("No output of the model has a loss; DP training needs one.")
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
    raise ValueError(
        f"Cannot use loss {loss!r} for DP training: expected a string, a "
        "keras.losses.Loss or a function."
    )


def _per_example(fn, y_true, y_pred, sample_weight):
    mask = getattr(y_pred, "_keras_mask", None)
    y_pred = tf.convert_to_tensor(y_pred)
    y_true = tf.cast(tf.convert_to_tensor(y_true), y_pred.dtype)
    values = tf.convert_to_tensor(fn(y_true, y_pred))
    if values.shape.rank == 0:
        raise ValueError(
            "The loss function returned a scalar for the whole batch, so DP-SGD cannot tell "
            "examples apart. Use a Keras loss (string or keras.losses.Loss), or a function that "
            "returns one value per example (no reduction over the batch)."
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


def _match_rank(weight, values):
    """Squeezes or expands trailing unit axes so `weight` broadcasts against `values`."""
    while weight.shape.rank > values.shape.rank and weight.shape[-1] == 1:
        weight = tf.squeeze(weight, -1)
    while weight.shape.rank < values.shape.rank:
        weight = weight[..., None]
    return weight
