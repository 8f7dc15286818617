"""Walking the ops of a traced step: values, shapes, branches and loops, writes.

`Analysis` propagates the values of `values` through ops in creation order (a topological
order within a graph) with the rules of `rules` and `layout`. Branches (`If`, `Case`) and loops
(`While`) are analysed in their own function graphs (loops to a fixed point); a nested
`tf.function` call is analysed in its graph. Alongside, it records the ops that write a
variable (or leave the graph: Python calls, files, summaries) with a value computed from the
data, and the data-dependent ops with a custom gradient.

It reads three attributes TensorFlow sets on the ops it traces: `_true_graph` /
`_false_graph` / `_branch_graph_<i>` on `If` and `Case` ops and `_cond_graph` / `_body_graph`
on `While` ops (TensorFlow's control flow v2 keeps them for its own gradients), and a nested
function's graph from the graph's function library. Where one is missing the op is treated as
mixing examples (fail closed).
"""

from keras_safe.privacy.independence import layout, rules
from keras_safe.privacy.independence.values import (
    ListRows,
    Mixed,
    Rows,
    Sym,
    dims,
    int_list,
    is_data,
    join,
    mixed,
    static_value,
)

__all__ = ["Analysis"]

_WRITE_PREFIXES = ("ResourceScatter", "ResourceApply", "ResourceSparseApply")
_WRITES = {
    "AssignVariableOp",
    "AssignAddVariableOp",
    "AssignSubVariableOp",
    "ResourceStridedSliceAssign",
}
# Ops through which data leaves the graph or reaches Python.
_SINKS = {
    "PyFunc",
    "PyFuncStateless",
    "EagerPyFunc",
    "WriteFile",
    "SaveV2",
    "Save",
    "SaveSlices",
    "WriteSummary",
    "WriteScalarSummary",
    "WriteHistogramSummary",
    "WriteImageSummary",
    "WriteAudioSummary",
    "WriteRawProtoSummary",
    "QueueEnqueueV2",
    "QueueEnqueueManyV2",
    "StackPushV2",
}
_SYMBOLIC = {
    "Shape",
    "Pack",
    "StridedSlice",
    "Slice",
    "ConcatV2",
    "BroadcastGradientArgs",
    "Cast",
    "Identity",
    "Mul",
    "Add",
    "AddV2",
    "Sub",
    "FloorDiv",
    "Maximum",
    "Minimum",
    "Prod",
    "GatherV2",
}
_MAX_LOOP_PASSES = 8

_PYTHON = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
# Function calls and control flow: their bodies are analysed (their effects there).
_FUNCTIONS = {
    "If",
    "StatelessIf",
    "Case",
    "StatelessCase",
    "While",
    "StatelessWhile",
    "PartitionedCall",
    "StatefulPartitionedCall",
}
# Stateful ops that only read state: a lookup in a table or a variable, with the data as keys.
_READS = {
    "ReadVariableOp",
    "ResourceGather",
    "ResourceGatherNd",
    "LookupTableFindV2",
    "LookupTableSizeV2",
    "VarIsInitializedOp",
    "VariableShape",
}
# Random draws of stateful samplers and of a `tf.random.Generator` (its state: a variable the
# data may not write): fresh random values, never the data, when no data enters them.
_GENERATOR_DRAWS = {
    "RngReadAndSkip",
    "RngSkip",
    "StatefulStandardNormalV2",
    "StatefulUniform",
    "StatefulUniformInt",
    "StatefulUniformFullInt",
    "StatefulTruncatedNormal",
    "StatefulRandomBinomial",
    "RandomGamma",
    "RandomPoisson",
    "RandomPoissonV2",
    "RandomShuffle",
    "ParameterizedTruncatedNormal",
}
# Ops whose outputs are shapes of their inputs.
_SHAPE_OF = {"Shape", "ShapeN", "Size"}
# Ops whose outputs hold no value of their inputs (only shapes, or fresh random draws).
_SHAPE_ONLY_OUTPUTS = {"ZerosLike", "OnesLike", "Rank"} | set(rules.RANDOM)
# For each op type, the inputs that are shapes, axes, sizes or indices of positions: a value
# there computed from the number of rows sets a layout, not the examples' values.
_SHAPE_INPUTS = {
    "Reshape": (1,),
    "Fill": (0,),
    "Tile": (1,),
    "BroadcastTo": (1,),
    "StridedSlice": (1, 2, 3),
    "Slice": (1, 2),
    "Pad": (1,),
    "PadV2": (1,),
    "MirrorPad": (1,),
    "ExpandDims": (1,),
    "Transpose": (1,),
    "Sum": (1,),
    "Mean": (1,),
    "Max": (1,),
    "Min": (1,),
    "Prod": (1,),
    "All": (1,),
    "Any": (1,),
    "ArgMax": (1,),
    "ArgMin": (1,),
    "Split": (0,),
    "SplitV": (1, 2),
    "OneHot": (1,),
    "Cumsum": (1,),
    "GatherV2": (2,),
    "TensorListFromTensor": (1,),
    "TensorListStack": (1,),
    "TensorListReserve": (0, 1),
    "TensorListGetItem": (1, 2),
    "TensorListSetItem": (1,),
    "EmptyTensorList": (0, 1),
    "Range": (0, 1, 2),
    "BroadcastGradientArgs": (0, 1),
    # The sizes a transposed convolution (or a convolution's gradient) is computed for.
    "Conv2DBackpropInput": (0,),
    "Conv2DBackpropInputV2": (0,),
    "Conv3DBackpropInputV2": (0,),
    "DepthwiseConv2dNativeBackpropInput": (0,),
    "Conv2DBackpropFilter": (1,),
    "Conv3DBackpropFilterV2": (1,),
    "DepthwiseConv2dNativeBackpropFilter": (1,),
}


