"""Proving, from the traced step, that the examples of a batch do not interact.

DP-SGD bounds what one example changes by clipping that example's gradient, which is only
meaningful if example i's loss depends on example i alone (and the weights): in training mode,
at the training batch size, at every step. A check that runs the model once on a few examples
cannot show that (a layer may mix only in training, only at larger batches, or only after some
steps); the graph TensorFlow traced for the step can, since it holds every path of every step
it will run.

`check_step` reads the ops of a step's forward pass (data stages, model, per-example loss) and
propagates, op by op, what each tensor depends on (`values`: nothing of the data, the data row
by row, or the data across rows) with one transfer rule per op family (`rules`, `layout`),
through branches and loops (`analysis`). The step is refused when

- the per-example losses are not row-wise in the inputs, targets and sample weights (a layer or
  loss reduces, permutes, gathers or normalises across the batch axis, in any branch that the
  step could take: the branch a counter or the batch size selects later is analysed too);
- the step, anywhere before its release (forward and backward passes, a loop over chunks),
  writes a variable with a value computed from the data (running statistics: they would be
  saved and released without clipping or noise; a custom gradient keeping what it receives),
  or hands the data to Python;
- a data-dependent op has a custom gradient (keras_safe cannot read what its backward mixes).

An op type the rules do not know that receives data counts as mixing (fail closed): the error
names it, and the model can train once the op is replaced or a rule is added here. So do the
values a stateful op reads from state the rules do not follow (an iterator's next batch; random
draws excepted), and the tensors the step's graph reads from an enclosing graph (under `fit`,
the graph that pulls the batch) other than variables. The cost is
paid when the step is traced, never per step.
"""

import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.privacy.independence.analysis import RULES, Analysis
from keras_safe.privacy.independence.values import Mixed, Rows

__all__ = ["RULES", "check_chunked_step", "check_step", "layer_of"]

_MAX_LISTED = 5


def layer_of(op_name):
    """The layer path in an op name: `"sequential/dense/MatMul"` gives `"sequential/dense"`."""
    parts = op_name.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else op_name


def _leaves(structure):
    return [t for t in tf.nest.flatten(structure) if t is not None and hasattr(t, "graph")]


@tf.autograph.experimental.do_not_convert
def check_step(inputs, losses, ops, model_name="the model", batch_size_private=False, before=(),
               step_ops=None):  # fmt: skip
    """Raises `PrivacyError` unless the step's per-example losses are provably row-wise.

    Args:
        inputs: the step's data as it enters the step (`x`, `y`, `sample_weight`, nested
            structures allowed): graph tensors whose first axis is the examples.
        losses: the per-example losses `[B]` of the step.
        ops: the graph ops of the step's forward pass, in creation order (everything from the
            data to the losses; ops outside the list count as constants).
        model_name: the model's name, for the message.
        batch_size_private: whether the number of rows is private (Poisson batches that are not
            padded to a fixed size): then it may set layouts but not enter the examples' values.
        before: the ops of the same graph before the step's (a custom loop's earlier steps).
            What they made from the graph's inputs counts as mixing where the step reads it
            other than through `inputs`: a layer may keep a tensor from one call to the next.
        step_ops: the ops of the whole step up to its release (forward and backward passes,
            norms, clipped sums): a variable written there with a value computed from the data
            (a custom gradient's backward, a layer writing into the step's graph from a nested
            one) is refused as in the forward pass. None: the forward pass only.

    Tensors the step's graph reads from an enclosing graph (other than its variables) count as
    mixing: under `fit`, the graph that pulls the batch encloses the step's.

    Raises:
        keras_safe._validation.PrivacyError: naming each op that mixes examples, writes a
            variable from the data or has a custom gradient, and its layer.
    """
    leaves = _leaves(inputs)
    if not leaves:
        return
    earlier = _earlier(before)
    analysis = _analysed(leaves, ops, batch_size_private, earlier)
    problems = _unread([losses], ops, leaves) or _problems(analysis, [losses])
    if not problems and step_ops is not None:
        problems = _writes(_analysed(leaves, step_ops, batch_size_private, earlier))
    _refuse(problems, model_name)


def _analysed(leaves, ops, batch_size_private, earlier):
    """The analysis of `ops` with `leaves` as the step's rows (and what the graph's inputs
    made before the step, `earlier`, as mixing)."""
    analysis = _analysis(leaves, batch_size_private)
    _mark_outside_data(analysis, ops, leaves, earlier)
    analysis.run(ops)
    return analysis


