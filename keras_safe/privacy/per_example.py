"""Per-example gradient norms and clipped gradient sums.

The model side of DP-SGD: for a batch, compute every example's gradient norm and the sum of the
per-example gradients clipped to a bound, without materialising per-example gradients where the
layer allows it.

Three tiers, chosen per variable:

1. Layer taps ("ghost clipping", Goodfellow 2015; Lee & Kifer 2020; Li et al. 2022). While the
   training forward pass runs, supported layers (Dense, EinsumDense, Conv1D, Conv2D, Embedding,
   LayerNormalization, GroupNormalization) record their input and expose their pre-activation
   output; recurrent layers (SimpleRNN, LSTM, GRU) run unrolled so their cells can be tapped
   at every time step. One backward pass to those outputs gives, for each example, the
   factors of its weight gradient (for Dense: input `a_i` and output gradient `g_i`, gradient
   `a_i^T g_i`). Norms come
   from the factors (`|a_i|^2 |g_i|^2`, or Gram matrices for sequences, whichever is cheaper:
   "mixed ghost clipping", Bu et al. 2022) and the clipped sum is one weighted matmul per layer.
2. Every other trainable variable (custom layers, cells inside symbolic loops, layers whose
   batch axis is not the example axis or whose weights are also used elsewhere): per-example
   gradients from a Jacobian of the per-example losses, vectorized with `pfor` over the same
   forward pass.
3. If `pfor` cannot vectorize a layer's gradient, the Jacobian runs as a loop over examples.

Microbatches (TF Privacy's `num_microbatches`) are handled by grouping examples: a microbatch is
one "example" whose loss is the mean of its members' losses.
"""

from __future__ import annotations

import contextlib
import functools
import math

import keras
import tensorflow as tf

# ---------------------------------------------------------------------------------------------
# Gradient forms: what a tap knows about one variable's per-example gradients.
# ---------------------------------------------------------------------------------------------


def _group(t, groups):
    """Reshapes `[B, T, ...]` to `[groups, (B // groups) * T, ...]`."""
    shape = tf.shape(t)
    rest = shape[2:]
    new_shape = tf.concat([[groups, -1], rest], axis=0)
    return tf.reshape(t, new_shape)


def _scaled_rows(t, scale, factors):
    """`t` with example i multiplied by `scale[i]` (None: 1), and zeroed where `factors[i]` is 0.

    A zero factor marks an example whose gradient norm is not finite: it is dropped whole (not
    multiplied by 0, which keeps NaN), so one bad example cannot poison the step. The extra
    pass over `t` runs only in a step that has such an example.
    """
    shape = [-1] + [1] * (t.shape.rank - 1)
    if scale is not None:
        t = t * tf.reshape(tf.cast(scale, t.dtype), shape)
    keep = factors > 0
    return tf.cond(
        tf.reduce_all(keep),
        lambda: t,
        lambda: tf.where(tf.reshape(keep, shape), t, tf.zeros_like(t)),
    )


class _OuterProductGrad:
    """Per-example gradient `A_i^T G_i` (A: `[B, T, K]`, G: `[B, T, O]`), reshaped to `shape`."""

    def __init__(self, variable, a, g, shape):
        self.variable = variable
        self.a = a
        self.g = g
        self.shape = shape

    def group(self, groups):
        return _OuterProductGrad(
            self.variable, _group(self.a, groups), _group(self.g, groups), self.shape
        )

    def norms_sq(self):
        t = self.a.shape[1]
        k = self.a.shape[2]
        o = self.g.shape[2]
        if t == 1:
            return tf.reduce_sum(tf.square(self.a), [1, 2]) * tf.reduce_sum(
                tf.square(self.g), [1, 2]
            )
        if t is not None and k is not None and o is not None and t * t * (k + o) < t * k * o:
            gram_a = tf.einsum("btk,bsk->bts", self.a, self.a)
            gram_g = tf.einsum("bto,bso->bts", self.g, self.g)
            return tf.reduce_sum(gram_a * gram_g, axis=[1, 2])
        per_example = tf.einsum("btk,bto->bko", self.a, self.g)
        return tf.reduce_sum(tf.square(per_example), axis=[1, 2])

    def clipped_sum(self, factors):
        grad = tf.einsum(
            "btk,bto->ko",
            _scaled_rows(self.a, None, factors),
            _scaled_rows(self.g, factors, factors),
        )
        return tf.reshape(grad, self.shape)


