"""Data helpers shared by every keras_safe function that takes user data.

What is here: pandas detection without importing pandas, conversion of tables (arrays, tensors,
DataFrames, `tf.data` datasets) to one float64 numpy array, row selection that keeps a
DataFrame a DataFrame, the same for the nested inputs of multi-input models, the checks of
`(x, y)` / `(x, y, sample_weight)` example tuples, and short descriptions of data for error
messages (a data set is described by its type and shape, never printed).

A foundation module: it imports numpy, keras, tensorflow and `keras_safe._validation` only.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import fail

__all__ = [
    "Description",
    "check_examples",
    "concatenate_inputs",
    "describe",
    "features_of",
    "is_dataframe",
    "is_pandas",
    "is_series",
    "length",
    "num_examples",
    "take_inputs",
    "take_rows",
    "to_array",
    "to_numpy",
]


def is_dataframe(data):
    """Whether `data` is a pandas DataFrame (pandas itself is not imported).

    Example:
        >>> import numpy as np
        >>> is_dataframe(np.zeros((2, 2)))
        False
    """
    return type(data).__name__ == "DataFrame" and hasattr(data, "iloc")


def is_series(data):
    """Whether `data` is a pandas Series (pandas itself is not imported)."""
    return type(data).__name__ == "Series" and hasattr(data, "iloc")


def is_pandas(data):
    """Whether `data` is a pandas DataFrame or Series."""
    return is_dataframe(data) or is_series(data)


class Description:
    """A short description of a value for error messages: its `repr` is the text itself.

    `keras_safe._validation.fail` prints the value it is given with `repr`; passing a
    `Description` instead of a data set keeps the message to one readable line.
    """

    def __init__(self, text):
        self.text = str(text)

    def __repr__(self):
        return self.text


def describe(data, detail=None):
    """A `Description` of `data` by type and shape (for error messages), plus `detail`.

    Example:
        >>> import numpy as np
        >>> describe(np.zeros((0, 3)))
        a float64 array of shape (0, 3)
        >>> describe([1, 2], "with two values")
        a list of length 2 with two values
    """
    if isinstance(data, Description):
        text = data.text
    elif is_pandas(data):
        text = f"a {type(data).__name__} of shape {tuple(data.shape)}"
    elif hasattr(data, "shape") and hasattr(data, "dtype"):
        kind = "array" if isinstance(data, np.ndarray) else "tensor"
        dtype = getattr(data.dtype, "name", data.dtype)
        text = f"a {dtype} {kind} of shape {tuple(data.shape)}"
    elif isinstance(data, tf.data.Dataset):
        text = "a tf.data.Dataset"
    elif isinstance(data, (list, tuple)):
        text = f"a {type(data).__name__} of length {len(data)}"
    elif data is None:
        text = "None"
    else:
        text = f"a {type(data).__name__}"
    return Description(f"{text} {detail}" if detail else text)


def features_of(element):
    """The features of a dataset element `x`, `(x, y)` or `(x, y, sample_weight)`."""
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def to_numpy(data, name="data"):
    """Materialises a table as a float64 numpy array with the rows on the first axis.

    Args:
        data: numpy array, tensor, pandas DataFrame or Series, nested list, `tf.data.Dataset`
            (batched or not; elements `x`, `(x, y)` or `(x, y, w)`, of which only `x` is
            read), or an iterable of such batches.
        name: the argument's name, for error messages.

    Returns:
        `(array, feature_names)`: `feature_names` lists the columns of a DataFrame (the name
        of a Series), else None.

    Raises:
        ArgumentError: unsupported or non-numeric data, an empty iterable, or data without a
            feature axis.

    Example:
        >>> array, names = to_numpy([[1, 2], [3, 4]])
        >>> array.dtype.name, array.shape, names
        ('float64', (2, 2), None)
    """
    names = None
    if is_pandas(data):
        names = [str(c) for c in data.columns] if is_dataframe(data) else [str(data.name)]
        try:
            array = data.to_numpy(dtype="float64", na_value=np.nan)
        except (TypeError, ValueError) as err:
            fail(
                name,
                describe(data),
                "numeric in every column",
                f"encode categorical columns first ({err}).",
            )
        array = array.reshape(-1, 1) if is_series(data) else array
    elif isinstance(data, tf.data.Dataset):
        spec = features_of(data.element_spec)
        if isinstance(spec, dict):
            fail(
                name,
                describe(data, "of dicts"),
                "a dataset of arrays or of (x, y) tuples",
                "map its elements to arrays first.",
            )
        unbatched = len(spec.shape) == 1
        chunks = []
        for element in data.as_numpy_iterator():
            x = np.asarray(features_of(element), dtype="float64")
            chunks.append(x[None] if unbatched else x)
        if not chunks:
            return np.zeros((0, spec.shape[-1] or 0)), None
        array = np.concatenate(chunks, axis=0)
    elif isinstance(data, np.ndarray) or tf.is_tensor(data) or isinstance(data, (list, tuple)):
        try:
            array = np.asarray(data, dtype="float64")
        except (TypeError, ValueError) as err:
            fail(name, describe(data), "numeric", f"convert or encode the values first ({err}).")
    elif hasattr(data, "__iter__"):
        chunks = [np.asarray(features_of(batch), dtype="float64") for batch in data]
        if not chunks:
            fail(name, describe(data, "without any batch"), "non-empty", "pass the rows.")
        array = np.concatenate(chunks, axis=0)
    else:
        fail(
            name,
            describe(data),
            "a numpy array, a tensor, a pandas DataFrame or Series, or a tf.data.Dataset",
            "convert the data to one of these.",
        )
    if array.ndim < 2:
        fail(
            name,
            describe(array),
            "of shape (rows, features)",
            "for a single feature use x.reshape(-1, 1).",
        )
    return array, names


def to_array(data):
    """`data` as a numpy array (pandas objects through `to_numpy()`), or None for None."""
    if data is None:
        return None
    if is_pandas(data):
        return data.to_numpy()
    return np.asarray(data)


def length(data, name="data"):
    """Number of rows of an array-like, a DataFrame or a Series.

    Raises:
        ArgumentError: if `data` has no length.
    """
    try:
        return len(data)
    except TypeError:
        fail(
            name,
            describe(data),
            "an array, a DataFrame or a tf.data.Dataset",
            "pass the rows as an array.",
        )


def take_rows(data, index):
    """Rows `index` of an array-like or a pandas object (which stays a pandas object).

    Example:
        >>> import numpy as np
        >>> take_rows(np.arange(5), [0, 4]).tolist()
        [0, 4]
    """
    if data is None:
        return None
    if is_pandas(data):
        return data.iloc[index]
    return np.asarray(data)[index]


def num_examples(x, name="x"):
    """Number of examples of model inputs: an array, or a list / dict of arrays.

    Raises:
        ArgumentError: if `x` holds no array.

    Example:
        >>> import numpy as np
        >>> num_examples({"image": np.zeros((4, 2)), "age": np.zeros(4)})
        4
    """
    leaves = keras.tree.flatten(x)
    if not leaves:
        fail(
            name, describe(x), "an array of examples (or a structure of arrays)", "pass the inputs."
        )
    return int(np.shape(leaves[0])[0])


def take_inputs(x, index):
    """Rows `index` of model inputs (an array, or a nested structure of arrays)."""
    return keras.tree.map_structure(lambda leaf: take_rows(leaf, index), x)


def concatenate_inputs(parts):
    """Concatenates model inputs (arrays or equally nested structures of them) along axis 0."""
    return keras.tree.map_structure(lambda *leaves: np.concatenate(leaves, axis=0), *parts)


def check_examples(name, examples, allow_weights=True):
    """Checks labelled examples `(x, y)` or `(x, y, sample_weight)`.

    Args:
        name: the argument's name, for error messages.
        examples: the tuple; `x` is an array or a structure of arrays (multi-input models).
        allow_weights: whether a third element, one weight per example, is accepted.

    Returns:
        `(x, y, sample_weight)` with `y` a numpy array and `sample_weight` a float array or None.

    Raises:
        ArgumentError: not a pair (or triple), no labels, lengths that differ, or no example.

    Example:
        >>> import numpy as np
        >>> x, y, w = check_examples("members", (np.zeros((3, 2)), [0, 1, 1]))
        >>> y.tolist(), w
        ([0, 1, 1], None)
    """
    shape = "a pair (x, y)" + (" or a triple (x, y, sample_weight)" if allow_weights else "")
    if not isinstance(examples, (tuple, list)) or len(examples) not in (
        (2, 3) if allow_weights else (2,)
    ):
        fail(name, describe(examples), f"{shape} of inputs and labels", f"pass {name}=(x, y).")
    x, y = examples[0], examples[1]
    weights = examples[2] if len(examples) == 3 else None
    if y is None:
        fail(name, Description("(x, None)"), f"{shape} with labels y", f"pass {name}=(x, y).")
    y = np.asarray(y)
    n = num_examples(x, name)
    if n != len(y):
        fail(
            name,
            Description(f"{n} inputs and {len(y)} labels"),
            "labelled with one label per input",
            "pass one label per example.",
        )
    if n == 0:
        fail(name, Description("no example"), "non-empty", "pass at least one example.")
    if weights is not None:
        weights = np.asarray(weights, dtype="float64")
        if weights.shape[:1] != (n,) or not np.all(np.isfinite(weights)):
            fail(
                name,
                Description(f"{n} examples and sample weights {describe(weights)}"),
                "given one finite sample weight per example",
                "pass sample_weight of shape (num_examples,).",
            )
    return x, y, weights
