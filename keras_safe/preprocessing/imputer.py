"""Imputer: replaces missing (non-finite) values with an adapted per-feature statistic."""

import keras
import numpy as np
from keras import ops

from keras_safe._validation import check_choice, check_number
from keras_safe.preprocessing import _dp_stats
from keras_safe.preprocessing._base import AdaptableFeatureLayer

__all__ = ["Imputer"]

_STRATEGIES = ("mean", "median", "constant")


@keras.saving.register_keras_serializable(package="keras_safe")
class Imputer(AdaptableFeatureLayer):
    """Replaces NaN and +-inf per feature with the adapted mean, median or a constant.

    Statistics are computed by `adapt` on the finite values of each feature (last axis) and
    stored as non-trainable weights, so they are saved with the model. The layer runs eagerly,
    inside a compiled model and in `tf.data` pipelines (`dataset.map(imputer)`).

    With `dp_epsilon`, `adapt` releases epsilon-differentially private statistics: the budget
    is split evenly over the features (sequential composition); a mean is a Laplace-noised
    clipped sum over a Laplace-noised count (Dwork et al. 2006), a median comes from the
    exponential mechanism (Smith 2011). Both need data-independent `dp_bounds`.

    Args:
        strategy: `"median"` (default, robust to outliers), `"mean"` or `"constant"`.
        fill_value: value used by `strategy="constant"`.
        add_indicator: if True, appends one 0/1 missing-indicator feature per input feature
            (the output has twice as many features).
        dp_epsilon: optional privacy budget of `adapt`; None gives exact statistics.
        dp_bounds: `(lo, hi)` bounds of the features (scalars or per-feature lists), required
            with `dp_epsilon` for `"mean"` and `"median"`.
        seed: seed of the DP noise (for reproducible tests; leave None in production).
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Returns:
        Called on a tensor of shape `(batch, ..., features)`, a tensor of the same shape
        (`features * 2` on the last axis with `add_indicator=True`).

    Raises:
        ArgumentError: unknown `strategy` or a `fill_value` that is not a finite number;
            `adapt` on empty data, on a feature without finite values, or on data with another
            number of features; `dp_epsilon` without `dp_bounds`.

    Example:
        >>> import numpy as np
        >>> x = np.array([[1.0, 10.0], [np.nan, 20.0], [3.0, np.inf]])
        >>> imputer = Imputer(strategy="median", add_indicator=True)
        >>> imputer.adapt(x)
        >>> np.asarray(imputer(x)).tolist()
        [[1.0, 10.0, 0.0, 0.0], [2.0, 20.0, 1.0, 0.0], [3.0, 15.0, 0.0, 1.0]]
    """

    def __init__(
        self,
        strategy="median",
        fill_value=0.0,
        add_indicator=False,
        dp_epsilon=None,
        dp_bounds=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(dp_epsilon=dp_epsilon, dp_bounds=dp_bounds, seed=seed, **kwargs)
        self.strategy = check_choice("strategy", strategy, _STRATEGIES)
        self.fill_value = check_number("fill_value", fill_value)
        self.add_indicator = bool(add_indicator)
        self.missing_counts = None

    @property
    def uses_data(self):
        return self.strategy != "constant"

    def _create_state(self, num_features):
        self.fill = self.add_weight(
            name="fill",
            shape=(num_features,),
            initializer=keras.initializers.Constant(self.fill_value),
            trainable=False,
        )

    def _exact_statistics(self, column):
        return (np.mean(column) if self.strategy == "mean" else np.median(column),)

    def _private_statistics(self, column, lo, hi, epsilon, rng):
        if self.strategy == "mean":
            return (_dp_stats.dp_mean(column, lo, hi, epsilon, rng),)
        return (_dp_stats.dp_quantile(column, 0.5, lo, hi, epsilon, rng),)

    def _store(self, statistics, rows, finite):
        # Exact counts are kept for the data owner only without DP (they are not released).
        self.missing_counts = (~finite).sum(axis=0) if self.dp_epsilon is None else None
        if statistics is None:  # strategy "constant"
            statistics = np.full((1, rows.shape[1]), self.fill_value)
        self.fill.assign(statistics[0].astype("float32"))

    def call(self, inputs):
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        self._check_features(inputs)
        missing = ops.logical_not(ops.isfinite(inputs))
        fill = ops.cast(self.fill, inputs.dtype)
        outputs = ops.where(missing, ops.broadcast_to(fill, ops.shape(inputs)), inputs)
        if self.add_indicator:
            outputs = ops.concatenate([outputs, ops.cast(missing, inputs.dtype)], axis=-1)
        return outputs

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.add_indicator and input_shape[-1] is not None:
            return input_shape[:-1] + (input_shape[-1] * 2,)
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "strategy": self.strategy,
                "fill_value": self.fill_value,
                "add_indicator": self.add_indicator,
            }
        )
        return config