class _MaterialisedGrad:
    """Per-example gradients held in full: `[B, *variable.shape]`."""

    def __init__(self, variable, per_example):
        self.variable = variable
        self.per_example = per_example

    def group(self, groups):
        grouped = _group(self.per_example[:, None], groups)
        return _MaterialisedGrad(self.variable, tf.reduce_sum(grouped, axis=1))

    def norms_sq(self):
        flat = tf.reshape(self.per_example, [tf.shape(self.per_example)[0], -1])
        return tf.reduce_sum(tf.square(flat), axis=1)

    def clipped_sum(self, factors):
        return tf.reduce_sum(_scaled_rows(self.per_example, factors, factors), axis=0)


class _EmbeddingGrad:
    """Per-example gradient of an embedding table: rows `ids_i` receive `G_i` (`[B, T, D]`)."""

    def __init__(self, variable, ids, g):
        self.variable = variable
        self.ids = ids
        self.g = g

    def group(self, groups):
        return _EmbeddingGrad(self.variable, _group(self.ids, groups), _group(self.g, groups))

    def norms_sq(self):
        same = tf.cast(tf.equal(self.ids[:, :, None], self.ids[:, None, :]), self.g.dtype)
        gram = tf.einsum("btd,bsd->bts", self.g, self.g)
        return tf.reduce_sum(same * gram, axis=[1, 2])

    def clipped_sum(self, factors):
        weighted = _scaled_rows(self.g, factors, factors)
        depth = tf.shape(self.g)[-1]
        return tf.math.unsorted_segment_sum(
            tf.reshape(weighted, [-1, depth]),
            tf.reshape(self.ids, [-1]),
            num_segments=self.variable.shape[0],
        )


# ---------------------------------------------------------------------------------------------
# Taps: per layer type, a forward pass that records what the gradient forms need.
# ---------------------------------------------------------------------------------------------


def _as_sequence(t):
    """Flattens `[B, ..., K]` to `[B, T, K]` (T=1 for rank-2 inputs)."""
    t = tf.convert_to_tensor(t)
    if t.shape.rank == 2:
        return t[:, None, :]
    return tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])


def _plain_keras_call(layer, cls):
    """True when `layer` runs `cls.call` unchanged (no subclass override, LoRA or quantization)."""
    return (
        isinstance(layer, cls)
        and type(layer).call is cls.call
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and not getattr(layer, "_remat_mode", None)
    )


def _finish(layer, z):
    if layer.activation is not None:
        z = layer.activation(z)
    return z


class _DenseTap:
    @staticmethod
    def supports(layer):
        return _plain_keras_call(layer, keras.layers.Dense)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        z = (
            tf.matmul(inputs, layer.kernel)
            if inputs.shape.rank == 2
            else tf.tensordot(inputs, layer.kernel, axes=1)
        )
        if layer.bias is not None:
            z = z + layer.bias
        record(inputs, z)
        return _finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        a, g = _as_sequence(inputs), _as_sequence(dz)
        forms = [_OuterProductGrad(layer.kernel, a, g, layer.kernel.shape)]
        if layer.bias is not None:
            forms.append(_MaterialisedGrad(layer.bias, tf.reduce_sum(g, axis=1)))
        return forms


class _EinsumDenseTap:
    @staticmethod
    def supports(layer):
        if not _plain_keras_call(layer, keras.layers.EinsumDense):
            return False
        lhs, out = layer.equation.replace(" ", "").split("->")
        ins, ker = lhs.split(",")
        # Per-example gradients need the batch letter in the input and output, not in the kernel.
        return "." not in layer.equation and ins[0] == out[0] and ins[0] not in ker

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        z = tf.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            z = z + layer.bias
        record(inputs, z)
        return _finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        lhs, out = layer.equation.replace(" ", "").split("->")
        ins, ker = lhs.split(",")
        batch = ins[0]
        kernel_grads = tf.einsum(f"{ins},{out}->{batch}{ker}", inputs, dz)
        forms = [_MaterialisedGrad(layer.kernel, kernel_grads)]
        if layer.bias is not None:
            # The bias spans the trailing output axes from the first bias axis on, with size 1
            # on the axes of that span that are not bias axes: sum dz over everything else.
            bias_shape = list(layer.bias.shape)
            rank = len(bias_shape)
            summed = tf.reduce_sum(dz, axis=list(range(1, dz.shape.rank - rank)))
            for axis, size in enumerate(bias_shape, start=1):
                if size == 1 and summed.shape[axis] != 1:
                    summed = tf.reduce_sum(summed, axis=axis, keepdims=True)
            forms.append(_MaterialisedGrad(layer.bias, summed))
        return forms


