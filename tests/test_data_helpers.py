"""keras_safe._data: conversion to numpy, row selection, example checks, descriptions."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_safe import _data
from keras_safe._validation import ArgumentError


def test_to_numpy_reads_every_supported_source_the_same():
    x = np.arange(12.0).reshape(6, 2)
    sources = [
        x,
        x.tolist(),
        tf.constant(x, tf.float32),
        pd.DataFrame(x, columns=["a", "b"]),
        tf.data.Dataset.from_tensor_slices(x),  # unbatched
        tf.data.Dataset.from_tensor_slices((x, np.zeros(6))).batch(4),  # (x, y), batched
        (batch for batch in (x[:2], x[2:])),  # an iterable of batches
    ]
    for data in sources:
        array, names = _data.to_numpy(data)
        assert array.dtype == np.float64
        np.testing.assert_array_equal(array, x)
    assert _data.to_numpy(pd.DataFrame(x, columns=["a", "b"]))[1] == ["a", "b"]
    series = pd.Series([1.0, None, 3.0], name="age")
    array, names = _data.to_numpy(series)
    assert array.shape == (3, 1) and np.isnan(array[1, 0]) and names == ["age"]
    nullable = pd.DataFrame({"a": pd.array([1, None], dtype="Int64")})
    assert np.isnan(_data.to_numpy(nullable)[0][1, 0])


def test_to_numpy_errors_name_the_argument_and_the_fix():
    cases = [
        (pd.DataFrame({"a": ["x"]}), "`rows` must be numeric in every column"),
        (pd.Series(["x", "y"]), "`rows` must be numeric in every column, got a Series"),
        (np.array(["a", "b"]), "`rows` must be numeric, got a str32 array of shape \\(2,\\)"),
        (np.arange(3.0), r"`rows` must be of shape \(rows, features\).*x.reshape\(-1, 1\)"),
        (iter([]), "`rows` must be non-empty"),
        (3, "`rows` must be a numpy array, a tensor"),
        (tf.data.Dataset.from_tensor_slices({"a": [1.0]}), "`rows` must be a dataset of arrays"),
    ]
    for data, match in cases:
        with pytest.raises(ArgumentError, match=match):
            _data.to_numpy(data, "rows")


def test_take_rows_keeps_the_type_and_take_inputs_follows_structures():
    frame = pd.DataFrame({"a": [1, 2, 3]}, index=[10, 20, 30])
    picked = _data.take_rows(frame, [2, 0])
    assert isinstance(picked, pd.DataFrame) and picked.index.tolist() == [30, 10]
    assert _data.take_rows([[1], [2], [3]], [1]).tolist() == [[2]]
    assert _data.take_rows(None, [0]) is None
    inputs = {"image": np.arange(8).reshape(4, 2), "age": np.arange(4)}
    taken = _data.take_inputs(inputs, np.array([3, 1]))
    assert taken["image"].tolist() == [[6, 7], [2, 3]] and taken["age"].tolist() == [3, 1]
    joined = _data.concatenate_inputs([taken, _data.take_inputs(inputs, [0])])
    assert joined["age"].tolist() == [3, 1, 0]
    assert _data.num_examples(inputs) == 4 and _data.num_examples([np.zeros((2, 3))]) == 2
    with pytest.raises(ArgumentError, match="`x` must be an array of examples"):
        _data.num_examples({})


def test_check_examples():
    x = np.zeros((3, 2))
    x_out, y, w = _data.check_examples("members", (x, [0, 1, 0], [1.0, 2.0, 0.5]))
    assert x_out is x and y.tolist() == [0, 1, 0] and w.tolist() == [1.0, 2.0, 0.5]
    assert _data.check_examples("members", [x, np.ones(3)])[2] is None
    cases = [
        (x, "`members` must be a pair \\(x, y\\) or a triple"),
        ((x, None), "with labels y"),
        ((x, [0, 1]), "labelled with one label per input, got 3 inputs and 2 labels"),
        ((x[:0], []), "`members` must be non-empty"),
        ((x, [0, 1, 0], [1.0, np.nan, 1.0]), "one finite sample weight per example"),
        ((x, [0, 1, 0], [1.0]), "one finite sample weight per example"),
    ]
    for examples, match in cases:
        with pytest.raises(ArgumentError, match=match):
            _data.check_examples("members", examples)
    with pytest.raises(ArgumentError, match="must be a pair \\(x, y\\) of inputs"):
        _data.check_examples("data", (x, [0, 1, 0], [1.0] * 3), allow_weights=False)


def test_describe_and_length():
    assert repr(_data.describe(pd.DataFrame(np.zeros((2, 3))))) == "a DataFrame of shape (2, 3)"
    assert repr(_data.describe(tf.zeros((1, 2)))) == "a float32 tensor of shape (1, 2)"
    assert repr(_data.describe(None)) == "None"
    assert repr(_data.describe({"a": 1}, "with extra")) == "a dict with extra"
    assert _data.length(pd.Series([1, 2])) == 2
    with pytest.raises(ArgumentError, match="`y` must be an array"):
        _data.length(5, "y")
    assert _data.is_pandas(pd.Series([1])) and not _data.is_pandas(np.zeros(1))
    assert _data.features_of((1, 2)) == 1 and _data.features_of(3) == 3
    assert _data.to_array(pd.Series([1, 2])).tolist() == [1, 2] and _data.to_array(None) is None
