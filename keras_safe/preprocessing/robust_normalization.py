"""RobustNormalization: centre and scale by median/IQR (or mean/std) adapted per feature."""

import keras
import numpy as np
from keras import ops

from keras_safe._validation import check_choice
from keras_safe.preprocessing import _dp_stats, fences
from keras_safe.preprocessing._base import AdaptableFeatureLayer

__all__ = ["NORMAL_IQR", "RobustNormalization"]

_METHODS = ("median_iqr", "mean_std")
# Interquartile range of the standard normal distribution: 2 * Phi^{-1}(3/4).
NORMAL_IQR = 1.3489795003921634


@keras.saving.register_keras_serializable(package="keras_safe")
class RobustNormalization(AdaptableFeatureLayer):
    """Normalises each feature as `(x - centre) / scale` with statistics robust to outliers.

    `method="median_iqr"` (default) uses the median and the interquartile range (the
    `quantile_range` quantiles), like scikit-learn's `RobustScaler`: a few extreme values move
    neither, whereas the mean and standard deviation used by `keras.layers.Normalization` are
    dragged by a single value at 1e6. `method="mean_std"` gives the plain z-score. A zero scale
    (constant feature) is replaced by 1. NaN passes through.

    With `dp_epsilon`, `adapt` is epsilon-DP: the budget is split evenly over features; the
    median and quartiles use the exponential mechanism (Smith 2011), each with a third of the
    feature's budget; mean/std use the Laplace mechanism on clipped count, sum and sum of
    squares (Dwork et al. 2006).

    Args:
        method: `"median_iqr"` or `"mean_std"`.
        quantile_range: `(low, high)` quantiles whose difference is the scale of
            `"median_iqr"`; default `(0.25, 0.75)`.
        unit_variance: if True, the `"median_iqr"` scale is divided by the IQR of a standard
            normal (1.349), so normally distributed features end up with unit variance.
        invert: if True, the layer maps normalised values back: `x * scale + centre`.
        dp_epsilon: optional privacy budget of `adapt`.
        dp_bounds: `(lo, hi)` bounds of the features, required with `dp_epsilon`.
        seed: seed of the DP noise (tests only).
        **kwargs: base `keras.layers.Layer` arguments.

    Returns:
        Called on `(batch, ..., features)`, the normalised tensor of the same shape.

    Raises:
        ArgumentError: invalid arguments; `adapt` on empty data, all-NaN features or a different
            number of features; `dp_epsilon` without `dp_bounds`.

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0], [2.0], [3.0], [4.0], [1e6]])
        >>> layer = RobustNormalization()
        >>> layer.adapt(x)
        >>> np.asarray(layer(np.array([[3.0], [5.0]]))).ravel().tolist()
        [0.0, 1.0]
    """

    def __init__(
        self,
        method="median_iqr",
        quantile_range=(0.25, 0.75),
        unit_variance=False,
        invert=False,
        dp_epsilon=None,
        dp_bounds=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(dp_epsilon=dp_epsilon, dp_bounds=dp_bounds, seed=seed, **kwargs)
        self.method = check_choice("method", method, _METHODS)
        self.quantile_range = fences.check_quantile_range(quantile_range)
        self.unit_variance = bool(unit_variance)
        self.invert = bool(invert)

    def _create_state(self, num_features):
        self.center = self.add_weight(
            name="center", shape=(num_features,), initializer="zeros", trainable=False
        )
        self.scale = self.add_weight(
            name="scale", shape=(num_features,), initializer="ones", trainable=False
        )

    def _levels(self):
        return (self.quantile_range[0], 0.5, self.quantile_range[1])

    def _exact_statistics(self, column):
        if self.method == "mean_std":
            return float(np.mean(column)), float(np.std(column))
        low, center, high = fences.exact_quantiles(column, self._levels())
        return center, high - low

    def _private_statistics(self, column, lo, hi, epsilon, rng):
        if self.method == "mean_std":
            return _dp_stats.dp_mean_std(column, lo, hi, epsilon, rng)
        low, center, high = fences.private_quantiles(column, self._levels(), lo, hi, epsilon, rng)
        return center, high - low

    def _store(self, statistics, rows, finite):
        center, scale = statistics
        if self.method == "median_iqr" and self.unit_variance:
            scale = scale / NORMAL_IQR
        scale = np.where(scale > 1e-12 * np.maximum(1.0, np.abs(center)), scale, 1.0)
        self.center.assign(center.astype("float32"))
        self.scale.assign(scale.astype("float32"))

    def call(self, inputs):
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        self._check_features(inputs)
        center = ops.cast(self.center, inputs.dtype)
        scale = ops.cast(self.scale, inputs.dtype)
        if self.invert:
            return inputs * scale + center
        return (inputs - center) / scale

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "method": self.method,
                "quantile_range": list(self.quantile_range),
                "unit_variance": self.unit_variance,
                "invert": self.invert,
            }
        )
        return config
