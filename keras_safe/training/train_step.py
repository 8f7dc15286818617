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

from keras_safe._validation import STEP_REFUSED, PrivacyError, step_refusal
from keras_safe.optimizers import provenance
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.optimizers.wrapper import optimizer_chain
from keras_safe.privacy import independence
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.model_checks import check_supported
from keras_safe.privacy.per_example.clipping import clipped_gradient_sum
from keras_safe.privacy.per_example.embedding_form import data_dependent_shapes
from keras_safe.privacy.sampling import default_max_batch_size
from keras_safe.training import distribution, ownership, preflight, state
from keras_safe.training.stages import get_stages

__all__ = ["dp_gradients", "train_step"]


@tf.autograph.experimental.do_not_convert
def dp_gradients(model, x, y=None, sample_weight=None, return_outputs=False, users=None):
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
        users: with `privacy_unit="user"` on the DP optimizer, the user id of each row: the
            batch is laid out in slots of `examples_per_user` rows, one user's examples per
            slot (padding rows of weight 0), as `keras_safe.privacy.poisson_batches(...,
            users=...)` yields it (its fourth element).

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
        preflight.ensure_verified(model, x, y, sample_weight)
    _, _, _, grads, losses, y_pred = _private_step(model, x, y, sample_weight, users)
    if return_outputs:
        return grads, (losses, y_pred)
    return grads


