"""keras_safe's train step: one place that owns the gradient path of `fit`.

Stages run first (`keras_safe.training.stages`: adversarial examples, for example). On a private
model (`make_private`), the DP optimizer must be in the compiled optimizer chain: the step computes
per-example clipped gradient sums (`keras_safe.privacy.per_example`), lets the DP optimizer add
noise and average (`DPOptimizer.privatize`), charges the model's privacy ledger in the graph, adds
the gradient of weight regularisers (data-independent, so outside clipping) and applies the result
through the compiled optimizer, wrappers included. On a model that is not private it is Keras's
usual step (with the stages). Either way it reports the loss and metrics as Keras does, plus the
figures of optimizers in the chain that define `step_logs()`.
"""

import keras
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.optimizers import provenance
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.optimizers.wrapper import optimizer_chain
from keras_safe.privacy.ledger import get_ledger
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.model_checks import check_supported
from keras_safe.privacy.per_example import clipped_gradient_sum
from keras_safe.training import distribution, state, verification
from keras_safe.training.stages import get_stages

__all__ = ["dp_gradients", "train_step"]


@tf.autograph.experimental.do_not_convert
def dp_gradients(model, x, y=None, sample_weight=None, return_outputs=False):
    """DP-SGD gradients for one batch: clipped per example, noised and averaged.

    For custom training loops and custom `train_step`s. Uses the DP optimizer the model is
    compiled with, runs the model's stages, and charges the model's privacy ledger. Apply
    exactly the returned list: `model.optimizer.apply(grads, model.trainable_variables)`; the DP
    optimizer refuses any other gradient tensors.

    Args:
        model: a model compiled with a keras_safe DP optimizer and a loss, made private with
            `keras_safe.privacy.make_private` (which reads the data settings in `fit`; outside
            `fit`, declare `num_examples` and `batch_size` on the DP optimizer).
        x: a batch of inputs.
        y: the batch's targets.
        sample_weight: optional per-example weights.
        return_outputs: also return `(per_example_losses, y_pred)`.

    Returns:
        A list of gradients aligned with `model.trainable_variables` (and the outputs).

    Raises:
        keras_safe._validation.PrivacyError: if the model is not compiled with a DP optimizer,
            its sampling rate cannot be known, or it has layers or losses DP cannot support.

    Example:

    >>> import keras, numpy as np, keras_safe
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer=keras_safe.optimizers.DPSGD(
    ...     learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0,
    ...     num_examples=64, batch_size=8), loss="mse")
    >>> model = keras_safe.privacy.make_private(model)
    >>> grads = keras_safe.privacy.dp_gradients(model, np.ones((8, 3)), np.ones((8, 1)))
    >>> model.optimizer.apply(grads, model.trainable_variables)
    >>> keras_safe.privacy.get_ledger(model).steps
    1
    """
    if tf.executing_eagerly():
        verification.ensure_verified(model, x, y, sample_weight)
    x, y, sample_weight = _run_data_stages(model, x, y, sample_weight)
    grads, losses, y_pred = _private_gradients(model, x, y, sample_weight)
    if return_outputs:
        return grads, (losses, y_pred)
    return grads


