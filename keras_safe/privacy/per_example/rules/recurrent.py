"""Recurrent cells: SimpleRNN, LSTM and GRU cells recorded at every time step.

The recurrent layers run unrolled while the DP forward pass records (see `install.unrolled`), so
each step's cell call records its input `x_t`, previous state `h_{t-1}` and pre-activation; the
kernel's gradient is `sum_t x_t dz_t^T`, the recurrent kernel's `sum_t h_{t-1} dz_t^T`: outer
products over time, joined across the steps.
"""

import keras

from keras_safe.privacy.per_example.forms import OuterProductGrad
from keras_safe.privacy.per_example.rules.base import PerExampleRule, plain_keras_call

__all__ = ["GRUCellRule", "LSTMCellRule", "SimpleRNNCellRule"]


def _first_state(states):
    return states[0] if isinstance(states, (list, tuple)) else states


def _plain_cell(layer, cls):
    return plain_keras_call(layer, cls) and not layer.dropout and not layer.recurrent_dropout


def _bias_rows(bias, rows):
    """A bias gradient as an outer product with one-hot rows: `rows` is `[B, P, O]` with one
    row per slice of the bias (P = 1 for a plain bias). Outer products of the time steps join
    into one form (no per-step materialised rows to add up)."""
    count = rows.shape[1]
    if count == 1:
        one_hot = keras.ops.ones_like(rows[:, :, :1])
    else:
        eye = keras.ops.eye(count, dtype=rows.dtype)
        one_hot = keras.ops.broadcast_to(eye, (keras.ops.shape(rows)[0], count, count))
    return OuterProductGrad(bias, one_hot, rows, bias.shape)


def _recurrent_forms(layer, saved, d_inputs, d_state, bias=True):
    inputs, previous = saved
    kernel, recurrent = layer.kernel, layer.recurrent_kernel
    forms = [
        OuterProductGrad(kernel, inputs[:, None], d_inputs[:, None], kernel.shape),
        OuterProductGrad(recurrent, previous[:, None], d_state[:, None], recurrent.shape),
    ]
    if bias and getattr(layer, "bias", None) is not None:
        forms.append(_bias_rows(layer.bias, d_inputs[:, None]))
    return forms


class SimpleRNNCellRule(PerExampleRule):
    """`h_t = act(x_t K + b + h_{t-1} U)`: one pre-activation, two outer products."""

    @staticmethod
    def supports(layer):
        return _plain_cell(layer, keras.layers.SimpleRNNCell)

    @staticmethod
    def forward(layer, record, sequence, states, *args, **kwargs):
        previous = _first_state(states)
        z = keras.ops.matmul(sequence, layer.kernel)
        if layer.bias is not None:
            z = z + layer.bias
        z = z + keras.ops.matmul(previous, layer.recurrent_kernel)
        record((sequence, previous), z)
        output = layer.activation(z) if layer.activation is not None else z
        return output, [output] if isinstance(states, (list, tuple)) else output

    @staticmethod
    def forms(layer, saved, dz):
        return _recurrent_forms(layer, saved, dz, dz)


class LSTMCellRule(PerExampleRule):
    """Keras's LSTM cell: `z = x_t K + h_{t-1} U + b`, gates i, f, c, o from `z`."""

    @staticmethod
    def supports(layer):
        return _plain_cell(layer, keras.layers.LSTMCell)

    @staticmethod
    def forward(layer, record, inputs, states, *args, **kwargs):
        h_prev, c_prev = states[0], states[1]
        z = keras.ops.matmul(inputs, layer.kernel)
        z = z + keras.ops.matmul(h_prev, layer.recurrent_kernel)
        if layer.use_bias:
            z = z + layer.bias
        record((inputs, h_prev), z)
        z_i, z_f, z_c, z_o = keras.ops.split(z, 4, axis=-1)
        gate = layer.recurrent_activation
        carry = gate(z_f) * c_prev + gate(z_i) * layer.activation(z_c)
        h = gate(z_o) * layer.activation(carry)
        return h, [h, carry]

    @staticmethod
    def forms(layer, saved, dz):
        return _recurrent_forms(layer, saved, dz, dz)