def _batch_free(symbolic):
    """True for a symbolic shape value known without the number of rows (ints only)."""
    if symbolic is None:
        return False
    entries = symbolic if isinstance(symbolic, list) else [symbolic]
    return all(isinstance(e, int) and not isinstance(e, bool) for e in entries)


def _shape_inputs(op):
    if op.type == "ConcatV2":
        return (len(op.inputs) - 1,)
    if op.type in rules.RANDOM:
        return tuple(range(len(op.inputs)))
    return _SHAPE_INPUTS.get(op.type, ())


def _side_effect(op):
    """What an op does besides computing its outputs ('' for a pure op or a read)."""
    if op.type in _FUNCTIONS or op.type in _READS or op.type == "Assert":
        # An assertion changes no state: it stops the step (nothing released) or not.
        return ""
    if _is_write(op):
        return "a variable write"
    if op.type in _SINKS:
        return "the data leaves the graph"
    try:
        stateful = op.op_def.is_stateful
    except (AttributeError, ValueError):
        stateful = True
    return f"the stateful op {op.type}" if stateful else ""


def _is_write(op):
    return op.type in _WRITES or op.type.startswith(_WRITE_PREFIXES)


def _function_graph(op, name):
    """The graph of function `name` called by `op`, looked up in the enclosing graphs."""
    graph = op.graph
    while graph is not None:
        # keras-internal: tf-function-library
        function = getattr(graph, "_get_function", lambda _: None)(name)
        found = getattr(function, "graph", None) if function is not None else None
        if found is not None:
            return found
        graph = getattr(graph, "outer_graph", None)
    return None