def train_step(model, data):
    """One training step of `model` on `data` (Keras's `train_step` contract)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    x, y, sample_weight = _run_data_stages(model, x, y, sample_weight)
    variables = model.trainable_variables
    loss_stage = _loss_stage(model)
    if state.is_private(model):
        grads, losses, y_pred = _private_gradients(model, x, y, sample_weight)
        if loss_stage is None:
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            loss = distribution.loss_for_report(loss)
        else:
            loss = _stage_loss(model, losses)
    else:
        with tf.GradientTape() as tape:
            if loss_stage is None:
                y_pred = model(x, training=True)
                share = model.compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
                loss = distribution.loss_for_report(share)
            else:
                losses, y_pred = loss_stage.losses(
                    model, x, y, sample_weight, PerExampleLoss(model)
                )
                loss = _stage_loss(model, losses)
                share = distribution.loss_for_gradients(loss)
            scaled = model.optimizer.scale_loss(share)
        grads = tape.gradient(scaled, variables)
    metric = _loss_metric(model)
    if metric is not None:
        first = next(t for t in keras.tree.flatten(x) if t is not None)
        metric.update_state(loss, sample_weight=tf.shape(first)[0])
    model.optimizer.apply(grads, variables)
    if sample_weight is not None and getattr(state.data_settings(model), "poisson", False):
        y_pred = _mask_padding(y_pred, sample_weight)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    for optimizer in optimizer_chain(model.optimizer):
        if hasattr(optimizer, "step_logs"):
            logs.update(optimizer.step_logs())
    return distribution.logs_for_fit(logs)


# -- the parts ----------------------------------------------------------------------------------


def _run_data_stages(model, x, y, sample_weight):
    for stage in get_stages(model):
        x, y, sample_weight = stage.transform(model, x, y, sample_weight)
        x = keras.tree.map_structure(lambda t: None if t is None else tf.stop_gradient(t), x)
    return x, y, sample_weight


def _mask_padding(y_pred, sample_weight):
    """Outputs masked on the padding rows of a Poisson batch, so that metrics skip them.

    Keras applies `sample_weight` only to `weighted_metrics`; an output's Keras mask reaches every
    metric. The padding rows (weight 0) are not examples: without the mask, `accuracy` would count
    them.
    """
    weights = keras.tree.flatten(sample_weight)[0]
    rows = tf.reduce_max(tf.reshape(tf.cast(weights, tf.float32), [tf.shape(weights)[0], -1]), 1)
    real = rows > 0

    def mask(output):
        if output is None:
            return None
        previous = getattr(output, "_keras_mask", None)
        output = tf.identity(output)
        rank = output.shape.rank
        # One value per example for outputs [B] or [B, C]; [B, 1, ...] against a [B, T, ...] mask.
        row_mask = real if rank is None or rank <= 2 else tf.reshape(real, [-1] + [1] * (rank - 2))
        if previous is not None:
            row_mask = tf.logical_and(tf.cast(previous, tf.bool), row_mask)
        combined = row_mask
        output._keras_mask = combined  # the attribute Keras reads masks from
        return output

    return keras.tree.map_structure(mask, y_pred)


def _loss_stage(model):
    for stage in get_stages(model):
        if stage.overrides_losses:
            return stage
    return None


def _stage_loss(model, losses):
    loss = tf.reduce_mean(losses)
    if model.losses:
        loss = loss + tf.add_n([tf.cast(v, loss.dtype) for v in model.losses])
    return loss


def _private_gradients(model, x, y, sample_weight):
    """The DP release of one batch, with the ledger charged; `(grads, losses, y_pred)`."""
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    if dp is None:
        raise PrivacyError(
            f"{model.name} was made private, but its optimizer "
            f"({type(getattr(model, 'optimizer', None)).__name__}) is not a keras_safe DP "
            "optimizer, so the step would train without clipping and noise. Fix: compile with "
            "keras_safe.optimizers.DPSGD(...), DPAdam(...) or DPOptimizer(your_optimizer, ...)."
        )
    check_supported(model)
    _check_training_setup(model)
    verification.require_verified(model)
    schedule = state.current_schedule(model, dp)
    variables = model.trainable_variables
    loss_fn = PerExampleLoss(model)
    loss_stage = _loss_stage(model)

    def forward():
        if loss_stage is not None:
            return loss_stage.losses(model, x, y, sample_weight, loss_fn)
        y_pred = model(x, training=True)
        return loss_fn(y, y_pred, sample_weight), y_pred

    groups = dp.num_microbatches
    options = {}
    fallback = state.fallback_mode(model)
    if fallback is not None:
        options["fallback"] = fallback
    _check_microbatches(x, groups)
    distribution.check_batch_is_split(x)
    clipped, losses, y_pred, norms = clipped_gradient_sum(
        model, variables, forward, dp.l2_norm_clip, num_microbatches=groups, **options
    )
    grads = dp.privatize(clipped, groups or schedule.batch_size, variables)
    ledger = get_ledger(model, create=True)
    slot = ledger.slot(
        schedule.accounted_noise, schedule.sampling_rate, schedule.num_examples, dp.seeded
    )
    charged = ledger.charge(slot, rows=_rows(x, sample_weight))
    ledger.record_nonfinite(tf.reduce_sum(tf.cast(~tf.math.is_finite(norms), tf.int64)))
    # The release waits for the charge: a step the ledger refuses releases nothing.
    with tf.control_dependencies([c for c in charged if c is not None]):
        grads = provenance.mark_released([tf.identity(g) for g in grads])
    regularization = _regularization_gradients(model, variables)
    if regularization is not None:
        # The weight penalty's gradient does not depend on the data: adding it to the release
        # is post-processing, so the sum is a release too.
        grads = provenance.mark_released([g + r for g, r in zip(grads, regularization)])
    return grads, losses, y_pred


def _rows(x, sample_weight):
    """Examples in the batch: rows with a positive weight (Poisson padding has weight 0)."""
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    weights = keras.tree.flatten(sample_weight)[0] if sample_weight is not None else None
    if weights is None:
        return tf.shape(first)[0]
    weights = tf.reshape(tf.cast(weights, tf.float32), [tf.shape(first)[0], -1])
    return tf.reduce_sum(tf.cast(tf.reduce_max(weights, axis=1) > 0, tf.int32))


def _check_microbatches(x, groups):
    if not groups:
        return
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    rows = first.shape[0]
    if rows is not None and rows % groups:
        raise PrivacyError(
            f"A batch of {rows} examples cannot be split into num_microbatches={groups} equal "
            "microbatches. Fix: use a batch size divisible by num_microbatches (and a dataset "
            "whose last batch is too, for example with drop_remainder=True), or leave "
            "num_microbatches out (per-example clipping)."
        )


def _regularization_gradients(model, variables):
    """Gradient of the weight regularisers' penalties (data-independent, so not clipped)."""
    regularized = [v for v in model.trainable_weights if getattr(v, "regularizer", None)]
    if len(model.losses) > len(regularized):
        raise PrivacyError(
            "The model adds losses computed from the data (`add_loss` in a layer, or an "
            "activity regularizer). Their gradients would escape per-example clipping, so "
            "DP-SGD cannot train this model. Fix: fold such terms into the per-example loss."
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
    chain = optimizer_chain(model.optimizer)
    if any(isinstance(o, keras.optimizers.LossScaleOptimizer) for o in chain):
        raise PrivacyError(
            "DP-SGD does not support loss scaling (the `mixed_float16` dtype policy wraps the "
            "optimizer in a LossScaleOptimizer, whose skipped steps depend on the data). Fix: "
            "use the `float32` or `mixed_bfloat16` policy."
        )
    # Under tf.distribute: the strategy and the settings the distributed step supports.
    distribution.check_private_step(model, find_dp_optimizer(model.optimizer))


def _loss_metric(model):
    for metric in model.metrics:
        if metric.name == "loss":
            return metric
    return None
