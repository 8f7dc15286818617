"""OutlierClipper: winsorises each feature to adapted fences (IQR, quantiles, z-score, MAD)."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_safe.preprocessing import _dp_stats
from keras_safe.preprocessing._base import AdaptableFeatureLayer

METHODS = ("iqr", "quantile", "zscore", "mad")
# 1 / Phi^{-1}(3/4): makes the median absolute deviation a consistent estimator of a normal std.
MAD_TO_STD = 1.482602218505602


def validate_fence_args(owner, method, iqr_factor, quantile_range, z):
    """Checks the fence arguments shared by `OutlierClipper` and `RowCleaner`."""
    if method not in METHODS:
        raise ValueError(f"{owner}: `method` must be one of {METHODS}, got {method!r}.")
    if not np.isfinite(iqr_factor) or iqr_factor < 0:
        raise ValueError(f"{owner}: `iqr_factor` must be >= 0, got {iqr_factor}.")
    if not np.isfinite(z) or z <= 0:
        raise ValueError(f"{owner}: `z` must be > 0, got {z}.")
    try:
        q_lo, q_hi = (float(v) for v in quantile_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: `quantile_range` must be a pair (low, high) such as (0.01, 0.99), got "
            f"{quantile_range!r}."
        ) from None
    if not 0.0 <= q_lo < q_hi <= 1.0:
        raise ValueError(
            f"{owner}: `quantile_range` needs 0 <= low < high <= 1, got {quantile_range!r}."
        )
    return (q_lo, q_hi)


def exact_fences(col, method, iqr_factor, quantile_range, z):
    """Lower and upper fence of one column of finite values.

    - `"iqr"`: Tukey's fences `[Q1 - k * IQR, Q3 + k * IQR]` with `k = iqr_factor`;
    - `"quantile"`: the `quantile_range` quantiles;
    - `"zscore"`: `mean +- z * std` (not robust: outliers inflate the std);
    - `"mad"`: `median +- z * 1.4826 * MAD` (robust z-score, Hampel 1974).
    """
    if method == "iqr":
        q1, q3 = np.quantile(col, [0.25, 0.75])
        return q1 - iqr_factor * (q3 - q1), q3 + iqr_factor * (q3 - q1)
    if method == "quantile":
        lo, hi = np.quantile(col, quantile_range)
        return lo, hi
    if method == "zscore":
        mean, std = np.mean(col), np.std(col)
        return mean - z * std, mean + z * std
    med = np.median(col)
    mad = MAD_TO_STD * np.median(np.abs(col - med))
    return med - z * mad, med + z * mad


def private_fences(col, method, iqr_factor, quantile_range, z, lo, hi, epsilon, rng):
    """epsilon-DP version of `exact_fences` on values bounded by `[lo, hi]`."""
    if method in ("iqr", "quantile"):
        qs = (0.25, 0.75) if method == "iqr" else quantile_range
        a, b = sorted(_dp_stats.dp_quantile(col, q, lo, hi, epsilon / 2.0, rng) for q in qs)
        if method == "quantile":
            return a, b
        return a - iqr_factor * (b - a), b + iqr_factor * (b - a)
    if method == "zscore":
        mean, std = _dp_stats.dp_mean_std(col, lo, hi, epsilon, rng)
        return mean - z * std, mean + z * std
    med = _dp_stats.dp_quantile(col, 0.5, lo, hi, epsilon / 2.0, rng)
    deviations = np.abs(np.clip(col, lo, hi) - med)
    mad = MAD_TO_STD * _dp_stats.dp_quantile(deviations, 0.5, 0.0, hi - lo, epsilon / 2.0, rng)
    return med - z * mad, med + z * mad


@keras.saving.register_keras_serializable(package="keras_safe")
class OutlierClipper(AdaptableFeatureLayer):
    """Clips (winsorises) each feature to fences adapted on the training data.

    The default, Tukey's IQR fences, is robust: quartiles barely move when a few values are
    extreme, so 1% of values at 1e6 are clipped back near the bulk of the data instead of
    stretching the bounds (on such a column, the z-score fence `mean + 3 * std` lies near 3e5,
    so the "clipped" outliers stay extreme). NaN passes through
    unchanged (impute it with `Imputer`); +-inf is clipped to the fences.

    After `adapt`, `clipped_count` (total), `clipped_per_feature` (numpy array) and
    `clipped_fraction` report how many finite adapt values lie outside the fences, i.e. how
    many the layer clips on its training data. These reports stay in Python (they are not saved
    and not privatised: they are for the data owner, not for release).

    With `dp_epsilon`, the fences are epsilon-DP: the budget is split evenly over features;
    quantiles use the exponential mechanism (Smith 2011), the z-score the Laplace mechanism on
    clipped count, sum and sum of squares.

    Args:
        method: `"iqr"` (default), `"quantile"`, `"zscore"` or `"mad"`.
        iqr_factor: `k` of the IQR fences `[Q1 - k*IQR, Q3 + k*IQR]` (1.5 is Tukey's "outlier",
            3.0 his "far out").
        quantile_range: `(low, high)` quantiles for `method="quantile"`.
        z: number of standard deviations for `"zscore"` and `"mad"`.
        dp_epsilon: optional privacy budget of `adapt`.
        dp_bounds: `(lo, hi)` bounds of the features, required with `dp_epsilon`.
        seed: seed of the DP noise (tests only).
        **kwargs: base `keras.layers.Layer` arguments.

    Returns:
        Called on `(batch, ..., features)`, a tensor of the same shape with values in the
        fences (NaN kept).

    Raises:
        ValueError: invalid arguments; `adapt` on empty data, all-NaN features or a different
            number of features; `dp_epsilon` without `dp_bounds`.

    Example:
        >>> import numpy as np
        >>> x = np.concatenate([np.linspace(0.0, 1.0, 99), [1e6]])[:, None]
        >>> clipper = OutlierClipper()
        >>> clipper.adapt(x)
        >>> clipper.clipped_count
        1
        >>> float(np.asarray(clipper(np.array([[1e6]])))[0, 0]) < 3.0
        True
    """

    def __init__(
        self,
        method="iqr",
        iqr_factor=1.5,
        quantile_range=(0.01, 0.99),
        z=3.0,
        dp_epsilon=None,
        dp_bounds=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(dp_epsilon=dp_epsilon, dp_bounds=dp_bounds, seed=seed, **kwargs)
        self.quantile_range = validate_fence_args(
            "OutlierClipper", method, float(iqr_factor), quantile_range, float(z)
        )
        self.method = method
        self.iqr_factor = float(iqr_factor)
        self.z = float(z)
        self.clipped_count = None
        self.clipped_per_feature = None
        self.clipped_fraction = None

    def _create_state(self, num_features):
        self.lower = self.add_weight(
            name="lower",
            shape=(num_features,),
            initializer=keras.initializers.Constant(-np.inf),
            trainable=False,
        )
        self.upper = self.add_weight(
            name="upper",
            shape=(num_features,),
            initializer=keras.initializers.Constant(np.inf),
            trainable=False,
        )

    def _adapt_rows(self, rows, names, rng):
        finite = self._require_finite_columns(rows, names)
        num_features = rows.shape[1]
        lower, upper = np.empty(num_features), np.empty(num_features)
        args = (self.method, self.iqr_factor, self.quantile_range, self.z)
        if self.dp_epsilon is not None:
            lo, hi = self._bounds(num_features)
            eps = self.dp_epsilon / num_features
        for j in range(num_features):
            col = rows[finite[:, j], j]
            if self.dp_epsilon is None:
                lower[j], upper[j] = exact_fences(col, *args)
            else:
                lower[j], upper[j] = private_fences(col, *args, lo[j], hi[j], eps, rng)
        lower, upper = lower.astype("float32"), upper.astype("float32")
        self.lower.assign(lower)
        self.upper.assign(upper)
        with np.errstate(invalid="ignore"):
            outside = finite & ((rows < lower) | (rows > upper))
        self.clipped_per_feature = outside.sum(axis=0)
        self.clipped_count = int(self.clipped_per_feature.sum())
        self.clipped_fraction = self.clipped_count / max(int(finite.sum()), 1)
        return 0.0 if self.dp_epsilon is None else eps * num_features

    def call(self, inputs):
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        self._check_features(inputs)
        lower = ops.cast(self.lower, inputs.dtype)
        upper = ops.cast(self.upper, inputs.dtype)
        clipped = ops.minimum(ops.maximum(inputs, lower), upper)
        return ops.where(ops.isnan(inputs), inputs, clipped)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "method": self.method,
                "iqr_factor": self.iqr_factor,
                "quantile_range": list(self.quantile_range),
                "z": self.z,
            }
        )
        return config
