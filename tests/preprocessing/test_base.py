"""The one adapt loop of the feature layers: its contract, and the behaviour all four share."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_safe.preprocessing import Imputer, InputGuard, OutlierClipper, RobustNormalization
from keras_safe.preprocessing._base import AdaptableFeatureLayer
from tests.preprocessing.references import lognormal_data
from tests.testing import assert_config_round_trip

LAYER_CLASSES = [Imputer, OutlierClipper, RobustNormalization, InputGuard]


class _Recorder(AdaptableFeatureLayer):
    """A layer whose statistics are (count, sum) of each column; it records every call."""

    def __init__(self, data_free=False, **kwargs):
        super().__init__(**kwargs)
        self.data_free = data_free
        self.calls = []

    @property
    def uses_data(self):
        return not self.data_free

    def _create_state(self, num_features):
        self.stats = self.add_weight(
            name="stats", shape=(2, num_features), initializer="zeros", trainable=False
        )

    def _exact_statistics(self, column):
        self.calls.append(("exact", column.copy(), None))
        return float(column.size), float(column.sum())

    def _private_statistics(self, column, lo, hi, epsilon, rng):
        self.calls.append(("private", column.copy(), (lo, hi, epsilon)))
        return float(column.size), float(rng.uniform())

    def _store(self, statistics, rows, finite):
        self.stored = (statistics, rows.shape, finite.sum())
        if statistics is not None:
            self.stats.assign(statistics.astype("float32"))


def _with_gaps():
    x = lognormal_data(n=50)
    x[[1, 4, 9], 0] = np.nan
    x[2, 2] = -np.inf
    return x


def test_exact_loop_gives_each_feature_its_finite_values():
    x = _with_gaps()
    layer = _Recorder()
    layer.adapt(x)
    assert [kind for kind, _, _ in layer.calls] == ["exact"] * 3
    for j, (_, column, _) in enumerate(layer.calls):
        np.testing.assert_array_equal(column, x[np.isfinite(x[:, j]), j])
    expected = [
        [np.isfinite(x[:, j]).sum() for j in range(3)],
        np.nansum(np.where(np.isfinite(x), x, np.nan), axis=0),
    ]
    np.testing.assert_allclose(layer.stats.numpy(), expected, rtol=1e-6)
    assert layer.dp_epsilon_spent == 0.0 and float(layer.adapt_count.numpy()) == 50.0


def test_private_loop_splits_the_budget_evenly_over_features():
    x = _with_gaps()
    layer = _Recorder(dp_epsilon=1.5, dp_bounds=([0, 0, 0], [10, 100, 1]), seed=3)
    layer.adapt(x)
    assert [kind for kind, _, _ in layer.calls] == ["private"] * 3
    for j, (_, column, (lo, hi, epsilon)) in enumerate(layer.calls):
        np.testing.assert_array_equal(column, x[np.isfinite(x[:, j]), j])
        assert (lo, hi) == ([0, 0, 0][j], [10, 100, 1][j])
        assert epsilon == pytest.approx(0.5)
    assert layer.dp_epsilon_spent == pytest.approx(1.5)
    assert float(layer.adapt_count.numpy()) == 1.0  # no exact row count under DP
    # The seed fixes the noise; one generator serves all features in order.
    draws = np.random.default_rng(3).uniform(size=3)
    np.testing.assert_allclose(layer.stats.numpy()[1], draws, rtol=1e-6)


def test_data_free_layers_ask_for_no_statistics():
    x = _with_gaps()
    x[:, 1] = np.nan  # would be refused by a layer that uses the data
    layer = _Recorder(data_free=True, dp_epsilon=1.0, dp_bounds=(0, 1))
    layer.adapt(x)
    assert layer.calls == [] and layer.stored[0] is None
    assert layer.dp_epsilon_spent == 0.0 and layer.is_adapted


@pytest.mark.parametrize(
    "factory",
    [
        lambda: Imputer(strategy="mean"),
        lambda: OutlierClipper(method="mad"),
        lambda: RobustNormalization(),
        lambda: InputGuard(on_violation="clip"),
    ],
)
def test_eager_model_and_tf_data_agree(factory):
    x = lognormal_data(n=64).astype("float32")
    x[3, 1] = np.nan if not isinstance(factory(), RobustNormalization) else x[3, 1]
    layer = factory()
    layer.adapt(tf.data.Dataset.from_tensor_slices(x).batch(16))  # adapt from a dataset
    reference = factory()
    reference.adapt(x)  # same statistics from the array
    for a, b in zip(layer.weights, reference.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)
    eager = np.asarray(layer(x))
    inputs = keras.Input((3,))
    model = keras.Model(inputs, layer(inputs))
    np.testing.assert_allclose(model.predict(x, batch_size=16, verbose=0), eager, rtol=1e-6)
    mapped = np.concatenate(list(tf.data.Dataset.from_tensor_slices(x).batch(16).map(layer)))
    np.testing.assert_allclose(mapped, eager, rtol=1e-6)
    assert_config_round_trip(layer)


def test_adapt_accepts_dataframe_tensor_unbatched_dataset_and_xy_dataset():
    x = lognormal_data(n=50)
    expected = np.median(x, axis=0)
    sources = [
        pd.DataFrame(x, columns=["a", "b", "c"]),
        tf.constant(x),
        tf.data.Dataset.from_tensor_slices(x),
        tf.data.Dataset.from_tensor_slices((x, np.zeros(50))).batch(7),
    ]
    for data in sources:
        layer = Imputer()
        layer.adapt(data)
        np.testing.assert_allclose(layer.fill.numpy(), expected, rtol=1e-6)
        assert layer.is_adapted


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_bad_input_errors_name_the_problem(cls):
    with pytest.raises(ValueError, match="`data` must be non-empty"):
        cls().adapt(np.zeros((0, 3)))
    x = lognormal_data(n=20)
    x[:, 1] = np.nan
    frame = pd.DataFrame(x, columns=["age", "income", "height"])
    with pytest.raises(ValueError, match=r"feature 1 \('income'\) has no finite value"):
        cls().adapt(frame)
    layer = cls()
    layer.adapt(lognormal_data(n=20))
    with pytest.raises(ValueError, match="`data` must be 3 features wide"):
        layer.adapt(lognormal_data(n=20, f=2))
    with pytest.raises(ValueError, match="x.reshape"):
        cls().adapt(np.arange(5.0))
    with pytest.raises(ValueError, match="`dp_bounds` must be a pair"):
        cls(dp_epsilon=1.0).adapt(lognormal_data(n=20))
    with pytest.raises(ValueError, match="`dp_epsilon` must be"):
        cls(dp_epsilon=-1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        cls(dp_epsilon=1.0, dp_bounds=(1.0, 0.0))
    with pytest.raises(ValueError, match="`seed` must be"):
        cls(seed=1.5)
    with pytest.raises(ValueError, match="`data` must be numeric in every column"):
        cls().adapt(pd.DataFrame({"a": ["x", "y"], "b": [1.0, 2.0]}))


@pytest.mark.parametrize(
    "factory",
    [
        lambda s: Imputer(strategy="mean", dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
        lambda s: Imputer(strategy="median", dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
        lambda s: RobustNormalization(dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
        lambda s: RobustNormalization(method="mean_std", dp_epsilon=1.0, dp_bounds=(-5, 5), seed=s),
    ],
)
def test_dp_error_shrinks_with_n(factory):
    def mean_error(n):
        x = np.random.default_rng(n).normal(size=(n, 1))
        exact = factory(0).__class__(**{**factory(0).get_config(), "dp_epsilon": None})
        exact.adapt(x)
        errs = []
        for seed in range(30):
            layer = factory(seed)
            layer.adapt(x)
            errs.append(np.abs(layer.weights[0].numpy() - exact.weights[0].numpy()).max())
        return np.mean(errs)

    small, large = mean_error(100), mean_error(10000)
    assert large < small / 8, (small, large)
    assert large < 0.05


def test_dp_adapt_needs_one_row_per_record_and_keeps_no_row_count():
    x = np.random.default_rng(1).uniform(size=(1234, 2))
    layer = RobustNormalization(dp_epsilon=1.0, dp_bounds=(0.0, 1.0), seed=0)
    layer.adapt(x)
    assert layer.is_adapted and float(layer.adapt_count.numpy()) != 1234.0
    with pytest.raises(ValueError, match="2-D"):
        RobustNormalization(dp_epsilon=1.0, dp_bounds=(0.0, 1.0)).adapt(x.reshape(617, 2, 2))
    with pytest.raises(ValueError, match="3 features"):
        Imputer(dp_epsilon=1.0, dp_bounds=([0, 0], [1, 1])).adapt(np.zeros((5, 3)))
