"""The base layer of the adaptable feature layers, and the one adapt loop they share."""

import secrets

import keras
import numpy as np

from keras_safe._data import describe, to_numpy
from keras_safe._validation import check_number, fail
from keras_safe.preprocessing import _dp_stats

__all__ = ["AdaptableFeatureLayer", "feature_label"]


def feature_label(index, names):
    """`feature 3 ('radius')` for error messages.

    Example:
        >>> feature_label(1, ["age", "income"])
        "feature 1 ('income')"
    """
    if names is not None and index < len(names):
        return f"feature {index} ({names[index]!r})"
    return f"feature {index}"


class AdaptableFeatureLayer(keras.layers.Layer):
    """Base class: per-feature statistics (last axis) adapted from data, stored as weights.

    `adapt` is written once, here. It materialises the data, checks it, and for every feature
    computes the statistics of that feature's finite values: exactly, or with `dp_epsilon`
    split evenly over the features (sequential composition; each feature's share covers all
    the statistics of that feature). A subclass supplies:

    - `_create_state(num_features)`: adds the weights that hold the statistics;
    - `_exact_statistics(column)`: a tuple of statistics of one column of finite values;
    - `_private_statistics(column, lo, hi, epsilon, rng)`: the same tuple, epsilon-DP for
      values bounded by `[lo, hi]`;
    - `_store(statistics, rows, finite)`: writes `statistics` (an array of shape
      `(num_statistics, num_features)`, or None when `uses_data` is False) into the weights;
      `rows` and its finite mask are there for reports kept in Python.
    """

    def __init__(self, dp_epsilon=None, dp_bounds=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.dp_epsilon = _dp_stats.check_epsilon(dp_epsilon)
        self.dp_bounds = _dp_stats.normalize_bounds(dp_bounds, "dp_bounds")
        self.seed = check_number(
            "seed",
            seed,
            low=0,
            integer=True,
            allow_none=True,
            fix="pass a non-negative integer for reproducible noise, or None (recommended).",
        )
        self._build_input_shape = None
        self.num_features = None

    # -- state -----------------------------------------------------------------------------
    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] is None:
            fail(
                "input_shape",
                input_shape,
                f"(batch, ..., features) with a known number of features for {type(self).__name__}",
                "for a single feature use x[:, None].",
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
        # Which release of the training data the statistics are: a random identifier per DP
        # `adapt` (a private model's ledger records each release once), 0 for exact statistics;
        # and whether exact statistics were adapted on data declared public.
        self.statistics_release = self.add_weight(
            name="statistics_release", shape=(), initializer="zeros", trainable=False, dtype="int64"
        )
        self.adapted_on_public_data = self.add_weight(
            name="adapted_on_public_data",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="int64",
        )
        self.built = True

    def _create_state(self, num_features):
        raise NotImplementedError

    def _exact_statistics(self, column):
        raise NotImplementedError

    def _private_statistics(self, column, lo, hi, epsilon, rng):
        raise NotImplementedError

    def _store(self, statistics, rows, finite):
        raise NotImplementedError

    def load_own_variables(self, store):
        """Loads the statistics, also from files saved before the release identifier and the
        public-data flag existed (two variables fewer): a DP-adapted layer from such a file
        counts as a new release, exact statistics as not public."""
        if len(store.keys()) == len(self.weights) - 2:
            for i, variable in enumerate(self.weights[:-2]):
                variable.assign(store[f"{i}"])
            if float(self.dp_epsilon_spent_variable.numpy()) > 0:
                self.statistics_release.assign(secrets.randbits(62))
            return
        super().load_own_variables(store)

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

    def adapt(self, data, public=False):
        """Computes the layer's statistics from `data` (the training part only).

        The data is materialised in memory as a float64 numpy array (8 bytes per value), which
        quantiles and medians need.

        Inside a private model (`keras_safe.privacy.make_private`) the statistics are part of
        what training releases: with `dp_epsilon` their epsilon is charged to the model's
        privacy ledger (once per `adapt`); exact statistics are refused there unless `data` is
        declared public (`public=True`: data that is not the private training data, such as a
        published reference sample).

        Args:
            data: numpy array, tensor, pandas DataFrame or `tf.data.Dataset` (batched or
                unbatched; for `(x, y)` elements only `x` is used), of shape
                `(rows, ..., features)`. Statistics are per feature (last axis).
            public: True when `data` is public (not the private training data); exact
                statistics of public data cost no privacy.

        Raises:
            ArgumentError: empty data, a feature count that differs from the built layer, a
                feature without finite values, data with more than two axes under DP, or
                `dp_epsilon` without `dp_bounds`.
        """
        owner = type(self).__name__
        array, names = to_numpy(data, "data")
        num_features = array.shape[-1]
        if self.dp_epsilon is not None and array.ndim > 2:
            fail(
                "data",
                describe(array),
                f"2-D (one row per record) when {owner} has `dp_epsilon`",
                "reshape to (records, features) first: a record spanning several rows would "
                "count several times and break the privacy guarantee.",
            )
        rows = array.reshape(-1, num_features)
        if rows.shape[0] == 0 or num_features == 0:
            fail("data", describe(array), "non-empty", f"pass the training rows to {owner}.adapt.")
        if not self.built:
            self.build((None,) + array.shape[1:])
        elif num_features != self.num_features:
            fail(
                "data",
                describe(array),
                f"{self.num_features} features wide (the layer was built for "
                f"{self.num_features} features)",
                "adapt on data with the same columns.",
            )
        finite = np.isfinite(rows)
        spent = 0.0
        statistics = None
        if self.uses_data:
            self._require_finite_columns(array, finite, names)
            statistics, spent = self._column_statistics(rows, finite)
        self._store(statistics, rows, finite)
        # Under DP the exact row count would be a release outside the mechanism: keep a flag.
        self.adapt_count.assign(float(rows.shape[0]) if self.dp_epsilon is None else 1.0)
        self.dp_epsilon_spent_variable.assign(float(spent))
        private_release = self.dp_epsilon is not None and self.uses_data
        self.statistics_release.assign(secrets.randbits(62) if private_release else 0)
        self.adapted_on_public_data.assign(int(bool(public)))

    def _column_statistics(self, rows, finite):
        """The one loop over features: returns `(statistics, epsilon_spent)`."""
        num_features = rows.shape[1]
        columns = (rows[finite[:, j], j] for j in range(num_features))
        if self.dp_epsilon is None:
            values = [self._exact_statistics(column) for column in columns]
            spent = 0.0
        else:
            lo, hi = self._bounds(num_features)
            share = self.dp_epsilon / num_features
            rng = _dp_stats.make_rng(self.seed)
            values = [
                self._private_statistics(column, lo[j], hi[j], share, rng)
                for j, column in enumerate(columns)
            ]
            spent = self.dp_epsilon
        return np.asarray(values, dtype="float64").T, spent

    def _bounds(self, num_features):
        if self.dp_bounds is None:
            fail(
                "dp_bounds",
                None,
                f"a pair (lo, hi) when {type(self).__name__} has `dp_epsilon` (scalars or "
                "per-feature lists)",
                "choose the bounds from domain knowledge, not from the data: differential "
                "privacy needs bounds that do not depend on any one row.",
            )
        return _dp_stats.bounds_per_feature(self.dp_bounds, num_features, "dp_bounds")

    def _require_finite_columns(self, array, finite, names):
        empty = np.flatnonzero(~finite.any(axis=0))
        if empty.size:
            labels = ", ".join(feature_label(int(i), names) for i in empty[:5])
            fail(
                "data",
                describe(array, f"where {labels} has no finite value (all NaN/inf)"),
                "finite somewhere in every feature",
                "drop that column or fill it before adapting.",
            )

    # -- call helpers ----------------------------------------------------------------------
    def _check_features(self, inputs):
        last = inputs.shape[-1]
        if last is not None and self.num_features is not None and last != self.num_features:
            fail(
                "inputs",
                describe(inputs),
                f"{self.num_features} features wide ({type(self).__name__} '{self.name}' was "
                f"built for {self.num_features} features)",
                "pass inputs with the columns the layer was adapted on.",
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