class Analysis:
    """Values of the tensors of one graph (and the graphs it calls) for one batch layout.

    Args:
        batch_size: the static batch size, or None when it is known only at run time.
    """

    def __init__(self, batch_size=None, batch_size_private=False, _parent=None):
        self.batch_size = batch_size
        # Whether the number of rows is itself private (Poisson batches, not padded): values
        # computed from it (`sized`) must not enter the examples' arithmetic.
        self.batch_size_private = batch_size_private
        self.values = {}
        self.symbols = {}
        self.sized = set()
        # Inside a branch or loop that the data chose: every effect there depends on the data.
        self.tainted = False if _parent is None else _parent.tainted
        self.writes = [] if _parent is None else _parent.writes
        self.custom_gradients = [] if _parent is None else _parent.custom_gradients

    # -- reading ---------------------------------------------------------------------------------

    def value(self, tensor):
        return self.values.get(tensor.ref())

    def set(self, tensor, value):
        if value is not None:
            self.values[tensor.ref()] = value
        else:
            self.values.pop(tensor.ref(), None)

    def static(self, tensor):
        """The tensor's value from constants and shapes (ints, lists), or None."""
        return static_value(tensor, self.symbols)

    def entries(self, tensor):
        """A 1-D vector's entries as ints (None where unknown), or None when even its length is
        unknown: a `Pack` of scalars is read entry by entry."""
        found = int_list(self.static(tensor))
        if found is not None:
            return found
        if tensor.op.type == "Pack" and tensor.op.get_attr("axis") == 0:
            return [
                (lambda v: v[0] if v is not None and len(v) == 1 else None)(
                    int_list(self.static(t))
                )
                for t in tensor.op.inputs
            ]
        return None

    # -- walking ---------------------------------------------------------------------------------

    def run(self, ops):
        for op in ops:
            self.step(op)

    def step(self, op):
        ins = [self.values.get(t.ref()) for t in op.inputs]
        data = any(v is not None for v in ins)
        if op.type in _SYMBOLIC:
            self._symbolic(op, ins)
        if op.type in _PYTHON:
            # Python code run by the step can read or keep anything (the data included).
            self.writes.append((op, "runs Python code inside the train step"))
        effect = _side_effect(op)
        counted = self.batch_size_private and any(t.ref() in self.sized for t in op.inputs)
        if effect and (data or self.tainted or counted):
            reason = (
                "writes a variable"
                if effect == "a variable write"
                else "changes state or leaves the graph (" + effect + ")"
            )
            reason += " with a value computed from the data" if data else ""
            reason += " with the number of examples in the batch" if counted else ""
            reason += " under a branch or loop the data chose" if self.tainted else ""
            self.writes.append((op, reason))
        if effect and op.type not in RULES:
            if data:  # what a stateful op returns from the data is nobody's row alone
                for tensor in op.outputs:
                    self.set(tensor, mixed(op, f"is a stateful {op.type} op fed by the data"))
            elif op.type not in rules.RANDOM and op.type not in _GENERATOR_DRAWS:
                # Values a stateful op reads from state the rules do not follow (the next batch
                # from an iterator, a queue, a stack) may be data: fail closed. Handles are
                # followed where a rule reads them (variables, tables).
                for tensor in op.outputs:
                    if tensor.dtype.name != "resource":
                        self.set(tensor, mixed(op, f"reads state through a stateful {op.type} op"))
            return
        if op.type in _SHAPE_OF and any(
            isinstance(v, Mixed) and (dims(t) is None or None in dims(t))
            for t, v in zip(op.inputs, ins)
        ):
            # The length of a tensor computed across examples (tf.where, boolean_mask) counts
            # what the examples hold: it is a value of the data, not a layout.
            for tensor in op.outputs:
                self.set(tensor, mixed(op, "the shape of a tensor computed across examples"))
            return
        if op.type in rules.SHAPE_FREE:
            self._size(op, ins)
            self._rows_without_data(op, ins)
            return
        if not data and op.type not in _FUNCTIONS:
            self._size(op, ins)
            self._rows_without_data(op, ins)
            if self.tainted and "_gradient_op_type" in op.node_def.attr:
                self.custom_gradients.append(op)
            return
        if "_gradient_op_type" in op.node_def.attr:
            self.custom_gradients.append(op)
        rule = RULES.get(op.type)
        if rule is None:
            reason = f"is a {op.type} op, which keras_safe does not know to keep examples apart"
            outs = [mixed(op, reason)] * len(op.outputs)
        else:
            outs = rule(self, op, ins)
        sized = op.type not in _FUNCTIONS and self._sized_value_input(op)
        if sized:
            outs = [
                mixed(
                    op,
                    "computes with the number of examples in the batch, which Poisson "
                    "sampling makes private",
                )
            ] * len(op.outputs)
        for tensor, value in zip(op.outputs, outs):
            self.set(tensor, value)

    # -- the batch size as a value ------------------------------------------------------------

    def _size(self, op, ins):
        """Marks the outputs of `op` that carry the (private) number of rows as values."""
        if not self.batch_size_private:
            return
        if op.type in _SHAPE_OF:
            if any(
                isinstance(v, Rows) and (dims(t) is None or dims(t)[v.axis] is None)
                for t, v in zip(op.inputs, ins)
            ):
                for tensor in op.outputs:
                    self.sized.add(tensor.ref())
            return
        if op.type in _SHAPE_ONLY_OUTPUTS:
            return
        shape_inputs = _shape_inputs(op)
        if any(t.ref() in self.sized and i not in shape_inputs for i, t in enumerate(op.inputs)):
            for tensor in op.outputs:
                # Shape arithmetic that drops the batch's entry (a shape's [1:]) is a constant.
                if not _batch_free(self.static(tensor)):
                    self.sized.add(tensor.ref())

    def _rows_without_data(self, op, ins):
        """Under a private number of rows, a tensor as long as the batch holds one entry per
        example even without the data (`ones_like(x)`, a random mask of `x`'s shape,
        `tf.range(n)`, zeros of `[n, d]`): summed, counted or compared along that axis it would
        give the number of rows. Such a tensor gets a row layout (its input's, or rows along its
        first axis of unknown length), so the rules refuse what crosses it like the data."""
        if not self.batch_size_private or op.type in _SYMBOLIC:
            return  # shape arithmetic: followed as sizes (`_size`), not as rows
        for tensor in op.outputs:
            if tensor.dtype.name in ("resource", "variant", "string"):
                continue
            if self.values.get(tensor.ref()) is not None:
                continue
            shape = dims(tensor)
            same = [
                v
                for t, v in zip(op.inputs, ins)
                if isinstance(v, Rows) and dims(t) is not None and dims(t) == shape
            ]
            if same:
                self.set(tensor, same[0])
            elif shape is not None and None in shape:
                self.set(tensor, Rows(shape.index(None)))
            elif shape is None:
                self.set(tensor, mixed(op, "a tensor of unknown rank as long as the batch"))

    def _sized_value_input(self, op):
        if not self.batch_size_private:
            return False
        shape_inputs = _shape_inputs(op)
        return any(t.ref() in self.sized and i not in shape_inputs for i, t in enumerate(op.inputs))

    def _child(self, tainted=False):
        child = Analysis(self.batch_size, self.batch_size_private, _parent=self)
        child.tainted = self.tainted or tainted
        return child

    def call(self, graph, values, outer=(), tainted=False, sized=None):
        """Runs `graph` with its inputs set to `values` (with the symbolic shapes of the `outer`
        tensors they stand for, and `sized` flags: which inputs carry the batch size; by default
        the `outer` tensors' own); returns `(values, sized)` of its outputs."""
        child = self._child(tainted)
        if sized is None:
            sized = [t.ref() in self.sized for t in outer]
        for i, (tensor, value) in enumerate(zip(graph.inputs, values)):
            child.set(tensor, value)
            if i < len(outer):
                found = self.static(outer[i])
                if found is not None:
                    child.symbols[tensor.ref()] = found
            if i < len(sized) and sized[i]:
                child.sized.add(tensor.ref())
        child.run(graph.get_operations())
        return (
            [child.value(t) for t in graph.outputs],
            [t.ref() in child.sized for t in graph.outputs],
        )

    def mark_sized(self, tensors, flags):
        for tensor, flag in zip(tensors, flags):
            if flag:
                self.sized.add(tensor.ref())

    # -- symbolic shapes -------------------------------------------------------------------------

    def _symbolic(self, op, ins):
        """Shape arithmetic TensorFlow cannot fold because the batch size is unknown."""
        out = op.outputs[0]
        if op.type == "Shape":
            d = dims(op.inputs[0])
            if d is None:
                return
            v = ins[0]
            entries = list(d)
            if isinstance(v, Rows) and entries[v.axis] is None:
                entries[v.axis] = Sym(v.outer * v.inner)
            self.symbols[out.ref()] = entries
            return
        if any(is_data(v) for v in ins):
            return
        if op.type in ("Cast", "Identity"):
            found = self.symbols.get(op.inputs[0].ref())
            if found is not None:
                self.symbols[out.ref()] = found
        elif op.type == "Pack" and op.get_attr("axis") == 0:
            parts = [self._scalar(t) for t in op.inputs]
            if all(p is not None for p in parts):
                self.symbols[out.ref()] = parts
        elif op.type == "ConcatV2":
            parts = [self._vector(t) for t in op.inputs[:-1]]
            if all(p is not None for p in parts):
                self.symbols[out.ref()] = [e for p in parts for e in p]
        elif op.type == "StridedSlice":
            self._symbolic_slice(op)
        elif op.type == "Slice":
            vector = self._vector(op.inputs[0])
            begin, size = int_list(self.static(op.inputs[1])), int_list(self.static(op.inputs[2]))
            if vector is not None and begin is not None and size is not None and len(begin) == 1:
                end = None if size[0] < 0 else begin[0] + size[0]
                self.symbols[out.ref()] = vector[begin[0] : end]
        elif op.type in _ARITHMETIC:
            a, b = self._scalar(op.inputs[0]), self._scalar(op.inputs[1])
            found = _arithmetic(op.type, a, b)
            if found is not None:
                self.symbols[out.ref()] = found
        elif op.type == "Prod":
            vector, axes = self._vector(op.inputs[0]), int_list(self.static(op.inputs[1]))
            if vector is not None and axes == [0]:
                found = _symbolic_product(vector)
                if found is not None:
                    self.symbols[out.ref()] = [found] if op.get_attr("keep_dims") else found
        elif op.type == "GatherV2":
            vector = self._vector(op.inputs[0])
            indices = self.static(op.inputs[1])
            axis = int_list(self.static(op.inputs[2]))
            if vector is not None and axis == [0]:
                if isinstance(indices, int) and -len(vector) <= indices < len(vector):
                    self.symbols[out.ref()] = vector[indices]
                elif isinstance(indices, list) and all(
                    isinstance(i, int) and -len(vector) <= i < len(vector) for i in indices
                ):
                    self.symbols[out.ref()] = [vector[i] for i in indices]
        elif op.type == "BroadcastGradientArgs":
            found = _broadcast_reductions(self._vector(op.inputs[0]), self._vector(op.inputs[1]))
            if found is not None:
                for tensor, axes in zip(op.outputs, found):
                    self.symbols[tensor.ref()] = axes

    def _scalar(self, tensor):
        value = self.static(tensor)
        if isinstance(value, (int, Sym)) and not isinstance(value, bool):
            return value
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (int, Sym)):
            return value[0]
        return None

    def _vector(self, tensor):
        value = self.static(tensor)
        return value if isinstance(value, list) else None

    def _symbolic_slice(self, op):
        vector = self._vector(op.inputs[0])
        begin, end, strides = (int_list(self.static(t)) for t in op.inputs[1:4])
        if vector is None or begin is None or end is None or strides != [1]:
            return
        if any(op.get_attr(k) for k in ("ellipsis_mask", "new_axis_mask")):
            return
        b = 0 if op.get_attr("begin_mask") & 1 else begin[0]
        if op.get_attr("shrink_axis_mask") & 1:
            if -len(vector) <= b < len(vector):
                self.symbols[op.outputs[0].ref()] = vector[b]
            return
        e = None if op.get_attr("end_mask") & 1 else end[0]
        self.symbols[op.outputs[0].ref()] = vector[b:e]


