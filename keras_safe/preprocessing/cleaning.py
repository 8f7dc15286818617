"""Drop-row cleaning: rows with too many missing values or with outlying features.

A Keras layer cannot change the number of rows in a batch, so dropping rows is a data
utility for arrays, DataFrames and `tf.data` pipelines rather than a layer.
"""

import numpy as np
import tensorflow as tf

from keras_safe._data import Description, describe, features_of, length, take_rows, to_numpy
from keras_safe._validation import check_number, fail
from keras_safe.preprocessing import fences
from keras_safe.preprocessing._base import feature_label

__all__ = ["RowCleaner", "drop_rows"]


class RowCleaner:
    """Drops rows with too many missing values or with values beyond outlier fences.

    `fit(x_train)` learns per-feature fences from the training part (Tukey's IQR fences by
    default, with `iqr_factor=3.0`, his "far out" values); `transform` then drops, from any
    part, rows that have

    - more than `max_missing` (a fraction of the features) NaN/inf values, or
    - more than `max_outlier_features` finite values outside the fences.

    Fit on the training part only, so the fences do not depend on validation or test rows.
    After each `transform` or `mask`, `last_dropped` reports `{"missing": a, "outliers": b,
    "kept": c}` (a row with both problems counts as missing).

    Args:
        max_missing: largest allowed fraction of non-finite features per row, in `[0, 1]`, or
            None to keep rows regardless of missing values.
        method: fence method, `"iqr"`, `"quantile"`, `"zscore"` or `"mad"` (as in
            `OutlierClipper`), or None to skip the outlier check.
        iqr_factor: `k` of the IQR fences.
        quantile_range: `(low, high)` quantiles for `method="quantile"`.
        z: standard deviations for `"zscore"` and `"mad"`.
        max_outlier_features: number of outlying features a row may have and still be kept.

    Returns:
        A cleaner; call `fit`, then `transform`, `mask` or `filter_dataset`.

    Raises:
        ArgumentError: invalid arguments.

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).normal(size=(100, 4))
        >>> x[3, :3] = np.nan
        >>> x[7, 1] = 1e6
        >>> cleaner = RowCleaner().fit(x)
        >>> x_clean = cleaner.transform(x)
        >>> x_clean.shape, cleaner.last_dropped
        ((98, 4), {'missing': 1, 'outliers': 1, 'kept': 98})
    """

    def __init__(
        self,
        max_missing=0.5,
        method="iqr",
        iqr_factor=3.0,
        quantile_range=(0.01, 0.99),
        z=5.0,
        max_outlier_features=0,
    ):
        self.max_missing = check_number(
            "max_missing",
            max_missing,
            low=0.0,
            high=1.0,
            allow_none=True,
            fix="pass a fraction of the features in [0, 1], or None to keep rows with missing "
            "values.",
        )
        # The fence arguments are checked even without a method, so a typo never goes unseen.
        _, self.iqr_factor, self.quantile_range, self.z = fences.check_fence_args(
            "iqr" if method is None else method, iqr_factor, quantile_range, z
        )
        self.method = method
        self.max_outlier_features = check_number(
            "max_outlier_features", max_outlier_features, low=0, integer=True
        )
        self.lower = None
        self.upper = None
        self.last_dropped = None

    def fit(self, x):
        """Learns the outlier fences from the training rows.

        Args:
            x: training features (array, DataFrame, tensor or `tf.data.Dataset`), shape
                `(rows, features)`.

        Returns:
            The cleaner itself.

        Raises:
            ArgumentError: empty data, or a feature without finite values when `method` is set.
        """
        rows, names = to_numpy(x, "x")
        if rows.shape[0] == 0:
            fail("x", describe(rows), "non-empty", "pass the training rows to RowCleaner.fit.")
        rows = rows.reshape(rows.shape[0], -1)
        num_features = rows.shape[1]
        self.num_features = num_features
        self.lower = np.full(num_features, -np.inf)
        self.upper = np.full(num_features, np.inf)
        if self.method is None:
            return self
        finite = np.isfinite(rows)
        for j in range(num_features):
            column = rows[finite[:, j], j]
            if column.size == 0:
                fail(
                    "x",
                    describe(rows, f"where {feature_label(j, names)} has no finite value"),
                    "finite somewhere in every feature",
                    "drop that column first.",
                )
            self.lower[j], self.upper[j] = fences.exact_fences(
                column, self.method, self.iqr_factor, self.quantile_range, self.z
            )
        return self

    def _check_fitted(self, num_features, name="x"):
        if self.lower is None:
            fail(
                "self",
                describe(self, "that was never fitted"),
                "fitted",
                "call fit(x_train) before transform/mask/filter_dataset.",
            )
        if num_features != self.num_features:
            fail(
                name,
                Description(f"{num_features} features"),
                f"{self.num_features} features wide (RowCleaner was fitted on "
                f"{self.num_features} features)",
                "pass rows with the same columns.",
            )

    def mask(self, x):
        """Boolean array, True for rows to keep.

        Args:
            x: features of shape `(rows, features)` (array, DataFrame or tensor).

        Returns:
            A numpy bool array of length `rows`.

        Raises:
            ArgumentError: not fitted, or a different number of features.
        """
        rows, _ = to_numpy(x, "x")
        rows = rows.reshape(rows.shape[0], int(np.prod(rows.shape[1:])))
        self._check_fitted(rows.shape[1])
        finite = np.isfinite(rows)
        drop_missing = np.zeros(rows.shape[0], dtype=bool)
        if self.max_missing is not None:
            drop_missing = (~finite).mean(axis=1) > self.max_missing + 1e-12
        with np.errstate(invalid="ignore"):
            outside = finite & ((rows < self.lower) | (rows > self.upper))
        drop_outlier = outside.sum(axis=1) > self.max_outlier_features
        keep = ~(drop_missing | drop_outlier)
        self.last_dropped = {
            "missing": int(drop_missing.sum()),
            "outliers": int((drop_outlier & ~drop_missing).sum()),
            "kept": int(keep.sum()),
        }
        return keep

    def transform(self, x, y=None):
        """Returns the kept rows of `x` (and of `y` when given).

        Args:
            x: features (numpy array or DataFrame).
            y: optional targets aligned with `x`.

        Returns:
            `x_kept`, or `(x_kept, y_kept)` when `y` is given.
        """
        keep = self.mask(x)
        idx = np.flatnonzero(keep)
        if y is None:
            return take_rows(x, idx)
        if length(y, "y") != len(keep):
            fail(
                "y",
                describe(y),
                f"aligned with `x` ({len(keep)} rows)",
                "pass one target per row of x.",
            )
        return take_rows(x, idx), take_rows(y, idx)

    def filter_dataset(self, dataset):
        """Filters an unbatched `tf.data.Dataset` of `x` or `(x, y, ...)` elements.

        Args:
            dataset: unbatched dataset whose features have shape `(features,)`.

        Returns:
            A dataset with only the rows to keep.
        """
        self._check_fitted(int(np.prod(features_of(dataset.element_spec).shape)), "dataset")
        lower = tf.constant(self.lower, tf.float64)
        upper = tf.constant(self.upper, tf.float64)
        max_missing = self.max_missing
        limit = self.max_outlier_features

        def keep(*element):
            x = tf.reshape(tf.cast(element[0], tf.float64), [-1])
            finite = tf.math.is_finite(x)
            ok = tf.constant(True)
            if max_missing is not None:
                missing = tf.reduce_mean(tf.cast(tf.logical_not(finite), tf.float64))
                ok = tf.logical_and(ok, missing <= max_missing + 1e-12)
            outside = tf.logical_and(finite, tf.logical_or(x < lower, x > upper))
            return tf.logical_and(ok, tf.math.count_nonzero(outside) <= limit)

        return dataset.filter(keep)


