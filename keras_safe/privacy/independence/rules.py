"""Transfer rules: what an op's outputs depend on, given what its inputs depend on.

One rule per family of TensorFlow ops; `RULES` maps op types to rules. A rule receives the
analysis context, the op and its inputs' values (see `values`) and returns the outputs'
values. Rules are written to be sound, not complete: where a rule cannot show from static
shapes and constants that the rows stay apart, it returns `Mixed` and the step is refused.
An op type missing from `RULES` that receives data is `Mixed` too (fail closed).
"""

from keras_safe.privacy.independence.values import (
    Mixed,
    Rows,
    dims,
    int_list,
    is_data,
    mixed,
    normalize_axes,
    rank,
)

__all__ = ["ELEMENTWISE", "LEADING_AXIS", "RANDOM", "REDUCTIONS", "SHAPE_FREE", "UNARY"]

# Ops whose outputs never depend on the values of their inputs (only shapes, or nothing).
SHAPE_FREE = {
    "Shape",
    "ShapeN",
    "Size",
    "Rank",
    "ZerosLike",
    "OnesLike",
    "TensorListLength",
    "TensorListElementShape",
    "NoOp",
    "VarIsInitializedOp",
    "BroadcastGradientArgs",
}

# Random draws: their values depend on the seed and the shape asked for, never on the data.
RANDOM = {
    "StatelessRandomUniformV2", "StatelessRandomNormalV2", "StatelessTruncatedNormalV2",
    "StatelessRandomUniformIntV2", "StatelessRandomUniformFullIntV2", "StatelessRandomUniform",
    "StatelessRandomNormal", "StatelessTruncatedNormal", "StatelessRandomUniformInt",
    "StatelessRandomGetKeyCounter", "StatelessRandomGetKeyCounterAlg", "StatelessRandomGetAlg",
    "RandomUniform", "RandomStandardNormal", "TruncatedNormal", "RandomUniformInt",
    "StatelessRandomBinomial",
}  # fmt: skip

UNARY = {
    "Identity", "Snapshot", "StopGradient", "PreventGradient", "CheckNumerics",
    "CheckNumericsV2", "EnsureShape", "Cast", "Neg", "Abs", "Sign", "Exp", "Expm1", "Log",
    "Log1p", "Sqrt", "Rsqrt", "Square", "Reciprocal", "Inv", "Sin", "Cos", "Tan", "Tanh",
    "Sigmoid", "Relu", "Relu6", "Elu", "Selu", "Softplus", "Softsign", "LeakyRelu", "Erf",
    "Erfc", "Erfinv", "Floor", "Ceil", "Round", "Rint", "IsNan", "IsFinite", "IsInf",
    "LogicalNot", "Sinh", "Cosh", "Asin", "Acos", "Atan", "Asinh", "Acosh", "Atanh", "Lgamma",
    "Digamma", "Real", "Imag", "Angle", "Conj", "ComplexAbs", "Invert", "Bucketize",
    "ClipByValue", "FakeQuantWithMinMaxArgs", "Ndtri",
}  # fmt: skip

ELEMENTWISE = {
    "Add", "AddV2", "Sub", "Mul", "Div", "RealDiv", "DivNoNan", "FloorDiv", "FloorMod", "Mod",
    "TruncateDiv", "TruncateMod", "Maximum", "Minimum", "Pow", "SquaredDifference", "Equal",
    "NotEqual", "Less", "LessEqual", "Greater", "GreaterEqual", "LogicalAnd", "LogicalOr",
    "Atan2", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "LeftShift", "RightShift", "MulNoNan",
    "Xlogy", "Xdivy", "Xlog1py", "ApproximateEqual", "SelectV2", "AddN", "Betainc", "Igamma",
    "Igammac", "Zeta", "Polygamma", "ReluGrad", "Relu6Grad", "EluGrad", "SeluGrad",
    "LeakyReluGrad", "SigmoidGrad", "TanhGrad", "SoftplusGrad", "SoftsignGrad", "RsqrtGrad",
    "SqrtGrad", "ReciprocalGrad", "InvGrad", "BiasAdd", "BiasAddV1",
}  # fmt: skip