def _writes(analysis):
    return [
        f"the op {op.name!r} ({op.type}, in {layer_of(op.name)!r}) {reason}"
        for op, reason in analysis.writes[:_MAX_LISTED]
    ]


def _enclosing(graph):
    """`(outer, inner)` pairs of what `graph` reads from an enclosing graph (captured graph
    tensors, not eager constants), other than variables."""
    return [
        (outer, inner)
        for outer, inner in zip(
            getattr(graph, "external_captures", []), getattr(graph, "internal_captures", [])
        )
        if inner.dtype != tf.resource and tf.is_symbolic_tensor(outer)
    ]


def _mark_enclosing(analysis, graph, own):
    """Sets as mixing what `graph` reads from an enclosing graph, other than `own` (the data):
    the batch as the enclosing graph pulled it, or any tensor made from it there."""
    own = {t.ref() for t in own}
    reason = "is read from an enclosing graph (where the batch is pulled)"
    for _, inner in _enclosing(graph):
        if inner.ref() not in own:
            analysis.set(inner, Mixed(inner.op.name, inner.op.type, reason))


def _mark_outside_data(analysis, ops, own, earlier):
    """Sets as mixing the tensors `ops` read that the graph's own inputs made before the step
    (`earlier`, the analysis of the earlier ops: `_earlier`), other than `own` (the data)."""
    if earlier is None:
        return
    own = {t.ref() for t in own}
    inside = {op.name for op in ops}
    reason = "was made from data before the step (a tensor a layer kept from an earlier call)"
    for op in ops:
        for tensor in op.inputs:
            if tensor.op.name in inside or tensor.ref() in own:
                continue
            if earlier.value(tensor) is not None:
                analysis.set(tensor, Mixed(tensor.op.name, tensor.op.type, reason))


def _earlier(before):
    """What the graph's own inputs made in `before` (as mixing), or None without ops."""
    if not before:
        return None
    earlier = Analysis(None)
    captured = {t.ref() for t in getattr(before[0].graph, "internal_captures", [])}
    for op in before:
        if op.type != "Placeholder" or op.outputs[0].ref() in captured:
            continue
        if op.outputs[0].dtype not in (tf.resource, tf.variant):
            earlier.set(op.outputs[0], Mixed(op.name, op.type, "is an input of the graph"))
    earlier.run(before)
    return earlier


def _mark_loop_inputs(analysis, graph, data_made):
    """In the body of a loop over chunks, sets as mixing every input that may hold data: the
    values the loop carries from one chunk to the next, and what the body reads from the
    step's graph that `data_made` (of a tensor there) says the data made (the whole batch)."""
    captured = {
        inner.ref(): outer for outer, inner in zip(graph.external_captures, graph.internal_captures)
    }
    for tensor in graph.inputs:
        if tensor.dtype == tf.resource:
            continue  # (a variable: what the body reads of it, the rules follow)
        outer = captured.get(tensor.ref())
        if outer is None:
            reason = "is carried by the loop over chunks from one chunk to the next"
        elif data_made(outer):
            reason = "was made from the data outside this chunk's forward pass"
        else:
            continue
        analysis.set(tensor, Mixed(tensor.op.name, tensor.op.type, reason))


