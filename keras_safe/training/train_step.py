"""keras_safe's train step: one place that owns the gradient path of `fit`.

`make_private(model)` installs it on a model. With a DP optimizer it computes per-example
clipped gradient sums (`keras_safe.privacy.per_example`), lets the optimizer add noise and
average (`DPOptimizer.privatize`), adds the gradient of weight regularisers (data-independent,
so outside clipping) and applies the result through the compiled optimizer, wrappers included.
With any other optimizer it is Keras's usual step. Either way it reports the loss and metrics
as Keras does, plus the figures of optimizers in the wrapper chain that define `step_logs()`.
"""

import types

import keras
import tensorflow as tf

from keras_safe.optimizers import provenance
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.optimizers.wrapper import optimizer_chain
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.model_checks import check_supported
from keras_safe.privacy.per_example import clipped_gradient_sum

_MARK = "_keras_safe_train_step"


def make_private(model):
    """Installs keras_safe's train step on `model` so DP optimizers can train it.

    Call it once, before `fit`, on a Sequential, functional or subclassed model that uses
    Keras's default `train_step`. It is idempotent and returns the same model. Compile the
    model with a DP optimizer (`keras_safe.optimizers.DPSGD`, `DPAdam`, `DPOptimizer(...)`)
    before or after. A reloaded model needs the call again (the train step is not part of the
    saved file); a DP optimizer used without it raises instead of training non-privately.

    Args:
        model: a `keras.Model`.

    Returns:
        `model`, with keras_safe's train step installed.

    Raises:
        TypeError: if `model` is not a Keras model.
        ValueError: if the model's class overrides `train_step` (keras_safe cannot replace a
            custom step without undoing it; use `keras_safe.privacy.dp_gradients` inside it).

    Example:

    >>> import keras, numpy as np, keras_safe
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_safe.optimizers.DPSGD(
    ...     learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0), loss="mse")
    >>> model = keras_safe.privacy.make_private(model)
    >>> keras_safe.privacy.make_private(model) is model
    True
    >>> _ = model.fit(np.ones((8, 3)), np.ones((8, 1)), verbose=0)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"make_private expects a keras.Model, got {type(model).__name__}.")
    if getattr(model, _MARK, False):
        return model
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            f"{type(model).__name__} defines its own `train_step`, which keras_safe cannot "
            "replace without undoing it. Inside your train_step, compute the gradients with "
            "`grads = keras_safe.privacy.dp_gradients(self, x, y, sample_weight)` and apply "
            "them with `self.optimizer.apply(grads, self.trainable_variables)`."
        )
    object.__setattr__(model, "train_step", types.MethodType(_train_step, model))
    object.__setattr__(model, _MARK, True)
    model.train_function = None
    return model


def dp_gradients(model, x, y=None, sample_weight=None, return_outputs=False):
    """DP-SGD gradients for one batch: clipped per example, noised and averaged.

    For custom training loops. Uses the DP optimizer the model is compiled with; the result
    can be passed to `model.optimizer.apply(grads, model.trainable_variables)` (the next
    `apply` of the DP optimizer accepts exactly one set of privatized gradients).

    Args:
        model: a model compiled with a keras_safe DP optimizer and a loss.
        x: a batch of inputs.
        y: the batch's targets.
        sample_weight: optional per-example weights.
        return_outputs: also return `(per_example_losses, y_pred)`.

    Returns:
        A list of gradients aligned with `model.trainable_variables` (and the outputs).

    Raises:
        ValueError: if the model is not compiled with a DP optimizer, or has layers DP cannot
            support.
    """
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    if dp is None:
        raise ValueError("dp_gradients needs the model compiled with a keras_safe DP optimizer.")
    check_supported(model)
    _check_training_setup(model)
    variables = model.trainable_variables
    loss_fn = PerExampleLoss(model)

    def forward():
        y_pred = model(x, training=True)
        return loss_fn(y, y_pred, sample_weight), y_pred

    groups = dp.num_microbatches
    clipped, losses, y_pred, _ = clipped_gradient_sum(
        model, variables, forward, dp.l2_norm_clip, num_microbatches=groups
    )
    if groups:
        denominator = groups
    elif dp.batch_size is not None:
        denominator = dp.batch_size
    else:
        denominator = tf.shape(losses)[0]
    grads = dp.privatize(clipped, denominator, variables)
    regularization = _regularization_gradients(model, variables)
    if regularization is not None:
        # The weight penalty's gradient does not depend on the data: adding it to the release
        # is post-processing, so the sum is a release too.
        grads = provenance.mark_released([g + r for g, r in zip(grads, regularization)])
    if return_outputs:
        return grads, (losses, y_pred)
    return grads


def _regularization_gradients(model, variables):
    """Gradient of the weight regularisers' penalties (data-independent, so not clipped)."""
    regularized = [v for v in model.trainable_weights if getattr(v, "regularizer", None)]
    if len(model.losses) > len(regularized):
        raise ValueError(
            "The model adds losses computed from the data (`add_loss` in a layer, or an "
            "activity regularizer). Their gradients would escape per-example clipping, so "
            "DP-SGD cannot train this model: fold such terms into the per-example loss instead."
        )
    if not regularized:
        return None
    with tf.GradientTape() as tape:
        total = tf.add_n([tf.cast(v.regularizer(v), tf.float32) for v in regularized])
    grads = tape.gradient(total, variables)
    return [
        tf.zeros(v.shape, v.dtype) if g is None else tf.cast(g, v.dtype)
        for g, v in zip(grads, variables)
    ]


def _check_training_setup(model):
    if any(
        isinstance(o, keras.optimizers.LossScaleOptimizer) for o in optimizer_chain(model.optimizer)
    ):
        raise ValueError(
            "DP-SGD does not support loss scaling (the `mixed_float16` dtype policy wraps the "
            "optimizer in a LossScaleOptimizer, whose skipped steps depend on the data). Use the "
            "`float32` or `mixed_bfloat16` policy."
        )
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            "DP-SGD runs on one replica: with several, each would add its own noise before the "
            "gradients are summed. Train outside the distribution strategy."
        )


def _loss_metric(model):
    for metric in model.metrics:
        if metric.name == "loss":
            return metric
    return None


def _train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = model.trainable_variables
    if find_dp_optimizer(model.optimizer) is not None:
        grads, (_, y_pred) = dp_gradients(model, x, y, sample_weight, return_outputs=True)
        loss = model.compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
    else:
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            scaled = model.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
    metric = _loss_metric(model)
    if metric is not None:
        first = next(t for t in keras.tree.flatten(x) if t is not None)
        metric.update_state(loss, sample_weight=tf.shape(first)[0])
    model.optimizer.apply(grads, variables)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    for optimizer in optimizer_chain(model.optimizer):
        if hasattr(optimizer, "step_logs"):
            logs.update(optimizer.step_logs())
    return logs
