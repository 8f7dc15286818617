"""DP-SGD's clipped update against an independent one-example-at-a-time reference.

The reference computes each example's gradient with a plain GradientTape on a batch holding
that example alone, using Keras's own `model.compute_loss`, clips it in numpy and averages.
With noise 0 and SGD at learning rate 1, the weights must move by exactly that average.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe

RNG = np.random.default_rng(0)
B = 8


def _reference_update(model, x, y, clip, sample_weight=None, microbatches=None):
    """Mean of clipped gradients, one example (or microbatch) at a time."""
    variables = model.trainable_variables
    n = len(keras.tree.flatten(x)[0])
    groups = microbatches or n
    size = n // groups
    clipped = []
    for j in range(groups):
        part = slice(j * size, (j + 1) * size)
        xi = keras.tree.map_structure(lambda a, part=part: a[part], x)
        yi = keras.tree.map_structure(lambda a, part=part: a[part], y)
        wi = None if sample_weight is None else sample_weight[part]
        with tf.GradientTape() as tape:
            pred = model(xi, training=True)
            loss = model.compute_loss(x=xi, y=yi, y_pred=pred, sample_weight=wi, training=True)
        grads = tape.gradient(loss, variables)
        grads = [
            np.zeros(v.shape, "float32") if g is None else np.asarray(tf.convert_to_tensor(g))
            for g, v in zip(grads, variables)
        ]
        norm = np.sqrt(sum(float(np.sum(g.astype("float64") ** 2)) for g in grads))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped.append([g * factor for g in grads])
    return [np.mean([c[k] for c in clipped], axis=0) for k in range(len(variables))]


def _per_example_norms(model, x, y):
    norms = []
    for i in range(len(keras.tree.flatten(x)[0])):
        xi = keras.tree.map_structure(lambda a, i=i: a[i : i + 1], x)
        yi = keras.tree.map_structure(lambda a, i=i: a[i : i + 1], y)
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=xi, y=yi, y_pred=model(xi, training=True))
        grads = [g for g in tape.gradient(loss, model.trainable_variables) if g is not None]
        norms.append(np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in grads)))
    return np.array(norms)


def assert_matches_reference(
    model, x, y, loss=None, sample_weight=None, microbatches=None, loss_weights=None
):
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(
            learning_rate=1.0,
            l2_norm_clip=1.0,
            noise_multiplier=0.0,
            num_microbatches=microbatches,
        ),
        loss=loss,
        loss_weights=loss_weights,
    )
    # A clip bound between the per-example norms, so some examples are clipped and some not.
    clip = float(np.median(_per_example_norms(model, x, y)))
    model.optimizer.l2_norm_clip = clip
    keras_safe.privacy.make_private(model)
    before = [np.array(v) for v in model.trainable_variables]
    expected = _reference_update(model, x, y, clip, sample_weight, microbatches)
    model.fit(x, y, sample_weight=sample_weight, batch_size=B, epochs=1, shuffle=False, verbose=0)
    after = [np.array(v) for v in model.trainable_variables]
    for b, a, e, v in zip(before, after, expected, model.trainable_variables):
        np.testing.assert_allclose(b - a, e, atol=1e-5, err_msg=v.path)


def _labels(classes=3):
    return RNG.integers(0, classes, B)


def _seq_classifier(layers, input_shape, dtype="float32"):
    inputs = keras.Input(input_shape, dtype=dtype)
    h = inputs
    for layer in layers:
        h = layer(h)
    if len(h.shape) > 2:
        h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


CASES = {
    "dense": lambda: (
        _seq_classifier([keras.layers.Dense(5, activation="tanh")], (6,)),
        RNG.normal(size=(B, 6)),
    ),
    "dense_on_sequence": lambda: (
        _seq_classifier([keras.layers.Dense(5, activation="relu")], (4, 6)),
        RNG.normal(size=(B, 4, 6)),
    ),
    "dense_long_sequence_gram": lambda: (
        _seq_classifier([keras.layers.Dense(40)], (3, 50)),
        RNG.normal(size=(B, 3, 50)),
    ),
    "einsum_dense": lambda: (
        _seq_classifier(
            [keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3), bias_axes="de")],
            (4, 5),
        ),
        RNG.normal(size=(B, 4, 5)),
    ),
    "conv2d": lambda: (
        _seq_classifier(
            [
                keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
                keras.layers.MaxPool2D(2, 1),
                keras.layers.Conv2D(3, 2, dilation_rate=2),
            ],
            (10, 10, 2),
        ),
        RNG.normal(size=(B, 10, 10, 2)),
    ),
    "conv_many_channels": lambda: (
        _seq_classifier(
            [
                keras.layers.Conv2D(3, 3, strides=2, padding="same"),
                keras.layers.Reshape((5, 15)),
                keras.layers.Conv1D(2, 3, dilation_rate=2),
            ],
            (9, 9, 9),
        ),
        RNG.normal(size=(B, 9, 9, 9)),
    ),
    "conv1d_causal": lambda: (
        _seq_classifier(
            [keras.layers.Conv1D(4, 3, padding="causal"), keras.layers.Conv1D(2, 2, strides=2)],
            (12, 3),
        ),
        RNG.normal(size=(B, 12, 3)),
    ),
    "embedding_repeated_tokens": lambda: (
        _seq_classifier(
            [keras.layers.Embedding(5, 4), keras.layers.GlobalAveragePooling1D()], (7,), "int32"
        ),
        RNG.integers(0, 5, (B, 7)),
    ),
    "layer_normalization": lambda: (
        _seq_classifier([keras.layers.Dense(6), keras.layers.LayerNormalization()], (3, 4)),
        RNG.normal(size=(B, 3, 4)),
    ),
    "group_normalization": lambda: (
        _seq_classifier(
            [keras.layers.Conv2D(4, 3), keras.layers.GroupNormalization(groups=2)], (6, 6, 2)
        ),
        RNG.normal(size=(B, 6, 6, 2)),
    ),
    "lstm": lambda: (
        _seq_classifier([keras.layers.LSTM(4)], (5, 3)),
        RNG.normal(size=(B, 5, 3)),
    ),
    "gru": lambda: (
        _seq_classifier([keras.layers.GRU(3, return_sequences=True)], (4, 2)),
        RNG.normal(size=(B, 4, 2)),
    ),
    "prelu_fallback": lambda: (
        _seq_classifier([keras.layers.Dense(4), keras.layers.PReLU()], (5,)),
        RNG.normal(size=(B, 5)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_clipped_update_matches_one_example_loop(case):
    model, x = CASES[case]()
    assert_matches_reference(model, x.astype(x.dtype), _labels())


def test_multi_head_attention():
    inputs = keras.Input((5, 4))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)(inputs, inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    assert_matches_reference(model, RNG.normal(size=(B, 5, 4)), _labels())


def test_layer_called_twice_shares_one_gradient():
    shared = keras.layers.Dense(4, activation="tanh")
    a, b = keras.Input((3,)), keras.Input((3,))
    merged = keras.layers.Concatenate()([shared(a), shared(b)])
    model = keras.Model([a, b], keras.layers.Dense(2)(merged))
    x = [RNG.normal(size=(B, 3)), RNG.normal(size=(B, 3))]
    assert_matches_reference(model, x, _labels(2))


def test_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(5, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    assert_matches_reference(Net(), RNG.normal(size=(B, 4)), _labels())


def test_sample_weight_and_weighted_multi_output_losses():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    cls = keras.layers.Dense(3, name="cls")(h)
    reg = keras.layers.Dense(1, name="reg")(h)
    model = keras.Model(inputs, {"cls": cls, "reg": reg})
    y = {"cls": _labels(), "reg": RNG.normal(size=(B, 1))}
    assert_matches_reference(
        model,
        RNG.normal(size=(B, 4)),
        y,
        loss={"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True), "reg": "mse"},
        loss_weights={"cls": 1.0, "reg": 0.5},
        sample_weight=RNG.uniform(0.2, 2.0, B),
    )


def test_masked_sequence_outputs():
    ids = RNG.integers(1, 6, (B, 6))
    ids[:, 4:] = 0  # padding, masked by the Embedding
    ids[0, 2:] = 0
    inputs = keras.Input((6,), dtype="int32")
    h = keras.layers.Embedding(6, 4, mask_zero=True)(inputs)
    h = keras.layers.LSTM(3, return_sequences=True)(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    y = RNG.integers(0, 2, (B, 6))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert_matches_reference(model, ids, y, loss=loss)


@pytest.mark.parametrize("reduction", ["sum", "sum_over_batch_size", "mean"])
def test_loss_objects_with_any_reduction(reduction):
    model = _seq_classifier([keras.layers.Dense(4)], (5,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
    assert_matches_reference(model, RNG.normal(size=(B, 5)), _labels(), loss=loss)


def test_loss_function_returning_per_example_values():
    def my_loss(y_true, y_pred):
        return tf.reduce_mean(tf.abs(y_true - y_pred), axis=-1)

    model = _seq_classifier([keras.layers.Dense(4)], (5,))
    assert_matches_reference(model, RNG.normal(size=(B, 5)), RNG.normal(size=(B, 3)), loss=my_loss)


def test_microbatches_clip_each_microbatch_mean():
    model = _seq_classifier([keras.layers.Dense(5, activation="tanh")], (6,))
    assert_matches_reference(model, RNG.normal(size=(B, 6)), _labels(), microbatches=4)


def test_microbatches_on_the_jacobian_path():
    model = _seq_classifier([keras.layers.SimpleRNN(3)], (4, 2))
    assert_matches_reference(model, RNG.normal(size=(B, 4, 2)), _labels(), microbatches=2)


def test_jacobian_path_agrees_with_taps():
    model = CASES["conv2d"]()[0]
    x = RNG.normal(size=(B, 10, 10, 2)).astype("float32")
    y = _labels()
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(1.0, l2_norm_clip=0.5, noise_multiplier=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    loss_fn = keras_safe.privacy.losses.PerExampleLoss(model)

    def forward():
        pred = model(x, training=True)
        return loss_fn(y, pred), pred

    per_example = keras_safe.privacy.per_example
    variables = model.trainable_variables
    tapped, _, _, tapped_norms = per_example.clipped_gradient_sum(model, variables, forward, 0.5)
    full, _, _, full_norms = per_example.clipped_gradient_sum(
        model, variables, forward, 0.5, use_taps=False
    )
    np.testing.assert_allclose(tapped_norms, full_norms, rtol=1e-4)
    for a, b in zip(tapped, full):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_scalar_loss_function_is_refused():
    model = _seq_classifier([keras.layers.Dense(4)], (5,))
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(0.1, l2_norm_clip=1.0, noise_multiplier=1.0),
        loss=lambda y_true, y_pred: tf.reduce_mean(tf.square(y_true - y_pred)),
    )
    keras_safe.privacy.make_private(model)
    with pytest.raises(ValueError, match="per example"):
        model.fit(RNG.normal(size=(B, 5)), RNG.normal(size=(B, 3)), verbose=0)


def test_jacobian_falls_back_to_a_loop_when_pfor_cannot_vectorize():
    variable = tf.Variable([1.0, 2.0])
    x = tf.constant([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    calls = []

    class RefusingTape(tf.GradientTape):
        def jacobian(self, target, sources, experimental_use_pfor=True, **kwargs):
            calls.append(experimental_use_pfor)
            if experimental_use_pfor:
                raise ValueError("pfor cannot convert this op")
            return super().jacobian(
                target, sources, experimental_use_pfor=experimental_use_pfor, **kwargs
            )

    with RefusingTape(persistent=True) as tape:
        losses = tf.reduce_sum(tf.square(x * variable), axis=1)
    (jac,) = keras_safe.privacy.per_example._jacobian(tape, losses, [variable])
    assert calls == [True, False]
    # d/dv sum((x v)^2) = 2 x^2 v, one row per example.
    np.testing.assert_allclose(jac, 2 * x.numpy() ** 2 * variable.numpy(), rtol=1e-6)


def test_einsum_dense_bias_on_some_of_the_trailing_axes():
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 2, 3), bias_axes="d")
    model = _seq_classifier([layer], (4, 5))
    assert_matches_reference(model, RNG.normal(size=(B, 4, 5)), _labels())


def test_batch_folded_into_rows_is_still_clipped_per_example():
    # Each example's 8 rows go through one Dense as 8 batch rows: the taps must not clip
    # each row on its own (that would let one example move the weights by 8 C).
    inputs = keras.Input((8, 5))
    rows = keras.ops.reshape(inputs, (-1, 5))
    out = keras.ops.reshape(keras.layers.Dense(3)(rows), (-1, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.ops.mean(out, axis=1)))
    assert_matches_reference(model, RNG.normal(size=(B, 8, 5)), _labels())


def test_tied_embedding_used_as_output_projection():
    class Tied(keras.Model):
        def __init__(self):
            super().__init__()
            self.embedding = keras.layers.Embedding(5, 3)
            self.hidden = keras.layers.Dense(3, activation="tanh")

        def call(self, ids):
            h = self.hidden(keras.ops.mean(self.embedding(ids), axis=1))
            return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))

    x = RNG.integers(0, 5, (B, 4))
    assert_matches_reference(Tied(), x, RNG.integers(0, 5, B))


def test_dense_inside_a_recurrent_cell():
    class Cell(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.state_size = 4
            self.dense = keras.layers.Dense(4, activation="tanh")

        def call(self, inputs, states):
            h = self.dense(keras.ops.concatenate([inputs, states[0]], axis=-1))
            return h, [h]

    model = _seq_classifier([keras.layers.RNN(Cell())], (3, 2))
    assert_matches_reference(model, RNG.normal(size=(B, 3, 2)), _labels())


@pytest.mark.parametrize(
    "layer",
    [lambda: keras.layers.LSTM(4), lambda: keras.layers.GRU(3), lambda: keras.layers.SimpleRNN(3)],
    ids=["lstm", "gru", "simple_rnn"],
)
def test_recurrent_layers_use_cell_taps_not_the_jacobian(layer, monkeypatch):
    def no_jacobian(*args, **kwargs):
        raise AssertionError("the per-example Jacobian should not be needed")

    monkeypatch.setattr(keras_safe.privacy.per_example, "_jacobian", no_jacobian)
    model = _seq_classifier([layer()], (5, 3))
    assert_matches_reference(model, RNG.normal(size=(B, 5, 3)), _labels())


def test_a_non_finite_example_is_dropped_not_spread_over_the_step():
    x = RNG.normal(size=(B, 6))
    y = _labels()
    model = CASES["dense"]()[0]
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(1.0, l2_norm_clip=0.5, noise_multiplier=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras_safe.privacy.make_private(model)
    before = [np.array(v) for v in model.trainable_variables]
    # The reference: the other examples' clipped gradients, divided by the full batch size.
    expected = _reference_update(model, x[1:], y[1:], 0.5)
    bad = x.copy()
    bad[0, 0] = np.nan
    model.fit(bad, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    for b, a, e in zip(before, model.trainable_variables, expected):
        np.testing.assert_allclose(b - np.array(a), e * (B - 1) / B, atol=1e-5)


def test_a_trainable_variable_the_loss_does_not_use():
    class Unused(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(2,), initializer="ones")

        def call(self, x):
            return x

    model = _seq_classifier([keras.layers.Dense(4), Unused()], (5,))
    assert_matches_reference(model, RNG.normal(size=(B, 5)), _labels())
