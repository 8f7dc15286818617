"""OutlierClipper: winsorises each feature to adapted fences (IQR, quantiles, z-score, MAD)."""

import keras
import numpy as np
from keras import ops

from keras_safe.preprocessing import fences
from keras_safe.preprocessing._base import AdaptableFeatureLayer

__all__ = ["OutlierClipper"]


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
    clipped count, sum and sum of squares (see `keras_safe.preprocessing.fences`).

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
        ArgumentError: invalid arguments; `adapt` on empty data, all-NaN features or a
            different number of features; `dp_epsilon` without `dp_bounds`.

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
        self.method, self.iqr_factor, self.quantile_range, self.z = fences.check_fence_args(
            method, iqr_factor, quantile_range, z
        )
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

    def _fence_args(self):
        return (self.method, self.iqr_factor, self.quantile_range, self.z)

    def _exact_statistics(self, column):
        return fences.exact_fences(column, *self._fence_args())

    def _private_statistics(self, column, lo, hi, epsilon, rng):
        return fences.private_fences(column, *self._fence_args(), lo, hi, epsilon, rng)

    def _store(self, statistics, rows, finite):
        lower, upper = statistics.astype("float32")
        self.lower.assign(lower)
        self.upper.assign(upper)
        with np.errstate(invalid="ignore"):
            outside = finite & ((rows < lower) | (rows > upper))
        self.clipped_per_feature = outside.sum(axis=0)
        self.clipped_count = int(self.clipped_per_feature.sum())
        self.clipped_fraction = self.clipped_count / max(int(finite.sum()), 1)

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