REDUCTIONS = {"Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "EuclideanNorm"}

# Ops that treat every entry of axis 0 as a separate item (images, sequences, patches).
# Ops that treat every entry of axis 0 as a separate item (images, sequences, patches): the
# inputs that carry those items (the others, filters and sizes, must not hold data).
LEADING_AXIS = {
    "Conv2D": (0,),
    "Conv3D": (0,),
    "Conv2DBackpropInput": (2,),
    "Conv3DBackpropInputV2": (2,),
    "DepthwiseConv2dNative": (0,),
    "DepthwiseConv2dNativeBackpropInput": (2,),
    "MaxPool": (0,),
    "MaxPoolV2": (0,),
    "MaxPool3D": (0,),
    "AvgPool": (0,),
    "AvgPool3D": (0,),
    "LRN": (0,),
    "ResizeBilinear": (0,),
    "ResizeNearestNeighbor": (0,),
    "ResizeBicubic": (0,),
    "ResizeArea": (0,),
    "ExtractImagePatches": (0,),
    "ExtractVolumePatches": (0,),
    "DepthToSpace": (0,),
    "SpaceToDepth": (0,),
    "Dilation2D": (0,),
    "MaxPoolGrad": (0, 1, 2),
    "MaxPoolGradV2": (0, 1, 2),
    "MaxPool3DGrad": (0, 1, 2),
    "AvgPoolGrad": (1,),
    "AvgPool3DGrad": (1,),
    "ResizeBilinearGrad": (0, 1),
    "ResizeNearestNeighborGrad": (0,),
    # Image augmentation: one transform per image (rows of the transforms, or one for all).
    "ImageProjectiveTransformV3": (0, 1),
    "ImageProjectiveTransformV2": (0, 1),
    "AdjustContrastv2": (0,),
    "AdjustHue": (0,),
    "AdjustSaturation": (0,),
}


def _outputs(op, value):
    return [value] * len(op.outputs)


def unary(ctx, op, ins):
    v = ins[0]
    if any(is_data(w) for w in ins[1:]):
        return _outputs(op, mixed(op, "a data-dependent parameter applies to every example"))
    return _outputs(op, v)


def elementwise(ctx, op, ins, output=None):
    """Broadcasting ops: rows line up with rows (axes right-aligned)."""
    out = op.outputs[0] if output is None else output
    out_dims = dims(out)
    result = None
    for tensor, value in zip(op.inputs, ins):
        if not is_data(value):
            continue
        if not isinstance(value, Rows):
            return _outputs(op, value if isinstance(value, Mixed) else mixed(op, "a list"))
        in_dims = dims(tensor)
        if out_dims is None or in_dims is None:
            return _outputs(op, mixed(op, "shapes of unknown rank"))
        axis = value.axis + len(out_dims) - len(in_dims)
        if in_dims[value.axis] is not None and out_dims[axis] != in_dims[value.axis]:
            return _outputs(op, mixed(op, "broadcasts one example's row over others"))
        candidate = value.at(axis)
        if result is None:
            result = candidate
        elif result != candidate:
            return _outputs(op, mixed(op, "combines rows of different examples"))
    return _outputs(op, result)


def select(ctx, op, ins):
    """`Select` (v1): a vector condition picks whole rows of the first axis."""
    if rank(op.inputs[0]) == 1 and (rank(op.inputs[1]) or 0) > 1:
        cond = ins[0]
        rest = elementwise(ctx, op, [None, *ins[1:]])[0]
        if not is_data(cond):
            return _outputs(op, rest)
        if isinstance(cond, Rows) and cond.axis == 0:
            if rest is None or rest == cond:
                return _outputs(op, cond)
        return _outputs(op, mixed(op, "selects rows with a condition from other rows"))
    return elementwise(ctx, op, ins)


def _axes(ctx, op, index):
    return int_list(ctx.static(op.inputs[index]))


def reduction(ctx, op, ins):
    v = ins[0]
    if is_data(ins[1]):
        return _outputs(op, mixed(op, "reduces over axes computed from the data"))
    if not is_data(v):
        return _outputs(op, None)
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[0])
    axes = _axes(ctx, op, 1)
    if axes is None or r is None:
        return _outputs(op, mixed(op, "reduces over axes keras_safe cannot read"))
    axes = normalize_axes(axes, r)
    if v.axis in axes:
        return _outputs(op, mixed(op, "reduces over the batch axis"))
    keep = op.get_attr("keep_dims") if "keep_dims" in op.node_def.attr else False
    axis = v.axis if keep else v.axis - sum(a < v.axis for a in axes)
    return _outputs(op, v.at(axis))


