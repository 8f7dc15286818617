"""The independence analysis against an empirical oracle, op family by op family.

For every computation below the test traces it, asks `keras_safe.privacy.independence` where
the examples lie in its output, and checks the answer by running it: replacing example j of
the batch may only move the output entries the analysis assigns to example j. Computations that
mix examples must come out `Mixed`, and the oracle shows that they do mix, so each case is an
attack the analysis must catch, not only a case it must accept.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe.privacy.independence.analysis import Analysis
from keras_safe.privacy.independence.values import Mixed, Rows

B = 4
RNG = np.random.default_rng(0)


def _analyse(fn, shape, static_batch, dtype="float32"):
    spec = tf.TensorSpec([B if static_batch else None, *shape], dtype)
    graph = tf.function(fn).get_concrete_function(spec).graph
    analysis = Analysis(B if static_batch else None)
    analysis.set(graph.inputs[0], Rows(0))
    analysis.run(graph.get_operations())
    return analysis.value(graph.outputs[0])


def _owner(value, shape):
    """For every output entry, the example it belongs to under `value` (a `Rows`)."""
    index = np.indices(shape)[value.axis]
    return (index // value.inner) % B


def _moved(fn, x, j, value=None):
    y = np.asarray(fn(tf.constant(x)))
    other = x.copy()
    if value is not None:
        other[j] = value
    elif x.dtype.kind == "f":
        other[j] = RNG.normal(size=x.shape[1:]).astype(x.dtype)
    else:
        other[j] = RNG.integers(1, 9, size=x.shape[1:]).astype(x.dtype)
    changed = np.asarray(fn(tf.constant(other)))
    return y, ~np.isclose(y, changed, rtol=1e-6, atol=1e-7)


def _check_rowwise(fn, shape, dtype="float32"):
    x = RNG.normal(size=(B, *shape)) if dtype == "float32" else RNG.integers(1, 9, (B, *shape))
    x = x.astype(dtype)
    for static_batch in (True, False):
        value = _analyse(fn, shape, static_batch, dtype)
        assert isinstance(value, Rows), (static_batch, value)
        for j in range(B):
            y, moved = _moved(fn, x, j)
            assert moved.any()
            owners = _owner(value, y.shape)
            assert np.all(owners[moved] == j), (value, j)


def _check_mixing(fn, shape):
    x = RNG.normal(size=(B, *shape)).astype("float32")
    # The oracle: changing example 0 (to large values, so that thresholds flip) moves an output
    # row that is not row 0 (the output of each case keeps B rows on its first axis), or an
    # output without rows.
    y, moved = _moved(fn, x, 0, value=1000.0)
    assert moved.any()
    rows = moved.reshape(moved.shape[0], -1).any(axis=1) if moved.ndim else np.array([True])
    assert moved.ndim == 0 or moved.shape[0] != B or rows[1:].any()
    for static_batch in (True, False):
        value = _analyse(fn, shape, static_batch)
        assert isinstance(value, Mixed), (static_batch, value)


# -- row-wise computations: the analysis must accept them, with the right layout -------------------

L = keras.layers
_dense = L.Dense(3)
_dense3 = L.Dense(5)
_conv = L.Conv2D(2, 3, padding="same")
_conv1 = L.Conv1D(3, 2, dilation_rate=2)
_depthwise = L.DepthwiseConv2D(3)
_embedding = L.Embedding(10, 4)
_mha = L.MultiHeadAttention(2, 3)
_layer_norm = L.LayerNormalization()
_group_norm = L.GroupNormalization(2)
_lstm = L.LSTM(3, return_sequences=True)
_gru = L.GRU(2)
_pool = L.MaxPooling2D()
_flatten = L.Flatten()

ROW_WISE = {
    "dense": (lambda x: _dense(x), (6,)),
    "dense on sequences (tensordot)": (lambda x: _dense3(x), (7, 6)),
    "conv": (lambda x: _pool(_conv(x)), (6, 6, 2)),
    "dilated conv1d": (lambda x: _conv1(x), (9, 2)),
    "depthwise": (lambda x: _depthwise(x), (5, 5, 2)),
    "flatten": (lambda x: _flatten(x), (3, 4, 2)),
    "attention": (lambda x: _mha(x, x), (5, 6)),
    "layer norm": (lambda x: _layer_norm(x), (5, 6)),
    "group norm": (lambda x: _group_norm(x), (4, 4)),
    "lstm": (lambda x: _lstm(x), (5, 3)),
    "gru": (lambda x: _gru(x), (5, 3)),
    "fold time into batch": (
        lambda x: tf.reshape(tf.reshape(x, [-1, 3]) * 2.0, tf.shape(x)),
        (4, 3),
    ),
    "transpose": (lambda x: tf.transpose(x, [1, 0, 2]), (3, 2)),
    "slice features": (lambda x: x[:, 1:] - x[:, :-1], (5,)),
    "last time step": (lambda x: x[..., -1, :], (4, 3)),
    "concat batch twice (clean and perturbed)": (lambda x: tf.concat([x, x * 2.0], 0), (3,)),
    "split it back": (lambda x: tf.split(tf.concat([x, x + 1.0], 0), 2)[1], (3,)),
    "softmax": (lambda x: tf.nn.softmax(x), (5,)),
    "top-k per example": (lambda x: tf.math.top_k(x, 2).values, (5,)),
    "cumsum over time": (lambda x: tf.cumsum(x, axis=1), (5,)),
    "pairwise per example": (lambda x: x[:, :, None] - x[:, None, :], (4,)),
    "cond on a constant": (lambda x: tf.cond(tf.constant(True), lambda: x * 2.0, lambda: x), (3,)),
    "while over time": (
        lambda x: tf.while_loop(lambda i, h: i < 4, lambda i, h: (i + 1, h * 0.5 + x), (0, x))[1],
        (3,),
    ),
    "tile features": (lambda x: tf.tile(x, [1, 2]), (3,)),
    "softmax cross-entropy (flattens outer axes)": (
        lambda x: tf.nn.softmax_cross_entropy_with_logits(tf.nn.softmax(x), x * 2.0),
        (5,),
    ),
    "sparse cross-entropy on sequences": (
        lambda x: tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.zeros(tf.shape(x)[:2], tf.int32), x
        ),
        (4, 3),
    ),
    "one hot": (
        lambda x: tf.one_hot(tf.cast(tf.abs(x[:, 0]) * 9, tf.int32) % 4, 4) * x[:, 1:],
        (2,),
    ),
}


@pytest.mark.parametrize("name", sorted(ROW_WISE))
def test_row_wise_computations_are_accepted_with_their_layout(name):
    fn, shape = ROW_WISE[name]
    _check_rowwise(fn, shape)


def test_embedding_lookup_is_row_wise():
    _check_rowwise(lambda x: _embedding(x), (3,), dtype="int32")


# -- computations that mix examples: the analysis must refuse them --------------------------------

MIXING = {
    "batch mean": (lambda x: x - tf.reduce_mean(x, axis=0), (3,)),
    "batch norm statistics": (lambda x: x - tf.nn.moments(x, [0])[0], (3,)),
    "roll over the batch": (lambda x: x + tf.roll(x, 1, axis=0), (3,)),
    "sort over the batch": (lambda x: tf.sort(x, axis=0), (3,)),
    "reverse the batch": (lambda x: tf.reverse(x, [0]), (3,)),
    "gather other examples": (lambda x: tf.gather(x, [1, 0, 3, 2]), (3,)),
    "in-batch similarities (contrastive)": (lambda x: tf.matmul(x, x, transpose_b=True), (3,)),
    "softmax over the batch": (lambda x: tf.nn.softmax(x, axis=0), (3,)),
    "cumulative over the batch": (lambda x: tf.cumsum(x, axis=0), (3,)),
    "fold examples together": (lambda x: tf.reshape(x, [-1, 6]), (3,)),
    "first example broadcast": (lambda x: x - x[0], (3,)),
    "drop the first example": (lambda x: tf.concat([x[1:], x[:1]], 0), (3,)),
    "cond on the data": (
        lambda x: tf.cond(tf.reduce_max(x) > 100.0, lambda: x * 2.0, lambda: x),
        (3,),
    ),
    "mixing in the else branch": (
        lambda x: tf.cond(tf.shape(x)[0] < 2, lambda: x, lambda: x - tf.reduce_mean(x, 0)),
        (3,),
    ),
    "mix in a while loop": (
        lambda x: tf.while_loop(
            lambda i, h: i < 2, lambda i, h: (i + 1, h + tf.reduce_mean(h, 0)), (0, x)
        )[1],
        (3,),
    ),
    "einsum over the batch": (lambda x: tf.einsum("bi,bj->ij", x, x), (3,)),
    "mixup permutation": (
        lambda x: 0.7 * x + 0.3 * tf.gather(x, tf.random.shuffle(tf.range(B))),
        (3,),
    ),
}


@pytest.mark.parametrize("name", sorted(MIXING))
def test_mixing_computations_are_refused(name):
    fn, shape = MIXING[name]
    _check_mixing(fn, shape)


def test_an_unknown_op_on_the_data_counts_as_mixing():
    def py(x):
        out = tf.numpy_function(lambda a: a[::-1].copy(), [x], tf.float32)
        out.set_shape(x.shape)
        return out

    assert isinstance(_analyse(py, (3,), True), Mixed)


def test_a_write_from_the_data_is_recorded():
    state = tf.Variable(tf.zeros([3]))

    def running_mean(x):
        state.assign(tf.reduce_mean(x, 0))
        return x * 2.0

    spec = tf.TensorSpec([None, 3])
    graph = tf.function(running_mean).get_concrete_function(spec).graph
    analysis = Analysis()
    analysis.set(graph.inputs[0], Rows(0))
    analysis.run(graph.get_operations())
    assert [op.type for op, _ in analysis.writes] == ["AssignVariableOp"]
    # A write of something that is not the data is not.
    counter = tf.Variable(0)
    graph = (
        tf.function(lambda x: (counter.assign_add(1), x * 2.0)[1]).get_concrete_function(spec).graph
    )
    analysis = Analysis()
    analysis.set(graph.inputs[0], Rows(0))
    analysis.run(graph.get_operations())
    assert analysis.writes == []


_GENERATOR = tf.random.Generator.from_seed(1)


@pytest.mark.parametrize(
    "draw, mixing",
    [
        (lambda: next(iter(tf.data.Dataset.from_tensors(tf.ones([3])))), True),
        (lambda: tf.random.uniform([3]), False),
        (lambda: _GENERATOR.normal([3]), False),
        (lambda: tf.random.gamma([3], 2.0), False),
        (lambda: tf.random.shuffle(tf.range(3.0)), False),
    ],
    ids=[
        "the_next_element_of_an_iterator",
        "a_random_draw",
        "a_generator_draw",
        "a_gamma_draw",
        "a_shuffled_constant",
    ],
)
def test_what_a_stateful_op_reads_from_state_counts_as_mixing_unless_a_random_draw(draw, mixing):
    # A layer could pull the next batch from the iterator that feeds `fit`: values a stateful op
    # returns without reading the data are data as far as the proof can tell.
    spec = tf.TensorSpec([None, 3], tf.float32)
    graph = tf.function(lambda x: x + draw()).get_concrete_function(spec).graph
    analysis = Analysis()
    analysis.set(graph.inputs[0], Rows(0))
    analysis.run(graph.get_operations())
    assert isinstance(analysis.value(graph.outputs[0]), Mixed) is mixing


def _chunked_graph(chunk_forward, stage=lambda t: t * 2.0):
    """A step that stages a batch of 8 rows and cuts it into two chunks of 4, as a
    `physical_batch_size` step does: `(inputs, staged, staged_ops, step_ops, chunks)`;
    `chunk_forward(rows, x, staged, previous)` gets the previous chunk's rows (or None)."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [8, 3])
        staged = stage(x)
        cut = len(graph.get_operations())
        chunks, previous = [], None
        for start in (0, 4):
            rows = staged[start : start + 4]
            first = len(graph.get_operations())
            losses = chunk_forward(rows, x, staged, previous)
            previous = tf.tanh(rows)
            chunks.append((rows, losses, graph.get_operations()[first:]))
        return x, staged, graph.get_operations()[:cut], graph.get_operations(), chunks


