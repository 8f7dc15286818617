"""InputGuard: a serving-time check for shape, non-finite values and out-of-range inputs."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_safe._validation import check_choice, check_number
from keras_safe.preprocessing import _dp_stats, fences
from keras_safe.preprocessing._base import AdaptableFeatureLayer

__all__ = ["InputGuard"]

_MODES = ("raise", "clip", "flag")


@keras.saving.register_keras_serializable(package="keras_safe")
class InputGuard(AdaptableFeatureLayer):
    """Rejects or repairs malformed inputs before they reach a model.

    Three checks, per row:

    - shape: the number of features must match the one the layer was built/adapted with
      (always raises: a wrong shape cannot be repaired);
    - non-finite values (NaN, +-inf), when `check_finite=True`;
    - values far outside the adapted range: `adapt` records the `quantile_range` quantiles
      `[a, b]` of each feature and allows `[a - tolerance * (b - a), b + tolerance * (b - a)]`
      (or use fixed `bounds`).

    What happens on a violation (`on_violation`):

    - `"raise"`: eager calls raise `ValueError` naming rows and features; inside a compiled
      model or a `tf.data` pipeline a `tf.errors.InvalidArgumentError` stops the computation;
    - `"clip"`: values are repaired: clipped into the allowed range, NaN replaced by the
      adapted median (and infinities by the bound, or the median when unbounded); with
      `check_finite=False` non-finite values are left for a following `Imputer`;
    - `"flag"`: repaired like `"clip"`, plus one extra last feature that is 1.0 for rows that
      violated a check and 0.0 otherwise.

    `check(x)` returns the per-row, per-feature report as numpy arrays, for serving code that
    wants to log or reject requests itself.

    With `dp_epsilon`, the quantiles and median are epsilon-DP (exponential mechanism, Smith
    2011; a third of each feature's share of the budget per statistic), since the range of
    the training data is itself information about the people in it.

    Args:
        on_violation: `"raise"` (default), `"clip"` or `"flag"`.
        tolerance: allowed distance beyond the adapted range, in multiples of its width.
        quantile_range: quantiles that define the adapted range; `(0.0, 1.0)` is min/max.
        check_finite: whether NaN/inf count as a violation (set False when an `Imputer`
            follows and missing values are expected).
        bounds: optional fixed `(lo, hi)` allowed range (scalars or per-feature lists), used
            without `adapt`; `adapt` replaces it with a range computed from the data.
        dp_epsilon: optional privacy budget of `adapt`.
        dp_bounds: `(lo, hi)` bounds of the features, required with `dp_epsilon`.
        seed: seed of the DP noise (tests only).
        **kwargs: base `keras.layers.Layer` arguments.

    Returns:
        Called on `(batch, ..., features)`: the inputs (`"raise"`), the repaired inputs
        (`"clip"`), or the repaired inputs with one flag feature appended (`"flag"`).

    Raises:
        ArgumentError: invalid arguments; wrong number of features.
        ValueError: a violation in eager mode with `on_violation="raise"`.

    Example:
        >>> import numpy as np
        >>> guard = InputGuard(on_violation="clip", tolerance=0.5)
        >>> guard.adapt(np.array([[0.0], [1.0], [2.0]]))
        >>> np.asarray(guard(np.array([[1.5], [100.0], [np.nan]]))).ravel().tolist()
        [1.5, 3.0, 1.0]
    """

    def __init__(
        self,
        on_violation="raise",
        tolerance=1.0,
        quantile_range=(0.0, 1.0),
        check_finite=True,
        bounds=None,
        dp_epsilon=None,
        dp_bounds=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(dp_epsilon=dp_epsilon, dp_bounds=dp_bounds, seed=seed, **kwargs)
        self.on_violation = check_choice("on_violation", on_violation, _MODES)
        self.tolerance = check_number("tolerance", tolerance, low=0.0)
        self.quantile_range = fences.check_quantile_range(quantile_range)
        self.check_finite = bool(check_finite)
        self.bounds = _dp_stats.normalize_bounds(bounds, "bounds")

    def _create_state(self, num_features):
        if self.bounds is not None:
            lo, hi = _dp_stats.bounds_per_feature(self.bounds, num_features, "bounds")
            center = (lo + hi) / 2.0
        else:
            lo = np.full(num_features, -np.inf)
            hi = np.full(num_features, np.inf)
            center = np.zeros(num_features)
        self.lower = self.add_weight(
            name="lower",
            shape=(num_features,),
            initializer=keras.initializers.Constant(lo.astype("float32")),
            trainable=False,
        )
        self.upper = self.add_weight(
            name="upper",
            shape=(num_features,),
            initializer=keras.initializers.Constant(hi.astype("float32")),
            trainable=False,
        )
        self.center = self.add_weight(
            name="center",
            shape=(num_features,),
            initializer=keras.initializers.Constant(center.astype("float32")),
            trainable=False,
        )

    def _levels(self):
        return (self.quantile_range[0], 0.5, self.quantile_range[1])

    def _exact_statistics(self, column):
        return fences.exact_quantiles(column, self._levels())

    def _private_statistics(self, column, lo, hi, epsilon, rng):
        return fences.private_quantiles(column, self._levels(), lo, hi, epsilon, rng)

    def _store(self, statistics, rows, finite):
        low, center, high = statistics
        width = high - low
        self.lower.assign((low - self.tolerance * width).astype("float32"))
        self.upper.assign((high + self.tolerance * width).astype("float32"))
        self.center.assign(center.astype("float32"))

    # -- checks ----------------------------------------------------------------------------
    def _masks(self, inputs):
        lower = ops.cast(self.lower, inputs.dtype)
        upper = ops.cast(self.upper, inputs.dtype)
        non_finite = ops.logical_not(ops.isfinite(inputs))
        out_of_range = ops.logical_or(ops.less(inputs, lower), ops.greater(inputs, upper))
        # +-inf beyond a finite bound is out of range too; NaN compares False above.
        if not self.check_finite:
            non_finite = ops.zeros_like(non_finite)
            out_of_range = ops.logical_and(out_of_range, ops.isfinite(inputs))
        return non_finite, out_of_range

    def _repair(self, inputs):
        lower = ops.cast(self.lower, inputs.dtype)
        upper = ops.cast(self.upper, inputs.dtype)
        center = ops.broadcast_to(ops.cast(self.center, inputs.dtype), ops.shape(inputs))
        clipped = ops.minimum(ops.maximum(inputs, lower), upper)
        if not self.check_finite:
            # Missing values are expected downstream (an Imputer follows): keep them.
            return ops.where(ops.isfinite(inputs), clipped, inputs)
        x = ops.where(ops.isnan(inputs), center, clipped)
        return ops.where(ops.isinf(x), center, x)

    def check(self, x):
        """Reports the violations of `x` without changing it.

        Args:
            x: array of shape `(batch, ..., features)`.

        Returns:
            A dict of numpy arrays: `"violation"` (bool per row), `"non_finite"` and
            `"out_of_range"` (bool per value).

        Raises:
            ArgumentError: wrong number of features.
        """
        x = ops.convert_to_tensor(np.asarray(x, dtype="float32"))
        if not self.built:
            self.build(tuple(x.shape))
        self._check_features(x)
        non_finite, out_of_range = self._masks(x)
        bad = ops.logical_or(non_finite, out_of_range)
        row = ops.any(ops.reshape(bad, (ops.shape(bad)[0], -1)), axis=-1)
        return {
            "violation": np.asarray(row),
            "non_finite": np.asarray(non_finite),
            "out_of_range": np.asarray(out_of_range),
        }

    def _describe(self, x, non_finite, out_of_range):
        x = np.asarray(x)
        nf = np.asarray(non_finite).reshape(-1, self.num_features)
        oor = np.asarray(out_of_range).reshape(-1, self.num_features)
        flat = x.reshape(-1, self.num_features)
        lines = []
        for kind, mask in (("non-finite", nf), ("out of the allowed range", oor)):
            rows, cols = np.nonzero(mask)
            if rows.size:
                examples = ", ".join(
                    f"row {r} feature {c} = {flat[r, c]:.6g}"
                    for r, c in zip(rows[:3].tolist(), cols[:3].tolist(), strict=True)
                )
                lines.append(f"{rows.size} value(s) {kind} ({examples})")
        lo = np.asarray(self.lower.numpy())
        hi = np.asarray(self.upper.numpy())
        return (
            f"InputGuard '{self.name}' rejected the input: " + "; ".join(lines) + ". "
            f"Allowed range per feature: lower={np.round(lo[:5], 4).tolist()}..., "
            f"upper={np.round(hi[:5], 4).tolist()}.... Use on_violation='clip' or 'flag' to "
            "repair instead of raising."
        )

    def call(self, inputs):
        inputs = ops.convert_to_tensor(inputs, dtype=self.compute_dtype)
        self._check_features(inputs)
        non_finite, out_of_range = self._masks(inputs)
        bad = ops.logical_or(non_finite, out_of_range)
        if self.on_violation == "raise":
            ok = ops.logical_not(ops.any(bad))
            if tf.executing_eagerly():
                if not bool(ok):
                    raise ValueError(self._describe(inputs, non_finite, out_of_range))
                return inputs
            check = tf.debugging.Assert(
                ok,
                [
                    f"InputGuard '{self.name}' rejected the input: non-finite or out-of-range "
                    "values. Counts (non-finite, out of range):",
                    tf.math.count_nonzero(non_finite),
                    tf.math.count_nonzero(out_of_range),
                ],
            )
            with tf.control_dependencies([check]):
                return tf.identity(inputs)
        repaired = self._repair(inputs)
        if self.on_violation == "clip":
            return repaired
        flag = ops.any(bad, axis=-1, keepdims=True)
        for _ in range(len(inputs.shape) - 2):
            flag = ops.any(flag, axis=-2, keepdims=True)
        flag = ops.broadcast_to(ops.cast(flag, inputs.dtype), tuple(ops.shape(inputs)[:-1]) + (1,))
        return ops.concatenate([repaired, flag], axis=-1)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.on_violation == "flag" and input_shape[-1] is not None:
            return input_shape[:-1] + (input_shape[-1] + 1,)
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "on_violation": self.on_violation,
                "tolerance": self.tolerance,
                "quantile_range": list(self.quantile_range),
                "check_finite": self.check_finite,
                "bounds": None if self.bounds is None else list(self.bounds),
            }
        )
        return config
