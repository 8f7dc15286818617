"""Transfer rules of the ops that move entries around: reshapes, transposes, slices, gathers,
concatenations, splits, tiling, padding and `TensorList`s (the values are in `values`)."""

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
    normalize_axes,
    product,
    rank,
)

__all__ = ["reshaped_rows"]


def _outputs(op, value):
    return [value] * len(op.outputs)


def _axes(ctx, op, index):
    return int_list(ctx.static(op.inputs[index]))


def _params_are_data(op, ins, skip=0):
    return any(is_data(v) for i, v in enumerate(ins) if i != skip)


def reshape(ctx, op, ins):
    v = ins[0]
    if is_data(ins[1]):
        return _outputs(op, mixed(op, "a shape computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    in_dims, out_dims = dims(op.inputs[0]), dims(op.outputs[0])
    target = _target_shape(ctx.static(op.inputs[1]), in_dims, v)
    if target is not None and out_dims is not None and len(target) == len(out_dims):
        # The shape the graph computes (symbolic where the batch size enters) fills in what
        # static shape inference left unknown.
        out_dims = [d if d is not None else t for d, t in zip(out_dims, target)]
    found = reshaped_rows(in_dims, v, out_dims, ctx.batch_size)
    if found is None:
        return _outputs(op, mixed(op, "regroups entries across the batch axis"))
    return _outputs(op, found)


def _target_shape(target, in_dims, v):
    """A reshape's target as ints and `Sym`s, its -1 resolved where the sizes allow it."""
    if not isinstance(target, list) or in_dims is None:
        return None
    if not all(isinstance(t, (int, Sym)) for t in target):
        return None
    if -1 not in target:
        return target
    others = [d for i, d in enumerate(in_dims) if i != v.axis]
    known = [t for t in target if t != -1]
    if any(d is None for d in others) or not all(isinstance(t, int) for t in known):
        return None
    total, rest = product(others) * v.outer * v.inner, product(known)
    if rest <= 0 or total % rest:
        return None
    return [Sym(total // rest) if t == -1 else t for t in target]


def reshaped_rows(in_dims, v, out_dims, batch):
    """Where the rows of `v` lie after a row-major reshape, or None if they mix.

    `out_dims` holds ints, None (unknown) and `Sym(f)` (f times the batch size).
    """
    if in_dims is None or out_dims is None:
        return None
    before, after = in_dims[: v.axis], in_dims[v.axis + 1 :]
    if any(d is None for d in before + after):
        return None
    pre, post = product(before) * v.outer, v.inner * product(after)
    for axis in range(len(out_dims)):
        left, right = out_dims[:axis], out_dims[axis + 1 :]
        if any(not isinstance(d, int) for d in left + right):
            continue
        pl, pr = product(left), product(right)
        if pl == 0 or pr == 0 or pre % pl or post % pr:
            continue
        outer, inner = pre // pl, post // pr
        size = out_dims[axis]
        if isinstance(size, Sym):
            if size.factor != outer * inner:
                continue
        elif batch is None:
            if size is not None:
                continue
        elif size is not None and size != outer * batch * inner:
            continue
        return Rows(axis, outer, inner)
    return None


def transpose(ctx, op, ins):
    v = ins[0]
    if is_data(ins[1]):
        return _outputs(op, mixed(op, "a permutation computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    perm = _axes(ctx, op, 1)
    if perm is None:
        return _outputs(op, mixed(op, "a permutation keras_safe cannot read"))
    return _outputs(op, v.at(perm.index(v.axis)))


def expand_dims(ctx, op, ins):
    v = ins[0]
    if not isinstance(v, Rows):
        return _outputs(op, v if not is_data(ins[1]) else mixed(op, "data-dependent axis"))
    axes = _axes(ctx, op, 1)
    out_rank = rank(op.outputs[0])
    if axes is None or out_rank is None:
        return _outputs(op, mixed(op, "an axis keras_safe cannot read"))
    axis = axes[0] + out_rank if axes[0] < 0 else axes[0]
    return _outputs(op, v.at(v.axis + 1 if axis <= v.axis else v.axis))


def squeeze(ctx, op, ins):
    v = ins[0]
    if not isinstance(v, Rows):
        return _outputs(op, v)
    in_dims = dims(op.inputs[0])
    if in_dims is None:
        return _outputs(op, mixed(op, "a shape of unknown rank"))
    axes = list(op.get_attr("squeeze_dims"))
    axes = (
        normalize_axes(axes, len(in_dims))
        if axes
        else [i for i, d in enumerate(in_dims) if d == 1 and i != v.axis]
    )
    if v.axis in axes:
        return _outputs(op, mixed(op, "removes the batch axis"))
    return _outputs(op, v.at(v.axis - sum(a < v.axis for a in axes)))


def gather(ctx, op, ins):
    params, indices = ins[0], ins[1]
    if isinstance(params, Mixed) or isinstance(indices, Mixed):
        return _outputs(op, params if isinstance(params, Mixed) else indices)
    if op.type == "ResourceGather":
        axis, batch_dims = 0, op.get_attr("batch_dims")
        params = None  # a variable
    else:
        axes = _axes(ctx, op, 2)
        if axes is None or is_data(ins[2]):
            return _outputs(op, mixed(op, "a gather axis keras_safe cannot read"))
        axis, batch_dims = axes[0], op.get_attr("batch_dims")
        pr = rank(op.inputs[0])
        if pr is None:
            return _outputs(op, mixed(op, "a shape of unknown rank"))
        axis = axis + pr if axis < 0 else axis
    ir = rank(op.inputs[1])
    if ir is None:
        return _outputs(op, mixed(op, "a shape of unknown rank"))
    batch_dims = batch_dims + ir if batch_dims < 0 else batch_dims
    result = None
    if isinstance(params, Rows):
        if params.axis < batch_dims:
            result = params
        elif params.axis == axis:
            return _outputs(op, mixed(op, "gathers along the batch axis"))
        elif params.axis < axis:
            result = params
        else:
            result = params.at(params.axis - 1 + ir - batch_dims)
    if isinstance(indices, Rows):
        if indices.axis < batch_dims:
            where = indices
        else:
            where = indices.at(axis + indices.axis - batch_dims)
        if result is not None and result != where:
            return _outputs(op, mixed(op, "gathers rows of one example with another's indices"))
        result = where
    return _outputs(op, result)


def strided_slice(ctx, op, ins):
    v = ins[0]
    if any(is_data(w) for w in ins[1:4]):
        return _outputs(op, mixed(op, "slices with bounds computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    in_dims = dims(op.inputs[0])
    if in_dims is None:
        return _outputs(op, mixed(op, "a shape of unknown rank"))
    begin, end, strides = (ctx.entries(op.inputs[i]) for i in (1, 2, 3))
    attrs = {
        k: op.get_attr(k)
        for k in ("begin_mask", "end_mask", "ellipsis_mask", "new_axis_mask", "shrink_axis_mask")
    }
    found = _slice_axis(v.axis, len(in_dims), in_dims[v.axis], begin, end, strides, attrs)
    if found is None:
        return _outputs(op, mixed(op, "takes part of the batch axis"))
    return _outputs(op, v.at(found))


def _slice_axis(axis, r, size, begin, end, strides, attrs):
    """The output axis of input `axis` under a strided slice that keeps it whole, else None.

    Walks the slice spec left to right, assigning input dimensions to its entries (an
    ellipsis covers the dimensions no later entry names; a new axis covers none).
    """
    if strides is None:
        return None
    n = len(strides)

    def bit(name, i):
        return bool(attrs[name] >> i & 1)

    out_axis, in_axis = 0, 0
    for i in range(n):
        if bit("ellipsis_mask", i):
            named = sum(
                1
                for j in range(i + 1, n)
                if not bit("new_axis_mask", j) and not bit("ellipsis_mask", j)
            )
            span = r - in_axis - named
            if in_axis <= axis < in_axis + span:
                return out_axis + (axis - in_axis)
            in_axis += span
            out_axis += span
            continue
        if bit("new_axis_mask", i):
            out_axis += 1
            continue
        if in_axis == axis:
            if bit("shrink_axis_mask", i) or strides[i] != 1:
                return None
            b = None if begin is None else begin[i]
            e = None if end is None else end[i]
            whole_begin = bit("begin_mask", i) or b == 0
            whole_end = bit("end_mask", i) or (
                e is not None and (e >= 2**30 or (size is not None and e >= size))
            )
            return out_axis if whole_begin and whole_end else None
        in_axis += 1
        if not bit("shrink_axis_mask", i):
            out_axis += 1
    return out_axis + (axis - in_axis)  # dimensions after the spec are kept whole


def slice_(ctx, op, ins):
    """`tf.slice(x, begin, size)`: the batch axis must start at 0 and be taken whole."""
    v = ins[0]
    if _params_are_data(op, ins):
        return _outputs(op, mixed(op, "slices with bounds computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    begin, size = ctx.entries(op.inputs[1]), ctx.entries(op.inputs[2])
    in_dims = dims(op.inputs[0])
    if begin is None or size is None or in_dims is None:
        return _outputs(op, mixed(op, "slices with bounds keras_safe cannot read"))
    whole = begin[v.axis] == 0 and (size[v.axis] == -1 or size[v.axis] == in_dims[v.axis])
    return _outputs(op, v if whole else mixed(op, "takes part of the batch axis"))


def concat(ctx, op, ins):
    values, tensors = ins[:-1], op.inputs[:-1]
    if is_data(ins[-1]):
        return _outputs(op, mixed(op, "an axis computed from the data"))
    data = [v for v in values if is_data(v)]
    if not data:
        return _outputs(op, None)
    for v in data:
        if not isinstance(v, Rows):
            return _outputs(op, v if isinstance(v, Mixed) else mixed(op, "a list"))
    r = rank(op.outputs[0])
    axes = _axes(ctx, op, len(op.inputs) - 1)
    if axes is None or r is None:
        return _outputs(op, mixed(op, "an axis keras_safe cannot read"))
    (axis,) = normalize_axes(axes, r)
    first = data[0]
    if axis != first.axis:
        if any(v != first for v in data):
            return _outputs(op, mixed(op, "combines rows of different examples"))
        return _outputs(op, first)
    # Along the batch axis: blocks of whole batches, one after the other.
    outer = 0
    for tensor, v in zip(tensors, values):
        if isinstance(v, Rows):
            if v.axis != axis or v.inner != first.inner:
                return _outputs(op, mixed(op, "concatenates rows of different layouts"))
            outer += v.outer
            continue
        size = (dims(tensor) or [None] * (axis + 1))[axis]
        block = None if ctx.batch_size is None else ctx.batch_size * first.inner
        if size is None or block is None or size % block:
            return _outputs(op, mixed(op, "puts other rows among the examples"))
        outer += size // block
    return _outputs(op, Rows(axis, outer, first.inner))


def pack(ctx, op, ins):
    data = [v for v in ins if is_data(v)]
    if not data:
        return _outputs(op, None)
    first = data[0]
    if not isinstance(first, Rows) or any(v != first for v in data):
        return _outputs(op, first if isinstance(first, Mixed) else mixed(op, "mixed rows"))
    r = rank(op.outputs[0])
    axis = op.get_attr("axis")
    axis = axis + r if axis < 0 else axis
    return _outputs(op, first.at(first.axis + 1 if axis <= first.axis else first.axis))


def unpack(ctx, op, ins):
    v = ins[0]
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[0])
    axis = op.get_attr("axis")
    axis = axis + r if axis < 0 else axis
    if axis == v.axis:
        return _outputs(op, mixed(op, "splits the batch into single examples"))
    return _outputs(op, v.at(v.axis - 1 if axis < v.axis else v.axis))


def split(ctx, op, ins):
    axis_index, value_index = (0, 1) if op.type == "Split" else (2, 0)
    v = ins[value_index]
    if any(is_data(w) for i, w in enumerate(ins) if i != value_index):
        return _outputs(op, mixed(op, "sizes or axis computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[value_index])
    axes = _axes(ctx, op, axis_index)
    if axes is None or r is None:
        return _outputs(op, mixed(op, "an axis keras_safe cannot read"))
    (axis,) = normalize_axes(axes, r)
    if axis != v.axis:
        return _outputs(op, v)
    count = len(op.outputs)
    if op.type == "SplitV":
        sizes = _axes(ctx, op, 1)
        block = None if ctx.batch_size is None else ctx.batch_size * v.inner
        if sizes is None or block is None or any(s <= 0 or s % block for s in sizes):
            return _outputs(op, mixed(op, "splits the batch axis unevenly"))
        return [Rows(axis, s // block, v.inner) for s in sizes]
    if v.outer % count:
        return _outputs(op, mixed(op, "splits the batch axis between examples"))
    return _outputs(op, Rows(axis, v.outer // count, v.inner))


def tile(ctx, op, ins):
    v = ins[0]
    if is_data(ins[1]):
        return _outputs(op, mixed(op, "multiples computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    multiples = ctx.entries(op.inputs[1])
    if multiples is None or multiples[v.axis] is None:
        return _outputs(op, mixed(op, "multiples keras_safe cannot read"))
    return _outputs(op, Rows(v.axis, v.outer * multiples[v.axis], v.inner))


def pad(ctx, op, ins):
    v = ins[0]
    if _params_are_data(op, ins):
        return _outputs(op, mixed(op, "padding computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    paddings = ctx.static(op.inputs[1])
    if not isinstance(paddings, list) or len(paddings) <= v.axis:
        return _outputs(op, mixed(op, "padding keras_safe cannot read"))
    if list(paddings[v.axis]) != [0, 0]:
        return _outputs(op, mixed(op, "pads the batch axis"))
    return _outputs(op, v)


def reverse(ctx, op, ins):
    v = ins[0]
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[0])
    axes = _axes(ctx, op, 1)
    if axes is None or r is None:
        return _outputs(op, mixed(op, "axes keras_safe cannot read"))
    if v.axis in normalize_axes(axes, r):
        return _outputs(op, mixed(op, "reorders the examples"))
    return _outputs(op, v)


def roll(ctx, op, ins):
    v = ins[0]
    if _params_are_data(op, ins):
        return _outputs(op, mixed(op, "a shift computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[0])
    shifts, axes = _axes(ctx, op, 1), _axes(ctx, op, 2)
    if shifts is None or axes is None or r is None:
        return _outputs(op, mixed(op, "shifts keras_safe cannot read"))
    moved = {a for a, s in zip(normalize_axes(axes, r), shifts) if s}
    return _outputs(op, mixed(op, "reorders the examples") if v.axis in moved else v)


def one_hot(ctx, op, ins):
    v = ins[0]
    if _params_are_data(op, ins):
        return _outputs(op, mixed(op, "a depth or value computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    axis = op.get_attr("axis")
    return _outputs(op, v if axis == -1 or axis > v.axis else v.at(v.axis + 1))


def space_to_batch(ctx, op, ins):
    """`SpaceToBatchND` puts the blocks of every image on the batch axis, block-major:
    `outer` grows by the number of blocks; `BatchToSpaceND` takes them back."""
    v = ins[0]
    if _params_are_data(op, ins):
        return _outputs(op, mixed(op, "block sizes computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    blocks = _axes(ctx, op, 1)
    if v.axis != 0 or blocks is None:
        return _outputs(op, mixed(op, "moves entries across the batch axis"))
    count = product(blocks)
    if op.type == "SpaceToBatchND":
        return _outputs(op, Rows(0, v.outer * count, v.inner))
    if v.outer % count:
        return _outputs(op, mixed(op, "moves entries across the batch axis"))
    return _outputs(op, Rows(0, v.outer // count, v.inner))


# -- TensorLists (the time steps of a recurrent loop) ------------------------------------------


def list_from_tensor(ctx, op, ins):
    v = ins[0]
    if is_data(ins[1]):
        return _outputs(op, mixed(op, "an element shape computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    if v.axis == 0:
        return _outputs(op, mixed(op, "makes a list of the examples"))
    return _outputs(op, ListRows(v.at(v.axis - 1)))


def list_get(ctx, op, ins):
    v = ins[0]
    if any(is_data(w) for w in ins[1:]):
        return _outputs(op, mixed(op, "an index computed from the data"))
    return _outputs(op, v.rows if isinstance(v, ListRows) else v)


def list_set(ctx, op, ins):
    lst = ins[0]
    if op.type == "TensorListSetItem":
        if is_data(ins[1]):
            return _outputs(op, mixed(op, "an index computed from the data"))
        item = ins[2]
    else:  # TensorListPushBack
        item = ins[1]
    if isinstance(item, Rows):
        item = ListRows(item)
    return _outputs(op, join(lst, item, op, "stores rows of different layouts in one list"))


def list_stack(ctx, op, ins):
    v = ins[0]
    if any(is_data(w) for w in ins[1:]):
        return _outputs(op, mixed(op, "a shape computed from the data"))
    if isinstance(v, ListRows):
        return _outputs(op, v.rows.at(v.rows.axis + 1))
    return _outputs(op, v)