_ARITHMETIC = {
    "Mul": lambda a, b: a * b,
    "Add": lambda a, b: a + b,
    "AddV2": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "FloorDiv": lambda a, b: a // b if b else None,
    "Maximum": max,
    "Minimum": min,
}


def _arithmetic(op_type, a, b):
    """Scalar shape arithmetic on ints, and `Sym` times an int."""
    if isinstance(a, int) and isinstance(b, int):
        return _ARITHMETIC[op_type](a, b)
    if op_type == "Mul":
        if isinstance(a, Sym) and isinstance(b, int):
            return Sym(a.factor * b)
        if isinstance(b, Sym) and isinstance(a, int):
            return Sym(b.factor * a)
    return None


def _symbolic_product(entries):
    """The product of ints and at most one `Sym`, or None."""
    factor, symbolic = 1, False
    for e in entries:
        if isinstance(e, Sym):
            if symbolic:
                return None
            symbolic, factor = True, factor * e.factor
        elif isinstance(e, int):
            factor *= e
        else:
            return None
    return Sym(factor) if symbolic else factor


def _broadcast_reductions(s0, s1):
    """The axes each operand's gradient is summed over (`BroadcastGradientArgs`), or None."""
    if s0 is None or s1 is None:
        return None
    r = max(len(s0), len(s1))
    a = [1] * (r - len(s0)) + list(s0)
    b = [1] * (r - len(s1)) + list(s1)
    r0, r1 = [], []
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None:
            return None
        if x == y:
            continue
        if x == 1:
            r0.append(i)
        elif y == 1:
            r1.append(i)
        else:
            return None
    lead0, lead1 = r - len(s0), r - len(s1)
    r0 = sorted(set(r0) | set(range(lead0)))
    r1 = sorted(set(r1) | set(range(lead1)))
    return r0, r1