def _refusal(chunk_forward, **kwargs):
    from keras_safe._validation import PrivacyError
    from keras_safe.privacy.independence import check_chunked_step

    inputs, staged, staged_ops, step_ops, chunks = _chunked_graph(chunk_forward, **kwargs)
    try:
        check_chunked_step(inputs, staged, staged_ops, step_ops, chunks)
    except PrivacyError as error:
        return str(error)
    return None


def test_chunks_whose_rows_stay_apart_pass():
    assert _refusal(lambda rows, x, staged, previous: tf.reduce_sum(tf.tanh(rows), axis=1)) is None


@pytest.mark.parametrize(
    "forward",
    [
        lambda rows, x, staged, previous: tf.reduce_sum(rows, axis=1) - tf.reduce_mean(rows),
        lambda rows, x, staged, previous: tf.reduce_sum(rows, axis=1) + tf.reduce_sum(x),
        lambda rows, x, staged, previous: tf.reduce_sum(rows, axis=1) + tf.reduce_sum(staged[4:]),
        lambda rows, x, staged, previous: tf.reduce_sum(rows[::-1], axis=1),
        lambda rows, x, staged, previous: tf.reduce_sum(
            rows if previous is None else rows + previous, axis=1
        ),
    ],
    ids=[
        "mixes_its_rows",
        "reads_the_batch",
        "reads_the_staged_batch",
        "reverses_its_rows",
        "reads_the_previous_chunk",
    ],
)
def test_a_chunk_that_mixes_or_reads_beyond_its_rows_is_refused(forward):
    assert "stay apart" in _refusal(forward)