class GRUCellRule(PerExampleRule):
    """Keras's GRU cell. With `reset_after=True` (the default) two pre-activations, from the
    inputs and from the state; with `reset_after=False` the candidate's recurrent product
    reads the reset state `r * h_{t-1}`, so the recurrent kernel's gradient is an outer product
    over two rows per step: `h_{t-1}` with the update/reset columns, `r * h_{t-1}` with the
    candidate columns."""

    @staticmethod
    def supports(layer):
        return _plain_cell(layer, keras.layers.GRUCell)

    @staticmethod
    def forward(layer, record, inputs, states, *args, **kwargs):
        if not layer.reset_after:
            return _gru_reset_before(layer, record, inputs, states)
        h_prev = _first_state(states)
        from_inputs = keras.ops.matmul(inputs, layer.kernel)
        from_state = keras.ops.matmul(h_prev, layer.recurrent_kernel)
        if layer.use_bias:
            from_inputs = from_inputs + layer.bias[0]
            from_state = from_state + layer.bias[1]
        record((inputs, h_prev), from_inputs, from_state)
        x_z, x_r, x_h = keras.ops.split(from_inputs, 3, axis=-1)
        s_z, s_r, s_h = keras.ops.split(from_state, 3, axis=-1)
        update = layer.recurrent_activation(x_z + s_z)
        reset = layer.recurrent_activation(x_r + s_r)
        candidate = layer.activation(x_h + reset * s_h)
        h = update * h_prev + (1 - update) * candidate
        return h, [h] if isinstance(states, (list, tuple)) else h

    @staticmethod
    def forms(layer, saved, *dzs):
        if not layer.reset_after:
            return _gru_reset_before_forms(layer, saved, *dzs)
        d_inputs, d_state = dzs
        forms = _recurrent_forms(layer, saved, d_inputs, d_state, bias=False)
        if layer.use_bias:
            forms.append(_bias_rows(layer.bias, keras.ops.stack([d_inputs, d_state], axis=1)))
        return forms


def _gru_reset_before(layer, record, inputs, states):
    h_prev = _first_state(states)
    units = layer.units
    from_inputs = keras.ops.matmul(inputs, layer.kernel)
    if layer.use_bias:
        from_inputs = from_inputs + layer.bias
    gates = keras.ops.matmul(h_prev, layer.recurrent_kernel[:, : 2 * units])
    x_z, x_r, x_h = keras.ops.split(from_inputs, 3, axis=-1)
    update = layer.recurrent_activation(x_z + gates[:, :units])
    reset = layer.recurrent_activation(x_r + gates[:, units:])
    reset_state = reset * h_prev
    from_reset = keras.ops.matmul(reset_state, layer.recurrent_kernel[:, 2 * units :])
    record((inputs, h_prev, reset_state), from_inputs, gates, from_reset)
    h = update * h_prev + (1 - update) * layer.activation(x_h + from_reset)
    return h, [h] if isinstance(states, (list, tuple)) else h


def _gru_reset_before_forms(layer, saved, d_inputs, d_gates, d_reset):
    inputs, h_prev, reset_state = saved
    kernel, recurrent = layer.kernel, layer.recurrent_kernel
    rows = keras.ops.stack([h_prev, reset_state], axis=1)
    grads = keras.ops.stack(
        [
            keras.ops.concatenate([d_gates, keras.ops.zeros_like(d_reset)], axis=-1),
            keras.ops.concatenate([keras.ops.zeros_like(d_gates), d_reset], axis=-1),
        ],
        axis=1,
    )
    forms = [
        OuterProductGrad(kernel, inputs[:, None], d_inputs[:, None], kernel.shape),
        OuterProductGrad(recurrent, rows, grads, recurrent.shape),
    ]
    if layer.use_bias:
        forms.append(_bias_rows(layer.bias, d_inputs[:, None]))
    return forms