# -- control flow -----------------------------------------------------------------------------


def _branches(ctx, op, ins, graphs):
    if any(g is None for g in graphs):
        return [mixed(op, "a branch keras_safe cannot read")] * len(op.outputs)
    # A branch chosen by the data, or by the (private) number of rows, tells it to its effects.
    chosen_by_data = is_data(ins[0]) or (ctx.batch_size_private and op.inputs[0].ref() in ctx.sized)
    outs, sized = None, [False] * len(op.outputs)
    for graph in graphs:
        found, found_sized = ctx.call(graph, ins[1:], op.inputs[1:], tainted=chosen_by_data)
        outs = found if outs is None else [join(a, b, op) for a, b in zip(outs, found)]
        sized = [a or b for a, b in zip(sized, found_sized)]
    ctx.mark_sized(op.outputs, sized)
    if chosen_by_data:
        return [mixed(op, "chooses a branch from the data or the number of rows")] * len(op.outputs)
    return outs


def if_rule(ctx, op, ins):
    # keras-internal: tf-control-flow-graphs
    graphs = [getattr(op, "_true_graph", None), getattr(op, "_false_graph", None)]
    return _branches(ctx, op, ins, graphs)


def case_rule(ctx, op, ins):
    count = len(op.get_attr("branches"))
    # keras-internal: tf-control-flow-graphs
    graphs = [getattr(op, f"_branch_graph_{i}", None) for i in range(count)]
    return _branches(ctx, op, ins, graphs)