def _looped_refusal(chunk_forward):
    """As `_refusal`, with the chunks in the body of a `tf.while_loop` (how a step traces them):
    `chunk_forward(rows, x, staged, carried, free)` also gets what the loop carries from one
    chunk to the next and a data-free tensor of the step's graph."""
    from keras_safe._validation import PrivacyError
    from keras_safe.privacy.independence import check_chunked_step

    found = {}

    def step(x):
        graph = tf.compat.v1.get_default_graph()
        staged = x * 2.0
        cut = len(graph.get_operations())
        free = tf.range(3.0)
        chunks = []

        def body(i, carried):
            rows = tf.ensure_shape(tf.slice(staged, tf.stack([i * 4, 0]), [4, -1]), [4, 3])
            inner = tf.compat.v1.get_default_graph()
            first = len(inner.get_operations())
            losses = chunk_forward(rows, x, staged, carried, free)
            chunks.append((rows, losses, inner.get_operations()[first:]))
            return i + 1, carried + losses

        tf.while_loop(lambda i, carried: i < 2, body, (0, tf.zeros([4])))
        ops = graph.get_operations()
        try:
            check_chunked_step(x, staged, ops[:cut], ops, chunks)
        except PrivacyError as error:
            found["refusal"] = str(error)
        return x

    tf.function(step).get_concrete_function(tf.TensorSpec([8, 3]))
    return found.get("refusal")