def train_step(model, data):
    """One training step of `model` on `data` (Keras's `train_step` contract; a fourth element,
    the rows' user ids, for user-level privacy)."""
    data, users = split_users(data)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = model.trainable_variables
    loss_stage = _loss_stage(model)
    if state.is_private(model):
        # Ops with data-dependent shapes (cheaper embedding norms) unless XLA compiles the step.
        with data_dependent_shapes(not getattr(model, "jit_compile", False)):
            x, y, sample_weight, grads, losses, y_pred = _private_step(
                model, x, y, sample_weight, users
            )
        dp = find_dp_optimizer(getattr(model, "optimizer", None))
        state.safe_state(model).traced_for = state.step_mode(model, dp)
        if loss_stage is None:
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            loss = distribution.loss_for_report(loss)
        else:
            loss = _stage_loss(model, losses)
    else:
        if users is not None:
            raise PrivacyError(
                f"{model.name} got batches with user ids (a fourth element), but it is not "
                "private, so nothing would use them. Fix: make it private with a DP optimizer "
                "with privacy_unit='user' (keras_safe.privacy.make_private), or drop the ids."
            )
        x, y, sample_weight = _run_data_stages(model, x, y, sample_weight)
        prepared = _prepare(loss_stage, model, x, y, sample_weight)
        with tf.GradientTape() as tape:
            if loss_stage is None:
                y_pred = model(x, training=True)
                share = model.compute_loss(
                    x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
                )
                loss = distribution.loss_for_report(share)
            else:
                losses, y_pred = loss_stage.losses(
                    model, x, y, sample_weight, PerExampleLoss(model), prepared
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
    if sample_weight is not None and getattr(state.step_settings(model), "poisson", False):
        y_pred = _mask_padding(y_pred, sample_weight)
    logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
    for optimizer in optimizer_chain(model.optimizer):
        if hasattr(optimizer, "step_logs"):
            logs.update(optimizer.step_logs())
    return distribution.logs_for_fit(logs)


def split_users(data):
    """`(data, users)`: a batch `(x, y, sample_weight, users)` of a user-level dataset split
    into Keras's three elements and the rows' user ids (None for any other batch)."""
    if isinstance(data, (tuple, list)) and len(data) == 4:
        return tuple(data[:3]), data[3]
    return data, None


def _private_step(model, x, y, sample_weight, users=None):
    """The data stages and the DP release of one batch: `(x, y, sample_weight, grads, losses,
    y_pred)`, with the batch as the stages left it.

    Always a traced step, whose graph `keras_safe.privacy.independence` proves row-wise before
    it runs: an eager call (`run_eagerly`, an eager `dp_gradients`) runs a compiled copy of the
    step, traced again when what it was traced with changes.
    """
    if not tf.executing_eagerly():
        return _traced_private_step(model, x, y, sample_weight, users)
    args = tf.nest.map_structure(_as_tensor, (x, y, sample_weight, users))
    if model.trainable_variables:  # (an unbuilt model is built, then settled, when traced)
        ownership.settle_ledger(model)  # weights shared or copied in since the last step
    function = _eager_step(model)
    # Traced for any number of rows, as fit's step is: with the number fixed in the graph, a
    # forward pass computing with it (private under Poisson sampling) would escape the proof.
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    if getattr(dp, "physical_batch_size", None) is None:
        function.get_concrete_function(*tf.nest.map_structure(_any_rows, args))
    # (With physical_batch_size the step is traced for the batch's own number of rows: chunks
    # need a fixed count, a padded batch whose size says nothing of the data.)
    try:
        outputs = function(*args)
    except tf.errors.InvalidArgumentError as error:
        refusal = step_refusal(error)
        if refusal is None:
            raise
        raise refusal from None
    x, y, sample_weight, grads, losses, y_pred = outputs
    return x, y, sample_weight, provenance.mark_released(list(grads)), losses, y_pred


def _as_tensor(value):
    if value is None or isinstance(value, (tf.Tensor, tf.SparseTensor, tf.RaggedTensor)):
        return value
    return tf.convert_to_tensor(value)


def _any_rows(value):
    """The spec of `value` with its number of rows left open."""
    if isinstance(value, tf.Tensor) and value.shape.rank:
        return tf.TensorSpec([None, *value.shape[1:]], value.dtype)
    return None if value is None else tf.type_spec_from_value(value)


def _eager_step(model):
    """The compiled private step of `model` for eager calls, rebuilt when what it was traced
    with changes (optimizer, data settings, fallback, stages, loss, variables)."""
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    key = (
        id(model.optimizer),
        None if dp is None else (dp.noise_multiplier, dp.l2_norm_clip, dp.num_microbatches),
        state.step_mode(model, dp),
        state.fallback_mode(model),
        tuple(id(s) for s in get_stages(model)),
        id(getattr(model, "loss", None)),
        tuple(id(v) for v in model.trainable_variables),
    )
    found = state.safe_state(model)
    cached = found.eager_step
    if cached is None or cached[0] != key:
        # Without AutoGraph, as Keras's own train step runs (Keras is not converted): the step
        # has no Python control flow on tensors, and converting keras_safe's code took seconds.
        function = tf.function(
            lambda x, y, sample_weight, users: _traced_private_step(
                model, x, y, sample_weight, users
            ),
            reduce_retracing=True,
            autograph=False,
        )
        cached = found.eager_step = (key, function)
    return cached[1]


def _traced_private_step(model, x, y, sample_weight, users=None):
    preflight.require_dense(model, (x, y, sample_weight, users))
    # On the batch as the replica received it: a new tensor made from it (a data stage, the
    # identity below) differs between replicas even when every replica got the whole batch.
    distribution.check_batch_is_split(x)
    # The step's data as tensors of the step's own graph: a step traced in a loop's body (a
    # custom loop) reads the caller's tensors through captures, which the proof must see as
    # the rows they are, and any other capture as mixing.
    x, y, sample_weight, users = keras.tree.map_structure(
        lambda t: tf.identity(t) if tf.is_tensor(t) else t, (x, y, sample_weight, users)
    )
    watch = _Watch((x, y, sample_weight))
    x, y, sample_weight = _run_data_stages(model, x, y, sample_weight)
    prepared = _prepare(_loss_stage(model), model, x, y, sample_weight)
    grads, losses, y_pred = _private_gradients(model, x, y, sample_weight, watch, prepared, users)
    return x, y, sample_weight, grads, losses, y_pred


class _Watch:
    """The ops a traced step creates from its data up to its per-example losses."""

    def __init__(self, data):
        self.data = data
        self.graph = tf.compat.v1.get_default_graph()
        self.start = len(self.graph.get_operations())
        self.stop = None

        self.staged = None  # with chunks: (the data they are cut from, where cutting starts)
        self.chunks = []  # with chunks: [rows, graph, ops start, ops stop, losses] per chunk

    def forward_done(self):
        if self.chunks:  # (a chunk's ops are counted in its own graph)
            self.chunks[-1][3] = len(self.chunks[-1][1].get_operations())
        else:
            self.stop = len(self.graph.get_operations())

    def chunking(self, staged):
        """The step cuts `staged` (the data after the stages) into chunks from here on."""
        self.staged = (staged, len(self.graph.get_operations()))

    def chunk(self, rows):
        """A chunk's forward pass starts: `rows` are its slices of the staged data, in the
        step's graph or in the body of the loop over chunks."""
        graph = tf.compat.v1.get_default_graph()
        self.chunks.append([rows, graph, len(graph.get_operations()), None, None])

    def chunk_done(self, losses):
        self.chunks[-1][4] = losses

    def check(self, model, losses, batch_size_private):
        """Refuses (when the step is traced) a step whose examples are not provably apart."""
        ops = self.graph.get_operations()
        if self.staged is None:
            independence.check_step(
                self.data,
                losses,
                ops[self.start : self.stop],
                model.name,
                batch_size_private,
                before=ops[: self.start],
                step_ops=ops[self.start :],
            )
            return
        staged, cut = self.staged
        chunks = []
        for rows, graph, start, stop, chunk_losses in self.chunks:
            if stop is None or chunk_losses is None:  # (a chunk without a forward pass)
                raise PrivacyError(
                    f"keras_safe cannot show that the examples of a batch stay apart in the "
                    f"train step of {model.name}: a chunk of the batch was clipped without a "
                    "forward pass it could check. Nothing was trained."
                )
            chunks.append((rows, chunk_losses, graph.get_operations()[start:stop]))
        independence.check_chunked_step(
            self.data,
            staged,
            ops[self.start : cut],
            ops[self.start :],
            chunks,
            model.name,
            batch_size_private,
            before=ops[: self.start],
        )


# -- the parts ----------------------------------------------------------------------------------


def _run_data_stages(model, x, y, sample_weight):
    for stage in get_stages(model):
        x, y, sample_weight = stage.transform(model, x, y, sample_weight)
        x = keras.tree.map_structure(lambda t: None if t is None else tf.stop_gradient(t), x)
    return x, y, sample_weight


def _prepare(loss_stage, model, x, y, sample_weight):
    """What the loss stage computes before the gradient pass (`TrainingStage.prepare`), as data."""
    if loss_stage is None:
        return None
    prepared = loss_stage.prepare(model, x, y, sample_weight)
    return keras.tree.map_structure(
        lambda t: t if t is None or not tf.is_tensor(t) else tf.stop_gradient(t), prepared
    )


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
        # keras-internal: keras-mask
        previous = getattr(output, "_keras_mask", None)
        output = tf.identity(output)
        rank = output.shape.rank
        # One value per example for outputs [B] or [B, C]; [B, 1, ...] against a [B, T, ...] mask.
        row_mask = real if rank is None or rank <= 2 else tf.reshape(real, [-1] + [1] * (rank - 2))
        if previous is not None:
            row_mask = tf.logical_and(tf.cast(previous, tf.bool), row_mask)
        combined = row_mask
        # keras-internal: keras-mask
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


def _private_gradients(model, x, y, sample_weight, watch, prepared=None, users=None):
    """The DP release of one batch, with the ledger charged; `(grads, losses, y_pred)`.

    Refused when the step is traced if `watch` cannot prove its examples apart; at run time,
    the release waits for the in-step checks of the batch (`_batch_checks`) and the charge.
    """
    dp = state.require_dp_optimizer(model)
    check_supported(model)
    _check_training_setup(model)
    preflight.require_verified(model)
    schedule = state.current_schedule(model, dp)
    variables = model.trainable_variables
    loss_fn = PerExampleLoss(model)
    loss_stage = _loss_stage(model)

    def forward_on(x, y, sample_weight, prepared):
        if loss_stage is not None:
            losses, y_pred = loss_stage.losses(model, x, y, sample_weight, loss_fn, prepared)
        else:
            y_pred = model(x, training=True)
            losses = loss_fn(y, y_pred, sample_weight)
        watch.forward_done()
        return losses, y_pred

    groups = dp.num_microbatches
    options = {}
    fallback = state.fallback_mode(model)
    if fallback is not None:
        options["fallback"] = fallback
    per_user = user_slots(model, schedule, users, sample_weight)
    if (groups or per_user) and sample_weight is not None:
        # A unit of several rows (a microbatch, a user's slot) must not depend on its padding
        # rows, which repeat other examples' data: a non-finite value there would drop the
        # whole unit. Rows without weight enter the forward pass as zeros.
        x, y = _zero_unweighted(x, y, sample_weight)
    _check_microbatches(x, groups or per_user, "examples_per_user" if per_user else None)

    def clip(data):
        return clipped_gradient_sum(
            model,
            variables,
            lambda: forward_on(*data),
            dp.l2_norm_clip,
            num_microbatches=groups,
            examples_per_user=per_user,
            **options,
        )

    data = (x, y, sample_weight, prepared)
    physical = getattr(dp, "physical_batch_size", None)
    if physical:
        clipped, losses, y_pred, norms = _clip_in_chunks(clip, data, physical, per_user, watch)
    else:
        clipped, losses, y_pred, norms = clip(data)
    # Under Poisson sampling the number of rows is itself private, unless padded to one size.
    padded = getattr(state.step_settings(model), "padded", False)
    watch.check(model, losses, schedule.poisson and not padded)
    # The model's budget and the segment of this schedule, gated in the charge below.
    ownership.settle_ledger(model)  # shared or copied weights answer to one ledger
    ledger, slot = state.ledger_slot(model, dp, schedule)
    checks, batch_ok = _batch_checks(model, x, sample_weight, schedule, dp, users)
    with tf.control_dependencies(checks):
        in_fit = state.step_settings(model) is not None  # else batches the caller gave
        charged = ledger.charge(slot, rows=_rows(x, sample_weight), in_epoch=in_fit)
    # Where assertions do not run (XLA), a step the budget or the batch checks refuse releases
    # zeros (the gate multiplies the release in the division by the batch size: no extra pass).
    allowed = tf.logical_and(charged.allowed, batch_ok)
    with provenance.releasing():
        grads = dp.privatize(clipped, schedule.divisor, variables, gate=allowed)
    # Only real examples count: padding rows (weight 0) repeat an example's data.
    bad = ~tf.math.is_finite(norms)
    if sample_weight is not None and not groups:
        # A unit (an example, or a user's slot) counts when any of its rows has a weight.
        weights = tf.cast(keras.tree.flatten(sample_weight)[0], tf.float32)
        weights = tf.reshape(weights, [tf.shape(bad)[0], -1])
        bad = tf.logical_and(bad, tf.reduce_max(tf.abs(weights), axis=1) > 0)
    ledger.record_nonfinite(tf.reduce_sum(tf.cast(bad, tf.int64)))
    # The release waits for the charge: a step the ledger refuses releases nothing.
    with tf.control_dependencies([c for c in charged if c is not None]):
        grads = [tf.identity(g) for g in grads]
    regularization = _regularization_gradients(model, variables)
    if regularization is not None:
        # The weight penalty's gradient does not depend on the data: adding it to the release
        # is post-processing, so the sum is a release too.
        grads = [g + r for g, r in zip(grads, regularization)]
    # The one place where a step's gradients become its DP release: the only gradient tensors
    # a DP optimizer applies (an eager call marks the compiled copy's outputs, the same values).
    return provenance.mark_released(grads), losses, y_pred


def _clip_in_chunks(clip, data, size, per_user, watch):
    """`clip(data)` on consecutive chunks of `size` rows, one after the other, summed: the
    clipped sum of a large (logical) batch with the memory of one chunk
    (`physical_batch_size`).

    The first chunk is traced in the step's graph (it gives the shapes of what a chunk
    returns), the others in the body of one `tf.while_loop`: the step's graph holds two copies
    of the forward and backward passes whatever the number of chunks. Each chunk starts once
    the previous one is summed, so only one chunk's activations and per-example factors are
    alive at a time (on a CPU, chunks in parallel were no faster: both cores already work
    inside each chunk's ops). The noise is drawn once, for the whole batch, by the caller. The
    batch must have a fixed number of rows, a multiple of `size`. `watch` (the step's `_Watch`)
    learns where each chunk's rows and forward pass are, in which graph, for the proof that
    the examples stay apart (`independence.check_chunked_step`).
    """
    first = next(t for t in keras.tree.flatten(data[0]) if t is not None)
    rows = first.shape[0]
    if rows is None or rows % size:
        raise PrivacyError(
            f"physical_batch_size={size} splits each batch into chunks of {size} rows, but this "
            f"batch has {'a varying number of' if rows is None else rows} rows, not a fixed "
            "multiple of it. Nothing was trained. Fix: train with fit on arrays (it pads each "
            "Poisson batch to a multiple of physical_batch_size), or pass poisson_batches a "
            "max_batch_size that is a multiple of it."
        )
    if per_user and size % per_user:
        raise PrivacyError(
            f"physical_batch_size={size} would cut users' slots of examples_per_user="
            f"{per_user} rows in two. Fix: choose a physical_batch_size that is a multiple of "
            "examples_per_user."
        )
    count = rows // size
    if count == 1:
        return clip(data)
    unknown = [t for t in keras.tree.flatten(data) if tf.is_tensor(t) and t.shape.rank is None]
    if unknown:
        raise PrivacyError(
            f"physical_batch_size={size} splits each batch into chunks of rows, but a tensor of "
            "the batch has an unknown number of dimensions, so its rows cannot be cut. Nothing "
            "was trained. Fix: give the step's inputs, targets and weights static ranks."
        )

    def rows_of(t, start):
        if t is None or not tf.is_tensor(t) or t.shape.rank in (None, 0):
            return t
        begin = tf.concat([tf.reshape(start, [1]), tf.zeros([t.shape.rank - 1], tf.int32)], 0)
        part = tf.slice(t, begin, [size] + [-1] * (t.shape.rank - 1))
        return tf.ensure_shape(part, [size, *t.shape[1:]])

    def chunk_at(start):
        return keras.tree.map_structure(lambda t: rows_of(t, start), data)

    watch.chunking(data)
    # The first chunk outside the loop gives the shapes of what each chunk returns.
    chunk = chunk_at(tf.constant(0))
    watch.chunk(chunk)
    sums, losses, y_pred, norms = clip(chunk)
    watch.chunk_done(losses)
    outputs = [losses, norms, *keras.tree.flatten(y_pred)]
    arrays = [
        tf.TensorArray(t.dtype, size=count, element_shape=t.shape).write(0, t) for t in outputs
    ]

    def body(i, totals, arrays):
        with tf.control_dependencies(totals):  # (the previous chunk is summed)
            i = tf.identity(i)
        chunk = chunk_at(i * size)
        watch.chunk(chunk)
        sums, losses, y_pred, norms = clip(chunk)
        watch.chunk_done(losses)
        totals = [a + b for a, b in zip(totals, sums)]
        outputs = [losses, norms, *keras.tree.flatten(y_pred)]
        return i + 1, totals, [a.write(i, t) for a, t in zip(arrays, outputs)]

    _, totals, arrays = tf.while_loop(
        lambda i, totals, arrays: i < count,
        body,
        (tf.constant(1), list(sums), arrays),
        parallel_iterations=1,
        maximum_iterations=count - 1,
    )
    outputs = []
    for a, t in zip(arrays, [losses, norms, *keras.tree.flatten(y_pred)]):
        whole = a.concat()
        whole.set_shape([None if t.shape[0] is None else count * t.shape[0], *t.shape[1:]])
        outputs.append(whole)
    losses, norms = outputs[:2]
    y_pred = keras.tree.pack_sequence_as(y_pred, outputs[2:])
    return totals, losses, y_pred, norms


def _zero_unweighted(x, y, sample_weight):
    """`x` and `y` with every row that has no nonzero weight replaced by zeros."""
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    used = _row_used(first, sample_weight)

    def zero(t):
        if t is None or not tf.is_tensor(t) or t.shape.rank is None or t.shape.rank == 0:
            return t  # (an input of unknown rank is left as it is: a non-finite padding value
            # there drops its unit, which the in-step count of non-finite units reports)
        mask = tf.reshape(used, [-1] + [1] * (t.shape.rank - 1))
        return tf.where(mask, t, tf.zeros_like(t))

    return keras.tree.map_structure(zero, x), keras.tree.map_structure(zero, y)


def _rows(x, sample_weight):
    """Examples in the batch: rows with a nonzero weight in any output's weights (Poisson
    padding has weight 0 everywhere; a negative or non-finite weight still enters the step)."""
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return tf.reduce_sum(tf.cast(_row_used(first, sample_weight), tf.int32))


def user_slots(model, schedule, users, sample_weight):
    """The rows of a user's slot for a user-level step (None for an example-level one).

    Raises:
        keras_safe._validation.PrivacyError: user ids without user-level privacy, user-level
            privacy without user ids or weights (which mark a slot's padding rows), or an
            unknown slot size.
    """
    if not schedule.user_level:
        if users is not None:
            raise PrivacyError(
                f"{model.name} got batches with user ids, but its DP optimizer protects one "
                "example (privacy_unit='example'), so the guarantee would not be the user-level "
                "one the ids suggest. Nothing was trained. Fix: pass privacy_unit='user' to the "
                "DP optimizer for user-level privacy, or train on batches without ids (for the "
                "user-level epsilon of example-level training, pass users=... to fit on "
                "arrays)."
            )
        return None
    if users is None or sample_weight is None:
        raise PrivacyError(
            f"{model.name} trains with privacy_unit='user', but this batch has no "
            + ("user ids" if users is None else "sample weights (they mark padding rows)")
            + ", so keras_safe cannot tell whose examples it holds. Nothing was trained. Fix: "
            "train on keras_safe.privacy.poisson_batches(x, y, users=ids, examples_per_user=k) "
            "or fit(x, y, users=ids) on arrays; in a custom loop, dp_gradients takes users=... "
            "and sample_weight=... with the same slot layout (train_on_batch cannot carry ids)."
        )
    ids = keras.tree.flatten(users)
    if len(ids) != 1 or not tf.as_dtype(ids[0].dtype).is_integer:
        raise PrivacyError(
            f"{model.name} got user ids that are not one integer tensor "
            f"({[tf.as_dtype(t.dtype).name for t in ids]}): a float id is truncated (users 5.2 "
            "and 5.7 would share a slot) and a float32 id above 2**24 is rounded onto its "
            "neighbour's. Nothing was trained. Fix: pass integer ids, for example "
            "np.unique(ids, return_inverse=True)[1]."
        )
    context = tf.distribute.get_replica_context()
    if tf.distribute.in_cross_replica_context() or (
        context is not None and context.num_replicas_in_sync > 1
    ):
        raise PrivacyError(
            f"{model.name} trains with privacy_unit='user' under a tf.distribute strategy with "
            "several replicas, where one user's slots could reach two replicas unchecked. "
            "Nothing was trained. Fix: train user-level models on one device."
        )
    if not schedule.examples_per_user:
        raise PrivacyError(
            f"{model.name} trains with privacy_unit='user', but the rows of a user's slot are "
            "not known. Fix: declare examples_per_user=... on the DP optimizer, or train on "
            "keras_safe.privacy.poisson_batches(..., users=ids, examples_per_user=k)."
        )
    return int(schedule.examples_per_user)


def _user_checks(x, users, sample_weight, size, limit, how):
    """In-step assertions of a user-level batch: one id per row of `x`, the rows of each slot
    of `size` rows that have a weight belong to one user, no user has rows in two slots, and
    at most `limit` slots hold a user. Returns `(assertions, ok)`."""
    first = keras.tree.flatten(users)[0]
    data = next(t for t in keras.tree.flatten(x) if t is not None)
    rows = tf.shape(data)[0]
    static = (first.shape.num_elements(), data.shape[0])
    if None not in static and static[0] != static[1]:
        raise PrivacyError(
            f"users holds {static[0]} ids for a batch of {static[1]} rows: it must hold one id "
            "per row of x. Nothing was trained. Fix: pass the ids of the batch's rows, as "
            "keras_safe.privacy.poisson_batches(..., users=ids) yields them."
        )
    same = tf.debugging.assert_equal(
        tf.size(first),
        rows,
        message=f"{STEP_REFUSED}users must hold one id per row of x (a user's slot is "
        f"examples_per_user={size} rows). Nothing was applied or charged. Fix: pass the ids of "
        "the batch's rows, as keras_safe.privacy.poisson_batches(..., users=ids) yields them.",
    )
    with tf.control_dependencies([same]):
        first = tf.identity(first)
    ids = tf.reshape(tf.cast(first, tf.int64), [-1, size])
    real = tf.reshape(_row_used(data, sample_weight), [-1, size])
    big = tf.constant(2**62, tf.int64)
    low = tf.reduce_min(tf.where(real, ids, big), axis=1)
    high = tf.reduce_max(tf.where(real, ids, -big), axis=1)
    filled = tf.reduce_any(real, axis=1)
    one_user = tf.reduce_all(tf.logical_or(~filled, tf.equal(low, high)))
    # The padding id -1 (or any negative id) on a row with weight would make it a user no
    # other slot is checked against.
    named = tf.reduce_all(tf.logical_or(~real, ids >= 0))
    owners = tf.boolean_mask(low, filled)
    distinct = tf.equal(tf.size(tf.unique(owners).y), tf.size(owners))
    count = _sum_over_replicas(tf.reduce_sum(tf.cast(filled, tf.int64)))
    within = count <= limit
    refused = f"{STEP_REFUSED}"
    fix = (
        " Nothing was applied or charged. Fix: train on keras_safe.privacy.poisson_batches(x, "
        f"y, users=ids, examples_per_user={size}), whose batches put each sampled user's "
        "examples in one slot."
    )
    checks = [
        tf.debugging.assert_equal(
            one_user,
            True,
            message=f"{refused}a slot of {size} rows holds examples of several users, so the "
            "user-level clipping would clip them together and one user's examples could sit "
            f"in two slots.{fix}",
        ),
        tf.debugging.assert_equal(
            named,
            True,
            message=f"{refused}a row with weight carries a negative user id (-1 marks padding "
            f"rows, which have weight 0).{fix}",
        ),
        tf.debugging.assert_equal(
            distinct,
            True,
            message=f"{refused}one user's examples sit in several slots of this batch, so "
            "that user could move the clipped sum by more than the clipping norm "
            f"(user-level sensitivity is one slot).{fix}",
        ),
        tf.debugging.assert_less_equal(
            count,
            tf.constant(limit, tf.int64),
            message=f"{refused}its batch holds more users than the accounting allows ({how}), "
            f"so epsilon would be understated.{fix} Users in this batch:",
        ),
    ]
    return [same, *checks], tf.reduce_all(tf.stack([one_user, named, distinct, within]))


def _row_used(first, sample_weight):
    """Per row: whether any of its weights is nonzero (every row without weights)."""
    leaves = [w for w in keras.tree.flatten(sample_weight) if w is not None]
    size = tf.shape(first)[0]
    if not leaves:
        return tf.ones([size], tf.bool)

    def row_used(w):
        nonzero = tf.not_equal(tf.cast(w, tf.float32), 0.0)
        rank = w.shape.rank
        if rank is None:
            return tf.reduce_any(tf.reshape(nonzero, [size, -1]), axis=1)
        return tf.reduce_any(nonzero, axis=list(range(1, rank))) if rank > 1 else nonzero

    return tf.reduce_any(tf.stack([row_used(w) for w in leaves]), axis=0)


def _batch_checks(model, x, sample_weight, schedule, dp, users=None):
    """In-step assertions that this step's batch is the batch the accountant charges.

    - The examples (rows of positive weight, summed over replicas) are at most what the
      sampling allows: the accounted batch size for fixed batches, the padded size a Poisson
      sample of the accounted rate exceeds with probability below 1e-9 for Poisson batches.
    - Microbatches accounted at sensitivity C (one example each) hold one example each.

    They run inside the step, so `fit`, `train_on_batch`, `dp_gradients` and custom loops are
    all covered; the release and the charge wait for them. Returns `(assertions, ok)`: `ok`
    (a boolean tensor) also withholds the release where assertions do not run (XLA).
    """
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    physical = tf.shape(first, out_type=tf.int64)[0]
    rows = _sum_over_replicas(_rows(x, sample_weight))
    settings = state.step_settings(model)
    # Poisson samples keras_safe drew, or the caller's batches it declares Poisson samples.
    drawn = settings.poisson if settings is not None else dp.sampling == "poisson"
    if schedule.poisson and drawn:
        limit = default_max_batch_size(schedule.batch_size, schedule.num_examples)
        how = (
            f"a Poisson sample at rate {schedule.sampling_rate:.4g} holds more than {limit} "
            "examples with probability below 1e-9"
        )
    else:
        limit = schedule.batch_size
        how = f"the accountant charges batches of batch_size={limit}"
    if schedule.user_level:
        unit = f"users; num_examples={schedule.num_examples} users"
        return _user_checks(
            x, users, sample_weight, int(schedule.examples_per_user), limit, f"{how} {unit}"
        )
    conditions = [tf.cast(rows, tf.int64) <= limit]
    checks = [
        tf.debugging.assert_less_equal(
            tf.cast(rows, tf.int64),
            tf.constant(limit, tf.int64),
            message=f"{STEP_REFUSED}its batch holds more examples than the accounting allows "
            f"({how}; num_examples={schedule.num_examples}), so epsilon would be understated. "
            "Nothing was applied or charged. Fix: train on batches of the declared size "
            "(declare the batch size your data really has on the DP optimizer), or use "
            "keras_safe.privacy.poisson_batches. Examples in this batch:",
        )
    ]
    groups = dp.num_microbatches
    if groups and schedule.sensitivity_factor == 1.0:
        conditions.append(physical <= groups)
        checks.append(
            tf.debugging.assert_less_equal(
                physical,
                tf.constant(groups, tf.int64),
                message=f"{STEP_REFUSED}num_microbatches={groups} is accounted at "
                "sensitivity C (one example per microbatch), but this batch puts several "
                "examples in a microbatch, whose sensitivity is 2C. Nothing was applied or "
                "charged. Fix: declare batch_size on the DP optimizer (then microbatches of "
                "several examples are accounted at 2C), or feed batches of num_microbatches "
                "examples. Rows in this batch:",
            )
        )
    return checks, tf.reduce_all(tf.stack(conditions))


def _sum_over_replicas(count):
    context = tf.distribute.get_replica_context()
    count = tf.cast(count, tf.int64)
    if context is None or context.num_replicas_in_sync == 1:
        return count
    return context.all_reduce(tf.distribute.ReduceOp.SUM, count)


def _check_microbatches(x, groups, name=None):
    if not groups:
        return
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    rows = first.shape[0]
    if rows is not None and rows % groups:
        if name is not None:
            raise PrivacyError(
                f"A batch of {rows} rows is not made of whole user slots of {name}={groups} "
                "rows. Fix: lay the batch out as keras_safe.privacy.poisson_batches(..., "
                "users=ids) does (each sampled user's examples in one slot of that many rows, "
                "padding rows of weight 0)."
            )
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