def drop_rows(
    x,
    y=None,
    max_missing=0.5,
    method="iqr",
    iqr_factor=3.0,
    max_outlier_features=0,
    reference=None,
):
    """Drops rows with too many missing values or with outlying features.

    A one-call form of `RowCleaner`: the fences come from `reference` (pass the training part
    when cleaning validation or test data) or else from `x` itself.

    Args:
        x: features, numpy array or DataFrame of shape `(rows, features)`.
        y: optional targets aligned with `x`.
        max_missing: largest allowed fraction of non-finite features per row, or None.
        method: fence method (`"iqr"`, `"quantile"`, `"zscore"`, `"mad"`) or None.
        iqr_factor: `k` of the IQR fences (3.0: Tukey's "far out").
        max_outlier_features: outlying features a row may have and still be kept.
        reference: data the fences are computed from; defaults to `x`.

    Returns:
        `x_kept`, or `(x_kept, y_kept)` when `y` is given.

    Raises:
        ArgumentError: invalid arguments, empty data or a feature without finite values.

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 2.0], [np.nan, np.nan], [1.5, 2.5], [2.0, 3.0]])
        >>> drop_rows(x, max_missing=0.5, method=None).tolist()
        [[1.0, 2.0], [1.5, 2.5], [2.0, 3.0]]
    """
    cleaner = RowCleaner(
        max_missing=max_missing,
        method=method,
        iqr_factor=iqr_factor,
        max_outlier_features=max_outlier_features,
    )
    cleaner.fit(x if reference is None else reference)
    return cleaner.transform(x, y)