def while_rule(ctx, op, ins):
    # keras-internal: tf-control-flow-graphs
    cond, body = getattr(op, "_cond_graph", None), getattr(op, "_body_graph", None)
    if cond is None or body is None:
        return [mixed(op, "a loop keras_safe cannot read")] * len(op.outputs)
    values, sized = list(ins), [t.ref() in ctx.sized for t in op.inputs]
    for _ in range(_MAX_LOOP_PASSES):
        (pred,), (pred_sized,) = ctx.call(cond, values, op.inputs, sized=sized)
        if is_data(pred) or (ctx.batch_size_private and pred_sized):
            # The data sets the trip count: every effect in the loop depends on it.
            ctx.call(body, values, op.inputs, tainted=True, sized=sized)
            return [
                mixed(op, "repeats a number of times computed from the data or the number of rows")
            ] * len(op.outputs)
        after, after_sized = ctx.call(body, values, op.inputs, sized=sized)
        joined = [join(a, b, op) for a, b in zip(values, after)]
        joined_sized = [a or b for a, b in zip(sized, after_sized)]
        if joined == values and joined_sized == sized:
            ctx.mark_sized(op.outputs, sized)
            return values
        values, sized = joined, joined_sized
    return [mixed(op, "a loop whose layout does not settle")] * len(op.outputs)


def call_rule(ctx, op, ins):
    graph = _function_graph(op, op.get_attr("f").name)
    if graph is None:
        return [mixed(op, "calls a function keras_safe cannot read")] * len(op.outputs)
    values, sized = ctx.call(graph, ins, op.inputs)
    ctx.mark_sized(op.outputs, sized)
    return values


def _broadcast_to(ctx, op, ins):
    if is_data(ins[1]):
        return [mixed(op, "a shape computed from the data")]
    return rules.elementwise(ctx, op, [ins[0], None])


def _fill(ctx, op, ins):
    return [mixed(op, "fills a tensor with a value computed from the data")]


def _check_list(ctx, op, ins):
    v = ins[0]
    return [v if isinstance(v, (ListRows, Mixed)) or v is None else mixed(op, "a list")]