def arg_reduction(ctx, op, ins):
    v = ins[0]
    if is_data(ins[1]):
        return _outputs(op, mixed(op, "reduces over an axis computed from the data"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    axes = _axes(ctx, op, 1)
    r = rank(op.inputs[0])
    if axes is None or r is None:
        return _outputs(op, mixed(op, "reduces over an axis keras_safe cannot read"))
    (axis,) = normalize_axes(axes, r)
    if axis == v.axis:
        return _outputs(op, mixed(op, "reduces over the batch axis"))
    return _outputs(op, v.at(v.axis - (axis < v.axis)))


def along_axis(ctx, op, ins, axis_index=None, attr=None, last=False):
    """Ops that work along one axis (cumulative sums, softmax, top-k): not the batch axis."""
    v = ins[0]
    if any(is_data(w) for i, w in enumerate(ins) if i != 0):
        return _outputs(op, mixed(op, "a data-dependent parameter"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[0])
    if r is None:
        return _outputs(op, mixed(op, "a shape of unknown rank"))
    if last:
        axis = r - 1
    elif attr is not None:
        axis = op.get_attr(attr)
    else:
        axes = _axes(ctx, op, axis_index)
        if axes is None:
            return _outputs(op, mixed(op, "an axis keras_safe cannot read"))
        axis = axes[0]
    axis = axis + r if axis < 0 else axis
    if axis == v.axis:
        return _outputs(op, mixed(op, "works along the batch axis"))
    return _outputs(op, v)


def last_two(ctx, op, ins):
    """Matrix ops on the last two axes (band parts, diagonals)."""
    v = ins[0]
    if any(is_data(w) for w in ins[1:]):
        return _outputs(op, mixed(op, "a data-dependent parameter"))
    if not isinstance(v, Rows):
        return _outputs(op, v)
    r = rank(op.inputs[0])
    if r is None or v.axis >= r - 2:
        return _outputs(op, mixed(op, "works across the batch axis"))
    return _outputs(op, v)


def shape_free(ctx, op, ins):
    return _outputs(op, None)


def leading_axis(ctx, op, ins):
    items = LEADING_AXIS[op.type]
    if any(is_data(v) for i, v in enumerate(ins) if i not in items):
        return _outputs(op, mixed(op, "a filter or parameter computed from the data"))
    found = None
    for i in items:
        v = ins[i]
        if not is_data(v):
            continue
        if not isinstance(v, Rows):
            return _outputs(op, v if isinstance(v, Mixed) else mixed(op, "a list"))
        if v.axis != 0 or (found is not None and v != found):
            return _outputs(op, mixed(op, "the batch axis is not the leading axis"))
        found = v
    return _outputs(op, found)


def _clamped_to_constant(ctx, tensor):
    """True for `minimum(maximum(a, anything), a)` with a constant `a` (`tf.math.bincount`'s
    size when `minlength == maxlength`, as Keras's `CategoryEncoding` gives it): whatever the
    data, the value is `a`."""
    while tensor.op.type in ("Cast", "Identity"):
        tensor = tensor.op.inputs[0]
    if tensor.op.type != "Minimum":
        return False
    for low, other in (tensor.op.inputs, reversed(tensor.op.inputs)):
        a = ctx.static(other)
        if isinstance(a, int) and low.op.type == "Maximum":
            floors = [ctx.static(t) for t in low.op.inputs]
            if any(isinstance(f, int) and f >= a for f in floors):
                return True
    return False


def bincount(ctx, op, ins):
    """`DenseBincount` of a `[B, T]` input counts per row; of a vector, over the batch."""
    v = ins[0]
    if is_data(ins[1]) and not _clamped_to_constant(ctx, op.inputs[1]):
        return _outputs(op, mixed(op, "a size computed from the data"))
    if v is None:
        return _outputs(op, ins[2] if len(ins) > 2 else None)
    if not isinstance(v, Rows) or v.axis != 0 or rank(op.inputs[0]) != 2:
        return _outputs(op, mixed(op, "counts values across the examples"))
    weights = ins[2] if len(ins) > 2 else None
    if is_data(weights) and weights != v:
        return _outputs(op, mixed(op, "weights rows of other examples"))
    return _outputs(op, v)


def matmul(ctx, op, ins):
    a, b = ins[0], ins[1]
    if isinstance(a, Mixed) or isinstance(b, Mixed):
        return _outputs(op, a if isinstance(a, Mixed) else b)
    ta = op.get_attr("transpose_a")
    tb = op.get_attr("transpose_b")
    result = None
    if isinstance(a, Rows):
        if a.axis != (1 if ta else 0):
            return _outputs(op, mixed(op, "contracts over the batch axis"))
        result = a.at(0)
    if isinstance(b, Rows):
        if b.axis != (0 if tb else 1) or result is not None:
            return _outputs(op, mixed(op, "contracts over the batch axis"))
        result = b.at(1)
    return _outputs(op, result)


def batch_matmul(ctx, op, ins):
    a, b = ins[0], ins[1]
    if isinstance(a, Mixed) or isinstance(b, Mixed):
        return _outputs(op, a if isinstance(a, Mixed) else b)
    out_rank = rank(op.outputs[0])
    ra, rb = rank(op.inputs[0]), rank(op.inputs[1])
    if out_rank is None or ra is None or rb is None:
        return _outputs(op, mixed(op, "shapes of unknown rank"))
    # a: [..., M, K] ([..., K, M] with adj_x); b: [..., K, N] ([..., N, K] with adj_y).
    a_kept = ra - 1 if op.get_attr("adj_x") else ra - 2
    b_kept = rb - 2 if op.get_attr("adj_y") else rb - 1
    found = []
    for value, r, kept, out_axis in ((a, ra, a_kept, out_rank - 2), (b, rb, b_kept, out_rank - 1)):
        if not isinstance(value, Rows):
            continue
        if value.axis < r - 2:
            found.append(value.at(value.axis + out_rank - r))
        elif value.axis == kept:
            found.append(value.at(out_axis))
        else:
            return _outputs(op, mixed(op, "contracts over the batch axis"))
    if len(found) == 2 and (found[0] != found[1] or found[0].axis >= out_rank - 2):
        return _outputs(op, mixed(op, "pairs rows of different examples"))
    return _outputs(op, found[0] if found else None)


def _einsum_labels(spec, r):
    if "..." not in spec:
        return list(spec) if len(spec) == r else None
    head, tail = spec.split("...")
    count = r - len(head) - len(tail)
    if count < 0:
        return None
    return list(head) + [f"#{count - i}" for i in range(count)] + list(tail)


def einsum(ctx, op, ins):
    equation = op.get_attr("equation").decode().replace(" ", "")
    if "->" not in equation:
        return _outputs(op, mixed(op, "an implicit einsum output"))
    lhs, rhs = equation.split("->")
    specs = lhs.split(",")
    out_rank = rank(op.outputs[0])
    if out_rank is None or len(specs) != len(op.inputs):
        return _outputs(op, mixed(op, "an einsum keras_safe cannot read"))
    out_labels = _einsum_labels(rhs, out_rank)
    label, factors = None, None
    for tensor, value, spec in zip(op.inputs, ins, specs):
        if not is_data(value):
            continue
        if not isinstance(value, Rows):
            return _outputs(op, value if isinstance(value, Mixed) else mixed(op, "a list"))
        labels = _einsum_labels(spec, rank(tensor) or 0)
        if labels is None or out_labels is None:
            return _outputs(op, mixed(op, "an einsum keras_safe cannot read"))
        mine = labels[value.axis]
        if labels.count(mine) > 1:
            return _outputs(op, mixed(op, "takes a diagonal across the batch axis"))
        if label is None:
            label, factors = mine, (value.outer, value.inner)
        elif mine != label or factors != (value.outer, value.inner):
            return _outputs(op, mixed(op, "pairs rows of different examples"))
    if label is None:
        return _outputs(op, None)
    if label not in out_labels:
        return _outputs(op, mixed(op, "contracts over the batch axis"))
    return _outputs(op, Rows(out_labels.index(label), *factors))


def per_row(ctx, op, ins):
    """Ops on `[B, ...]` inputs that work example by example along axis 0 (losses, top-k
    membership, sampling from logits): every data input must have its rows on axis 0."""
    result = None
    for value in ins:
        if not is_data(value):
            continue
        if not isinstance(value, Rows):
            return _outputs(op, value if isinstance(value, Mixed) else mixed(op, "a list"))
        if value.axis != 0 or (result is not None and value != result):
            return _outputs(op, mixed(op, "pairs rows of different examples"))
        result = value
    return _outputs(op, result)


def fused_batch_norm(ctx, op, ins):
    if op.get_attr("is_training"):
        return _outputs(op, mixed(op, "normalises with the statistics of the batch"))
    if any(is_data(v) for v in ins[1:]):
        return _outputs(op, mixed(op, "normalises with statistics computed from the data"))
    v = ins[0]
    if isinstance(v, Rows) and v.axis != 0:
        return _outputs(op, mixed(op, "the batch axis is not the leading axis"))
    return [v] + [None] * (len(op.outputs) - 1)


def identity_n(ctx, op, ins):
    return list(ins)


def always_mixed(reason):
    def rule(ctx, op, ins):
        return _outputs(op, mixed(op, reason))

    return rule