class _ConvTap:
    @staticmethod
    def supports(layer):
        for cls in (keras.layers.Conv1D, keras.layers.Conv2D):
            if _plain_keras_call(layer, cls):
                return layer.groups == 1 and layer.data_format == "channels_last"
        return False

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        padding = layer.padding
        if padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        z = keras.ops.conv(
            inputs,
            layer.kernel,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        if layer.use_bias:
            z = z + layer.bias
        record(inputs, z)
        return _finish(layer, z)

    @staticmethod
    def forms(layer, inputs, dz):
        patches = _patches(layer, inputs)
        g = tf.reshape(dz, [tf.shape(dz)[0], -1, dz.shape[-1]])
        kernel = layer.kernel
        forms = [_OuterProductGrad(kernel, patches, g, kernel.shape)]
        if layer.use_bias:
            forms.append(_MaterialisedGrad(layer.bias, tf.reduce_sum(g, axis=1)))
        return forms


def _patches(layer, inputs):
    """im2col: `[B, positions, kernel_size * channels]` in the kernel's (spatial, channel) order.

    With few input channels, `extract_patches` copies tiny chunks and is slow on CPU; there a
    convolution with a one-hot kernel (output channel m reads kernel tap m) builds the same
    patches through the optimised convolution path.
    """
    padding = "valid" if layer.padding == "causal" else layer.padding  # inputs are padded
    channels = inputs.shape[-1]
    if channels < 8:
        size = math.prod(layer.kernel_size) * channels
        one_hot = tf.reshape(tf.eye(size, dtype=inputs.dtype), [*layer.kernel_size, channels, size])
        patches = keras.ops.conv(
            inputs,
            one_hot,
            strides=list(layer.strides),
            padding=padding,
            dilation_rate=layer.dilation_rate,
        )
        return tf.reshape(patches, [tf.shape(patches)[0], -1, size])
    if layer.rank == 1:
        images = inputs[:, None, :, :]
        sizes = [1, 1, layer.kernel_size[0], 1]
        strides = [1, 1, layer.strides[0], 1]
        rates = [1, 1, layer.dilation_rate[0], 1]
    else:
        images = inputs
        sizes = [1, *layer.kernel_size, 1]
        strides = [1, *layer.strides, 1]
        rates = [1, *layer.dilation_rate, 1]
    patches = tf.image.extract_patches(images, sizes, strides, rates, padding.upper())
    return tf.reshape(patches, [tf.shape(patches)[0], -1, patches.shape[-1]])


class _EmbeddingTap:
    @staticmethod
    def supports(layer):
        return _plain_keras_call(layer, keras.layers.Embedding)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        ids = tf.cast(inputs, "int32")
        z = tf.gather(layer.embeddings, ids)
        record(ids, z)
        return tf.cast(z, layer.compute_dtype)

    @staticmethod
    def forms(layer, ids, dz):
        batch = tf.shape(ids)[0]
        flat_ids = tf.reshape(ids, [batch, -1])
        g = tf.reshape(dz, [batch, -1, dz.shape[-1]])
        return [_EmbeddingGrad(layer.embeddings, flat_ids, g)]


def _param_axes(layer, rank):
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return sorted(a % rank for a in axes)


class _LayerNormTap:
    @staticmethod
    def supports(layer):
        return _plain_keras_call(layer, keras.layers.LayerNormalization) and not layer.rms_scaling

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        rank = inputs.shape.rank
        axes = _param_axes(layer, rank)
        x = tf.cast(inputs, "float32") if inputs.dtype != tf.float64 else inputs
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        normalized = (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
        normalized = tf.cast(normalized, inputs.dtype)
        out = _affine(layer, normalized, axes)
        record(normalized, out)
        return tf.cast(out, layer.compute_dtype)

    @staticmethod
    def forms(layer, normalized, dz):
        return _affine_forms(layer, normalized, dz, _param_axes(layer, dz.shape.rank))


def _broadcast(param, axes, rank, shape=None):
    full = [1] * rank
    for axis, size in zip(axes, param.shape if shape is None else shape):
        full[axis] = size
    return tf.reshape(param, full)


def _affine(layer, normalized, axes):
    out = normalized
    rank = normalized.shape.rank
    if layer.scale:
        out = out * tf.cast(_broadcast(layer.gamma, axes, rank), out.dtype)
    if layer.center:
        out = out + tf.cast(_broadcast(layer.beta, axes, rank), out.dtype)
    return out


def _affine_forms(layer, normalized, dz, axes):
    reduce_axes = [a for a in range(1, dz.shape.rank) if a not in axes]
    forms = []
    if layer.scale:
        grads = tf.reduce_sum(normalized * dz, axis=reduce_axes)
        forms.append(_MaterialisedGrad(layer.gamma, tf.reshape(grads, [-1, *layer.gamma.shape])))
    if layer.center:
        grads = tf.reduce_sum(dz, axis=reduce_axes)
        forms.append(_MaterialisedGrad(layer.beta, tf.reshape(grads, [-1, *layer.beta.shape])))
    return forms


class _GroupNormTap:
    @staticmethod
    def supports(layer):
        return _plain_keras_call(layer, keras.layers.GroupNormalization)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        rank = inputs.shape.rank
        axis = layer.axis % rank
        channels = inputs.shape[axis]
        shape = tf.shape(inputs)
        grouped_shape = tf.concat(
            [shape[:axis], [layer.groups, channels // layer.groups], shape[axis + 1 :]], axis=0
        )
        x = tf.reshape(tf.cast(inputs, "float32"), grouped_shape)
        reduce_axes = [a for a in range(1, rank + 1) if a != axis]
        mean, variance = tf.nn.moments(x, axes=reduce_axes, keepdims=True)
        normalized = (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
        normalized = tf.cast(tf.reshape(normalized, shape), inputs.dtype)
        out = _affine(layer, normalized, [axis])
        record(normalized, out)
        return tf.cast(out, layer.compute_dtype)

    @staticmethod
    def forms(layer, normalized, dz):
        return _affine_forms(layer, normalized, dz, [layer.axis % dz.shape.rank])


def _first_state(states):
    return states[0] if isinstance(states, (list, tuple)) else states


def _plain_cell(layer, cls):
    return _plain_keras_call(layer, cls) and not layer.dropout and not layer.recurrent_dropout


class _SimpleRNNCellTap:
    """`h_t = act(x_t K + b + h_{t-1} U)`: one pre-activation, two outer products."""

    @staticmethod
    def supports(layer):
        return _plain_cell(layer, keras.layers.SimpleRNNCell)

    @staticmethod
    def forward(layer, record, sequence, states, *args, **kwargs):
        previous = _first_state(states)
        z = tf.matmul(sequence, layer.kernel) + tf.matmul(previous, layer.recurrent_kernel)
        if layer.bias is not None:
            z = z + layer.bias
        record((sequence, previous), z)
        output = layer.activation(z) if layer.activation is not None else z
        return output, [output] if isinstance(states, (list, tuple)) else output

    @staticmethod
    def forms(layer, saved, dz):
        return _recurrent_forms(layer, saved, dz, dz)


class _LSTMCellTap:
    """Keras's LSTM cell: `z = x_t K + h_{t-1} U + b`, gates i, f, c, o from `z`."""

    @staticmethod
    def supports(layer):
        return _plain_cell(layer, keras.layers.LSTMCell)

    @staticmethod
    def forward(layer, record, inputs, states, *args, **kwargs):
        h_prev, c_prev = states[0], states[1]
        z = tf.matmul(inputs, layer.kernel) + tf.matmul(h_prev, layer.recurrent_kernel)
        if layer.use_bias:
            z = z + layer.bias
        record((inputs, h_prev), z)
        z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
        carry = layer.recurrent_activation(z_f) * c_prev + layer.recurrent_activation(
            z_i
        ) * layer.activation(z_c)
        h = layer.recurrent_activation(z_o) * layer.activation(carry)
        return h, [h, carry]

    @staticmethod
    def forms(layer, saved, dz):
        return _recurrent_forms(layer, saved, dz, dz)


class _GRUCellTap:
    """Keras's GRU cell with `reset_after=True` (the default): two pre-activations."""

    @staticmethod
    def supports(layer):
        return _plain_cell(layer, keras.layers.GRUCell) and layer.reset_after

    @staticmethod
    def forward(layer, record, inputs, states, *args, **kwargs):
        h_prev = _first_state(states)
        from_inputs = tf.matmul(inputs, layer.kernel)
        from_state = tf.matmul(h_prev, layer.recurrent_kernel)
        if layer.use_bias:
            from_inputs = from_inputs + layer.bias[0]
            from_state = from_state + layer.bias[1]
        record((inputs, h_prev), from_inputs, from_state)
        x_z, x_r, x_h = tf.split(from_inputs, 3, axis=-1)
        s_z, s_r, s_h = tf.split(from_state, 3, axis=-1)
        update = layer.recurrent_activation(x_z + s_z)
        reset = layer.recurrent_activation(x_r + s_r)
        candidate = layer.activation(x_h + reset * s_h)
        h = update * h_prev + (1 - update) * candidate
        return h, [h] if isinstance(states, (list, tuple)) else h

    @staticmethod
    def forms(layer, saved, d_inputs, d_state):
        forms = _recurrent_forms(layer, saved, d_inputs, d_state, bias=False)
        if layer.use_bias:
            forms.append(_MaterialisedGrad(layer.bias, tf.stack([d_inputs, d_state], axis=1)))
        return forms


def _recurrent_forms(layer, saved, d_inputs, d_state, bias=True):
    inputs, previous = saved
    forms = [
        _OuterProductGrad(layer.kernel, inputs[:, None], d_inputs[:, None], layer.kernel.shape),
        _OuterProductGrad(
            layer.recurrent_kernel,
            previous[:, None],
            d_state[:, None],
            layer.recurrent_kernel.shape,
        ),
    ]
    if bias and getattr(layer, "bias", None) is not None:
        forms.append(_MaterialisedGrad(layer.bias, d_inputs))
    return forms


TAPS = (
    _DenseTap,
    _EinsumDenseTap,
    _ConvTap,
    _EmbeddingTap,
    _LayerNormTap,
    _GroupNormTap,
    _SimpleRNNCellTap,
    _LSTMCellTap,
    _GRUCellTap,
)


def _find_tap(layer):
    for tap in TAPS:
        if tap.supports(layer):
            return tap
    return None


def tapped_layers(model):
    """Returns `{layer: tap}` for the model's layers whose variables the taps cover."""
    result = {}
    for layer in _all_layers(model):
        if not layer.trainable or not layer.trainable_weights:
            continue
        tap = _find_tap(layer)
        if tap is not None:
            result[layer] = tap
    return result


def _all_layers(model):
    """Every layer reachable from `model` (depth first), each once, through public APIs."""
    seen, order = set(), []

    def visit(layer):
        for child in getattr(layer, "layers", None) or _sublayers(layer):
            if id(child) not in seen:
                seen.add(id(child))
                order.append(child)
                visit(child)

    visit(model)
    return order


def _sublayers(layer):
    children = []
    for value in vars(layer).values():
        candidates = value if isinstance(value, (list, tuple)) else [value]
        for item in candidates:
            if isinstance(item, keras.layers.Layer):
                children.append(item)
    return children


@contextlib.contextmanager
def _installed_taps(taps, records, untapped, sentinel):
    """Swaps each tapped layer's `call` for its recording version while the block runs.

    A call in another graph than the forward pass's (inside a loop or branch body) runs the
    layer's own `call` and marks the layer untapped: its tensors cannot be differentiated from
    outside that body. Tapped calls do not record on `sentinel`, so the sentinel tape sees the
    variables used outside tapped calls.
    """
    installed = []
    graph = tf.compat.v1.get_default_graph()
    try:
        for layer, tap in taps.items():
            original = layer.call

            @functools.wraps(original)
            def tapped_call(*args, _layer=layer, _tap=tap, _original=original, **kwargs):
                if tf.compat.v1.get_default_graph() is not graph:
                    untapped.add(_layer)
                    return _original(*args, **kwargs)
                kwargs.pop("training", None)
                with sentinel.stop_recording():
                    return _tap.forward(
                        _layer,
                        lambda a, *zs, _l=_layer: records.append((_l, a, zs)),
                        *args,
                        **kwargs,
                    )

            object.__setattr__(layer, "call", tapped_call)
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            object.__delattr__(layer, "call")


MAX_UNROLL = 200


@contextlib.contextmanager
def _unrolled(rnn_layers):
    """Runs recurrent layers with tapped cells unrolled (time steps up to `MAX_UNROLL`).

    Unrolled, every step's cell call lives in the forward pass's graph, so the cell taps can
    record it; with a symbolic loop the cell falls back to the per-example Jacobian.
    """
    installed = []
    try:
        for layer in rnn_layers:
            original = layer.call

            @functools.wraps(original)
            def unrolled_call(sequences, *args, _layer=layer, _original=original, **kwargs):
                steps = keras.tree.flatten(sequences)[0].shape[1]
                if _layer.unroll or steps is None or steps > MAX_UNROLL:
                    return _original(sequences, *args, **kwargs)
                object.__setattr__(_layer, "unroll", True)
                try:
                    return _original(sequences, *args, **kwargs)
                finally:
                    object.__setattr__(_layer, "unroll", False)

            object.__setattr__(layer, "call", unrolled_call)
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            object.__delattr__(layer, "call")


def _untap_unsafe_layers(taps, records, untapped, sentinel, losses):
    """Adds to `untapped` the layers whose records do not describe per-example gradients.

    - a tapped variable also read outside its tapped call (tied weights): the records miss
      that part of its gradient;
    - records whose leading axis is not the example axis (the model folded other axes into
      the batch before the layer): each row would be clipped on its own.

    Returns runtime checks of the leading axis where it is not known while tracing.
    """
    # The tape watches the backend variables behind Keras variables (`variable.value`).
    outside = {id(v) for v in sentinel.watched_variables()}
    for layer in taps:
        if any(id(v.value) in outside or id(v) in outside for v in layer.trainable_weights):
            untapped.add(layer)
    batch = losses.shape[0]
    checks = []
    for layer, saved, _ in records:
        inputs = keras.tree.flatten(saved)[0]
        rows = inputs.shape[0]
        if rows is not None and batch is not None:
            if rows != batch:
                untapped.add(layer)
        elif layer not in untapped:
            checks.append(
                tf.debugging.assert_equal(
                    tf.shape(inputs)[0],
                    tf.shape(losses)[0],
                    message=f"{layer.name} sees a batch axis that is not the example axis; "
                    "DP-SGD cannot clip its gradients per example with layer taps.",
                )
            )
    return checks


# ---------------------------------------------------------------------------------------------
# The clipped gradient sum.
# ---------------------------------------------------------------------------------------------


def clipped_gradient_sum(
    model,
    variables,
    forward_and_losses,
    l2_norm_clip,
    num_microbatches=None,
    use_taps=True,
):
    """Sum over examples (or microbatches) of gradients clipped to `l2_norm_clip`.

    Args:
        model: the Keras model whose layers are tapped.
        variables: the trainable variables to differentiate.
        forward_and_losses: a zero-argument callable that runs the model's forward pass and
            returns `(per_example_losses, outputs)`; `per_example_losses` has shape `[B]`.
        l2_norm_clip: the clipping bound C on each example's global gradient L2 norm.
        num_microbatches: None for per-example clipping, else the number of microbatches M (the
            batch size must be divisible by M); each microbatch's mean-loss gradient is clipped.
        use_taps: use layer taps where supported; False computes every per-example gradient
            by the vectorized Jacobian (a reference path).

    Returns:
        `(clipped_sums, losses, outputs, norms)`: a list of gradient sums aligned with
        `variables`, the per-example losses, the forward outputs and the per-example (or
        per-microbatch) gradient norms before clipping.
    """
    taps = tapped_layers(model) if use_taps else {}
    records, untapped = [], set()
    rnns = [
        layer
        for layer in _all_layers(model)
        if isinstance(layer, keras.layers.RNN) and getattr(layer, "cell", None) in taps
    ]
    with tf.GradientTape(persistent=True) as tape:
        with (
            tf.GradientTape() as sentinel,
            _installed_taps(taps, records, untapped, sentinel),
            _unrolled(rnns),
        ):
            losses, outputs = forward_and_losses()
        groups = num_microbatches
        if groups:
            unit_losses = tf.reduce_mean(tf.reshape(losses, [groups, -1]), axis=1)
        else:
            unit_losses = losses
        total = tf.reduce_sum(unit_losses)

    checks = _untap_unsafe_layers(taps, records, untapped, sentinel, losses)
    records = [r for r in records if r[0] not in untapped]
    tapped_ids = set()
    forms = []
    if records:
        zs = [z for _, _, record_zs in records for z in record_zs]
        dzs = tape.gradient(total, zs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        by_variable = {}
        position = 0
        for layer, saved, record_zs in records:
            record_dzs = dzs[position : position + len(record_zs)]
            position += len(record_zs)
            for form in taps[layer].forms(layer, saved, *record_dzs):
                by_variable.setdefault(id(form.variable), []).append(form)
        for var_forms in by_variable.values():
            form = var_forms[0] if len(var_forms) == 1 else _merge(var_forms)
            if groups:
                form = form.group(groups)
            forms.append(form)
            tapped_ids.add(id(form.variable))

    wanted = {id(v) for v in variables}
    forms = [f for f in forms if id(f.variable) in wanted]
    rest = [v for v in variables if id(v) not in tapped_ids]
    if rest:
        jacobians = _jacobian(tape, unit_losses, rest)
        forms.extend(_MaterialisedGrad(v, j) for v, j in zip(rest, jacobians))
    del tape

    norms_sq = tf.add_n([tf.cast(f.norms_sq(), tf.float32) for f in forms])
    with tf.control_dependencies(checks):
        norms = tf.sqrt(norms_sq)
    clip = tf.cast(l2_norm_clip, tf.float32)
    # Examples with a non-finite norm (NaN or inf in their data or loss) get factor 0 and are
    # dropped from the sum: otherwise one such example would turn the whole step into NaN.
    factors = tf.where(tf.math.is_finite(norms), clip / tf.maximum(norms, clip), 0.0)
    sums = {id(f.variable): f.clipped_sum(factors) for f in forms}
    clipped = [tf.cast(sums[id(v)], v.dtype) for v in variables]
    return clipped, losses, outputs, norms


def _merge(forms):
    """Combines the forms of a variable used by several calls of one layer.

    Outer products `A_c^T G_c` summed over calls are one outer product of the inputs and output
    gradients concatenated along the sequence axis (recurrent cells, shared layers); other
    mixtures are materialised and added.
    """
    if all(isinstance(f, _OuterProductGrad) for f in forms):
        return _OuterProductGrad(
            forms[0].variable,
            tf.concat([f.a for f in forms], axis=1),
            tf.concat([f.g for f in forms], axis=1),
            forms[0].shape,
        )
    materialised = []
    for form in forms:
        if isinstance(form, _MaterialisedGrad):
            materialised.append(form.per_example)
        elif isinstance(form, _OuterProductGrad):
            per_example = tf.einsum("btk,bto->bko", form.a, form.g)
            materialised.append(tf.reshape(per_example, [-1, *form.shape]))
        else:
            batch = tf.shape(form.g)[0]
            rows = form.variable.shape[0]
            keys = form.ids + tf.range(batch)[:, None] * rows
            dense = tf.math.unsorted_segment_sum(
                tf.reshape(form.g, [-1, form.g.shape[-1]]),
                tf.reshape(keys, [-1]),
                num_segments=batch * rows,
            )
            materialised.append(tf.reshape(dense, [batch, rows, -1]))
    return _MaterialisedGrad(forms[0].variable, tf.add_n(materialised))


def _jacobian(tape, unit_losses, variables):
    """Per-example gradients `[B, *v.shape]` by a Jacobian: vectorized, else a loop."""
    try:
        jac = tape.jacobian(unit_losses, variables, experimental_use_pfor=True)
    except (ValueError, NotImplementedError, TypeError, tf.errors.OpError):
        jac = tape.jacobian(unit_losses, variables, experimental_use_pfor=False)
    rows = tf.shape(unit_losses)[:1]
    return [
        tf.zeros(tf.concat([rows, v.shape], axis=0), v.dtype) if j is None else j
        for j, v in zip(jac, variables)
    ]