RULES = {}
RULES.update({t: rules.unary for t in rules.UNARY})
RULES.update({t: rules.elementwise for t in rules.ELEMENTWISE})
RULES.update({t: rules.reduction for t in rules.REDUCTIONS})
RULES.update({t: rules.leading_axis for t in rules.LEADING_AXIS})
RULES.update(
    {
        "Select": rules.select,
        "ArgMax": rules.arg_reduction,
        "ArgMin": rules.arg_reduction,
        "Softmax": lambda c, o, i: rules.along_axis(c, o, i, last=True),
        "RGBToHSV": lambda c, o, i: rules.along_axis(c, o, i, last=True),
        "HSVToRGB": lambda c, o, i: rules.along_axis(c, o, i, last=True),
        "DenseBincount": rules.bincount,
        "LogSoftmax": lambda c, o, i: rules.along_axis(c, o, i, last=True),
        "TopKV2": lambda c, o, i: rules.along_axis(c, o, i, last=True),
        "Cumsum": lambda c, o, i: rules.along_axis(c, o, i, axis_index=1),
        "Cumprod": lambda c, o, i: rules.along_axis(c, o, i, axis_index=1),
        "CumulativeLogsumexp": lambda c, o, i: rules.along_axis(c, o, i, axis_index=1),
        "MatrixBandPart": rules.last_two,
        "MatrixDiagPartV3": rules.last_two,
        "MatrixSetDiagV3": rules.last_two,
        "MatMul": rules.matmul,
        "BatchMatMul": rules.batch_matmul,
        "BatchMatMulV2": rules.batch_matmul,
        "BatchMatMulV3": rules.batch_matmul,
        "Einsum": rules.einsum,
        "SparseSoftmaxCrossEntropyWithLogits": rules.per_row,
        "SoftmaxCrossEntropyWithLogits": rules.per_row,
        "InTopKV2": rules.per_row,
        "Multinomial": rules.per_row,
        "StatelessMultinomial": rules.per_row,
        "FusedBatchNorm": rules.fused_batch_norm,
        "FusedBatchNormV2": rules.fused_batch_norm,
        "FusedBatchNormV3": rules.fused_batch_norm,
        "IdentityN": rules.identity_n,
        # A table lookup maps each key to its value (string and integer lookups, hashing).
        "LookupTableFindV2": lambda c, o, i: rules.unary(c, o, [i[1], None, i[2]]),
        "StringToHashBucketFast": rules.unary,
        "StringToHashBucketStrong": rules.unary,
        "Where": rules.always_mixed("lists the positions of entries across the batch"),
        "Fill": _fill,
        "BroadcastTo": _broadcast_to,
        "Reshape": layout.reshape,
        "Transpose": layout.transpose,
        "ConjugateTranspose": layout.transpose,
        "ExpandDims": layout.expand_dims,
        "Squeeze": layout.squeeze,
        "GatherV2": layout.gather,
        "ResourceGather": layout.gather,
        "StridedSlice": layout.strided_slice,
        "Slice": layout.slice_,
        "ConcatV2": layout.concat,
        "Pack": layout.pack,
        "Unpack": layout.unpack,
        "Split": layout.split,
        "SplitV": layout.split,
        "Tile": layout.tile,
        "Pad": layout.pad,
        "PadV2": layout.pad,
        "MirrorPad": layout.pad,
        "ReverseV2": layout.reverse,
        "Roll": layout.roll,
        "OneHot": layout.one_hot,
        "SpaceToBatchND": layout.space_to_batch,
        "BatchToSpaceND": layout.space_to_batch,
        "TensorListFromTensor": layout.list_from_tensor,
        "TensorListGetItem": layout.list_get,
        "TensorListSetItem": layout.list_set,
        "TensorListPushBack": layout.list_set,
        "TensorListStack": layout.list_stack,
        "TensorListPopBack": lambda c, o, i: [i[0], layout.list_get(c, o, i)[0]],
        "TensorListReserve": _check_list,
        "If": if_rule,
        "StatelessIf": if_rule,
        "Case": case_rule,
        "StatelessCase": case_rule,
        "While": while_rule,
        "StatelessWhile": while_rule,
        "PartitionedCall": call_rule,
        "StatefulPartitionedCall": call_rule,
    }
)