def test_chunks_in_a_loop_whose_rows_stay_apart_pass():
    assert _looped_refusal(lambda rows, x, staged, carried, free: tf.reduce_sum(rows, 1)) is None
    weighted = lambda rows, x, staged, carried, free: tf.linalg.matvec(rows, free)  # noqa: E731
    assert _looped_refusal(weighted) is None


@pytest.mark.parametrize(
    "forward",
    [
        lambda rows, x, staged, carried, free: tf.reduce_sum(rows, 1) - tf.reduce_mean(rows),
        lambda rows, x, staged, carried, free: tf.reduce_sum(rows, 1) + tf.reduce_sum(x),
        lambda rows, x, staged, carried, free: tf.reduce_sum(rows, 1) + staged[:4, 0],
        lambda rows, x, staged, carried, free: tf.reduce_sum(rows, 1) + carried,
    ],
    ids=["mixes_its_rows", "reads_the_batch", "reads_the_staged_batch", "reads_the_loops_sums"],
)
def test_a_chunk_in_a_loop_that_reads_beyond_its_rows_is_refused(forward):
    assert "stay apart" in _looped_refusal(forward)


def test_a_stage_that_mixes_the_batch_before_the_cut_is_refused():
    found = _refusal(
        lambda rows, x, staged, previous: tf.reduce_sum(rows, axis=1),
        stage=lambda t: t - tf.reduce_mean(t, axis=0),
    )
    assert "the data the chunks are cut from" in found


def test_losses_made_outside_the_ops_read_are_refused():
    # Ops outside the list count as constants: losses the list does not make would pass as
    # constants whatever they depend on (how the chunks of a batch once went unchecked).
    from keras_safe._validation import PrivacyError
    from keras_safe.privacy.independence import check_step

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [8, 3])
        losses = tf.reduce_sum(x - tf.reduce_mean(x, axis=0), axis=1)
        with pytest.raises(PrivacyError, match="outside the forward pass"):
            check_step(x, losses, [])
        check_step(x, tf.reduce_sum(x, axis=1) * 0.0, graph.get_operations()[-3:])