@tf.autograph.experimental.do_not_convert
def check_chunked_step(inputs, staged, staged_ops, step_ops, chunks, model_name="the model",
                       batch_size_private=False, before=()):  # fmt: skip
    """`check_step` for a batch clipped in chunks of rows (`physical_batch_size`).

    The chunks are rows sliced from the staged batch, which a row-wise proof of the whole step
    cannot follow (it refuses a slice of part of the batch axis). So the proof runs in parts:
    the data stages, from the batch to the staged data that is cut into chunks, must keep the
    rows apart; then each chunk's forward pass, from its own rows to its per-example losses.
    In a chunk's pass, every tensor made from the data outside that pass (the whole batch,
    the staged data, another chunk's tensors, which a layer could keep from one call to the
    next) counts as mixing: a chunk reads its own rows only.

    Args:
        inputs: the step's data as it enters the step, as for `check_step`.
        staged: the data after the stages, which the chunks are sliced from.
        staged_ops: the ops from the step's start to the first chunk's slices.
        step_ops: the ops from the step's start up to its release (every chunk's forward and
            backward passes, the loop over chunks): what they write from the data is refused.
        chunks: `(rows, losses, ops)` per chunk: the chunk's sliced data, its per-example
            losses and the ops of its forward pass (after the slices).
        model_name, batch_size_private, before: as for `check_step`.

    Raises:
        keras_safe._validation.PrivacyError: as `check_step`, naming the first part that fails.
    """
    leaves = _leaves(inputs)
    if not leaves:
        return
    earlier = _earlier(before)
    analysis = _analysed(leaves, staged_ops, batch_size_private, earlier)
    problems = _problems(analysis, _leaves(staged), what="the data the chunks are cut from")
    # What every tensor of the step depends on (a chunk's slices count as mixing here), and
    # what the step writes from the data anywhere up to its release.
    overall = _analysed(leaves, step_ops, batch_size_private, earlier)
    problems = problems or _writes(overall)
    made = [t for op in step_ops for t in op.outputs if overall.value(t) is not None]
    enclosing = [inner for _, inner in _enclosing(leaves[0].graph)]
    data = {t.ref() for t in leaves + made + enclosing}

    def data_made(tensor):
        return tensor.ref() in data or (earlier is not None and earlier.value(tensor) is not None)

    for rows, losses, ops in chunks:
        if problems:
            break
        own = _leaves(rows)
        in_loop = own[0].graph is not leaves[0].graph
        analysis = _analysis(own, batch_size_private, enclosing=not in_loop)
        inside = {op.name for op in ops} | {t.op.name for t in own}
        for tensor in leaves + made:
            if tensor.op.name not in inside:
                reason = "was made from the data outside this chunk's forward pass"
                analysis.set(tensor, Mixed(tensor.op.name, tensor.op.type, reason))
        graph = own[0].graph
        if in_loop:
            # A chunk traced in the body of the loop over chunks: its inputs stand for tensors
            # of the step's graph and for what earlier chunks carried.
            _mark_loop_inputs(analysis, graph, data_made)
        _mark_outside_data(analysis, ops, own, earlier)
        analysis.run(ops)
        problems = _unread([losses], ops, _leaves(rows)) or _problems(analysis, [losses])
    _refuse(problems, model_name)


def _unread(outputs, ops, leaves):
    """Outputs that neither an op of `ops` nor the data made: the proof would take them for
    constants, so it cannot speak for them (fail closed)."""
    made = {op.name for op in ops} | {t.op.name for t in leaves}
    return [
        f"the per-example losses come from the op {t.op.name!r}, outside the forward pass the "
        "proof reads"
        for t in outputs
        if t.op.name not in made
    ][:1]


def _analysis(leaves, batch_size_private, enclosing=True):
    """An analysis with `leaves` as rows, and (`enclosing`) what their graph reads from an
    enclosing graph as mixing (a loop's body reads the step's graph: `_mark_loop_inputs`)."""
    batch = leaves[0].shape[0] if leaves[0].shape.rank else None
    analysis = Analysis(batch, batch_size_private=batch_size_private)
    if enclosing:
        _mark_enclosing(analysis, leaves[0].graph, leaves)
    for tensor in leaves:
        if tensor.shape.rank:
            analysis.set(tensor, Rows(0))
    return analysis


def _problems(analysis, outputs, what="the per-example losses"):
    """What the analysis found against `outputs` being row-wise, as sentences."""
    problems = []
    for output in outputs:
        value = analysis.value(output)
        if isinstance(value, Mixed):
            problems.append(
                f"the op {value.op!r} ({value.type}, in {layer_of(value.op)!r}) {value.reason}, "
                f"and {what} depend on it"
            )
            break
        if value is not None and output.shape.rank != 0 and value != Rows(0):
            problems.append(
                f"{what} have the examples laid out as {value}, not one row per example"
            )
            break
    for op, reason in analysis.writes[:_MAX_LISTED]:
        problems.append(f"the op {op.name!r} ({op.type}, in {layer_of(op.name)!r}) {reason}")
    for op in analysis.custom_gradients[:_MAX_LISTED]:
        problems.append(
            f"the op {op.name!r} (in {layer_of(op.name)!r}) has a custom gradient, whose "
            "backward pass keras_safe cannot check"
        )
    return problems


def _refuse(problems, model_name):
    if problems:
        raise PrivacyError(
            f"keras_safe cannot show that the examples of a batch stay apart in the train step "
            f"of {model_name}: " + "; ".join(problems) + ". DP-SGD clips each example's "
            "gradient, which bounds nothing when one example's loss or the model's state also "
            "depends on other examples (in training mode, at any batch size, at any step). "
            "Fix: remove or replace what mixes examples (batch statistics, MixUp/CutMix, "
            "losses normalised by the batch, hard-example mining, running statistics updated "
            "in the forward pass, tf.py_function on the data), freeze such layers, or compute "
            "their statistics with DP before training (keras_safe.preprocessing, dp_epsilon=)."
        )
