"""Shared machinery of the adaptable feature layers: data conversion and the base layer."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_safe.preprocessing import _dp_stats


def _is_dataframe(data):
    return type(data).__name__ == "DataFrame" and hasattr(data, "iloc")


def _is_series(data):
    return type(data).__name__ == "Series" and hasattr(data, "iloc")


def _first(element):
    """The features of a dataset element `x`, `(x, y)` or `(x, y, sample_weight)`."""
    if isinstance(element, (tuple, list)):
        return element[0]
    return element


def to_numpy(data, owner):
    """Materialises `data` as a float64 numpy array with the rows on the first axis.

    Args:
        data: numpy array, tensor, pandas DataFrame/Series, nested list, `tf.data.Dataset`
            (batched or not; elements `x`, `(x, y)` or `(x, y, w)`), or an iterable of batches.
        owner: name used in error messages.

    Returns:
        `(array, feature_names)`; `feature_names` is a list of column names for DataFrames,
        else None.

    Raises:
        TypeError: for unsupported or non-numeric data.
        ValueError: for data without a feature axis.
    """
    names = None
    if _is_dataframe(data):
        names = [str(c) for c in data.columns]
        try:
            array = data.to_numpy(dtype="float64", na_value=np.nan)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{owner}: every DataFrame column must be numeric; encode categorical "
                f"columns first ({err})."
            ) from None
    elif _is_series(data):
        names = [str(data.name)]
        array = data.to_numpy(dtype="float64", na_value=np.nan).reshape(-1, 1)
    elif isinstance(data, tf.data.Dataset):
        spec = _first(data.element_spec)
        if isinstance(spec, dict):
            raise TypeError(f"{owner}: dict-structured datasets are not supported; map to arrays.")
        unbatched = len(spec.shape) == 1
        chunks = []
        for element in data.as_numpy_iterator():
            x = np.asarray(_first(element), dtype="float64")
            chunks.append(x[None] if unbatched else x)
        if not chunks:
            return np.zeros((0, spec.shape[-1] or 0)), None
        array = np.concatenate(chunks, axis=0)
    elif isinstance(data, np.ndarray) or tf.is_tensor(data) or isinstance(data, (list, tuple)):
        try:
            array = np.asarray(data, dtype="float64")
        except (TypeError, ValueError) as err:
            raise TypeError(f"{owner}: data must be numeric ({err}).") from None
    elif hasattr(data, "__iter__"):
        chunks = [np.asarray(_first(batch), dtype="float64") for batch in data]
        if not chunks:
            raise ValueError(f"{owner}.adapt() received an empty iterable (no batches).")
        array = np.concatenate(chunks, axis=0)
    else:
        raise TypeError(
            f"{owner}: unsupported data of type {type(data).__name__}; pass a numpy array, a "
            "tensor, a pandas DataFrame or a tf.data.Dataset."
        )
    if array.ndim < 2:
        raise ValueError(
            f"{owner}: expected data of shape (rows, features), got shape {array.shape}. "
            "For a single feature use x.reshape(-1, 1)."
        )
    return array, names


def feature_label(index, names):
    """`feature 3 ('radius')` for error messages."""
    if names is not None and index < len(names):
        return f"feature {index} ({names[index]!r})"
    return f"feature {index}"


class AdaptableFeatureLayer(keras.layers.Layer):
    """Base class: per-feature statistics (last axis) adapted from data, stored as weights.

    Subclasses implement `_create_state(num_features)` (adds weights) and
    `_adapt_rows(rows, names, rng)` (computes and assigns the statistics from a
    `(n, num_features)` float64 array; returns the epsilon it spent).
    """

    def __init__(self, dp_epsilon=None, dp_bounds=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dp_epsilon = _dp_stats.validate_epsilon(dp_epsilon, owner)
        self.dp_bounds = _dp_stats.normalize_bounds(dp_bounds, owner)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"{owner}: `seed` must be an int or None, got {seed!r}.")
        self.seed = seed
        self._build_input_shape = None
        self.num_features = None

    # -- state -----------------------------------------------------------------------------
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        owner = type(self).__name__
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"{owner} expects inputs of shape (batch, ..., features) with a known number "
                f"of features, got shape {input_shape}. For a single feature use x[:, None]."
            )
        self._build_input_shape = input_shape
        self.num_features = int(input_shape[-1])
        self._create_state(self.num_features)
        self.adapt_count = self.add_weight(
            name="adapt_count", shape=(), initializer="zeros", trainable=False, dtype="float64"
        )
        self.dp_epsilon_spent_variable = self.add_weight(
            name="dp_epsilon_spent",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float64",
        )
        self.built = True

    def _create_state(self, num_features):
        raise NotImplementedError

    def _adapt_rows(self, rows, names, rng):
        raise NotImplementedError

    def get_build_config(self):
        if self._build_input_shape is not None:
            return {"input_shape": list(self._build_input_shape)}
        return None

    def build_from_config(self, config):
        if config:
            self.build(config["input_shape"])

    # -- adapt -----------------------------------------------------------------------------
    @property
    def uses_data(self):
        """Whether `adapt` derives statistics from the data (False for data-free settings)."""
        return True

    @property
    def is_adapted(self):
        """Whether `adapt` has run (also true on a loaded model whose layer was adapted)."""
        return self.built and float(self.adapt_count.numpy()) > 0

    @property
    def dp_epsilon_spent(self):
        """Epsilon spent by the last `adapt` (0.0 for exact statistics); saved with the model."""
        if not self.built:
            return 0.0
        return float(self.dp_epsilon_spent_variable.numpy())

    def _bounds(self, num_features):
        owner = type(self).__name__
        if self.dp_bounds is None:
            raise ValueError(
                f"{owner}: `dp_epsilon` needs `dp_bounds=(lo, hi)` (scalars or per-feature "
                "lists) chosen from domain knowledge, not from the data: differential privacy "
                "needs bounds that do not depend on any one row."
            )
        return _dp_stats.bounds_per_feature(self.dp_bounds, num_features, owner)

    def adapt(self, data):
        """Computes the layer's statistics from `data` (the training part only).

        The data is materialised in memory as a float64 numpy array (8 bytes per value), which
        quantiles and medians need.

        Args:
            data: numpy array, tensor, pandas DataFrame or `tf.data.Dataset` (batched or
                unbatched; for `(x, y)` elements only `x` is used), of shape
                `(rows, ..., features)`. Statistics are per feature (last axis).

        Raises:
            ValueError: empty data, a feature count that differs from the built layer, or a
                feature without finite values.
        """
        owner = type(self).__name__
        array, names = to_numpy(data, owner)
        num_features = array.shape[-1]
        if self.dp_epsilon is not None and array.ndim > 2:
            raise ValueError(
                f"{owner}.adapt() with `dp_epsilon` needs one row per record (2-D data), got "
                f"shape {array.shape}: a record spanning several rows would count several "
                "times and break the privacy guarantee. Reshape to (records, features) first."
            )
        rows = array.reshape(-1, num_features)
        if rows.shape[0] == 0 or num_features == 0:
            raise ValueError(
                f"{owner}.adapt() received empty data (shape {array.shape}); pass the "
                "training rows."
            )
        if not self.built:
            self.build((None,) + array.shape[1:])
        elif num_features != self.num_features:
            raise ValueError(
                f"{owner}.adapt(): the layer was built for {self.num_features} features but "
                f"the data has {num_features}. Adapt on data with the same columns."
            )
        rng = _dp_stats.make_rng(self.seed)
        spent = self._adapt_rows(rows, names, rng)
        # Under DP the exact row count would be a release outside the mechanism: keep a flag.
        self.adapt_count.assign(float(rows.shape[0]) if self.dp_epsilon is None else 1.0)
        self.dp_epsilon_spent_variable.assign(float(spent))

    def _require_finite_columns(self, rows, names):
        """Raises for features without any finite value; returns the finite mask."""
        finite = np.isfinite(rows)
        empty = np.flatnonzero(~finite.any(axis=0))
        if empty.size:
            labels = ", ".join(feature_label(int(i), names) for i in empty[:5])
            raise ValueError(
                f"{type(self).__name__}.adapt(): {labels} has no finite value in the adapt "
                "data (all NaN/inf). Drop that column or fill it before adapting."
            )
        return finite

    # -- call helpers ----------------------------------------------------------------------
    def _check_features(self, inputs):
        last = inputs.shape[-1]
        if last is not None and self.num_features is not None and last != self.num_features:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' was built for {self.num_features} "
                f"features but received inputs of shape {tuple(inputs.shape)}."
            )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "dp_epsilon": self.dp_epsilon,
                "dp_bounds": None if self.dp_bounds is None else list(self.dp_bounds),
                "seed": self.seed,
            }
        )
        return config
