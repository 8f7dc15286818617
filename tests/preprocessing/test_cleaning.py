"""RowCleaner and drop_rows on arrays, DataFrames and tf.data."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_safe.preprocessing import RowCleaner, drop_rows


def _data(seed=0):
    x = np.random.default_rng(seed).normal(size=(200, 4))
    x[3, :3] = np.nan  # 75% missing
    x[4, 0] = np.nan  # 25% missing: kept
    x[7, 1] = 1e6  # far out
    x[9, 2] = -50.0
    return x


def _brute_force_keep(x, reference, factor=3.0, max_missing=0.5):
    keep = []
    for row in x:
        missing = np.mean(~np.isfinite(row))
        outlier = False
        for j, v in enumerate(row):
            col = reference[:, j][np.isfinite(reference[:, j])]
            q1, q3 = np.percentile(col, [25, 75])
            if np.isfinite(v) and (v < q1 - factor * (q3 - q1) or v > q3 + factor * (q3 - q1)):
                outlier = True
        keep.append(missing <= max_missing and not outlier)
    return np.array(keep)


def test_row_cleaner_matches_brute_force():
    x = _data()
    y = np.arange(len(x))
    cleaner = RowCleaner().fit(x)
    expected = _brute_force_keep(x, x)
    np.testing.assert_array_equal(cleaner.mask(x), expected)
    x_kept, y_kept = cleaner.transform(x, y)
    np.testing.assert_array_equal(y_kept, y[expected])
    np.testing.assert_array_equal(x_kept, x[expected])
    assert {3, 7, 9}.isdisjoint(set(y_kept)) and 4 in set(y_kept)
    assert cleaner.last_dropped["missing"] == 1
    assert cleaner.last_dropped["outliers"] == len(x) - expected.sum() - 1


def test_fences_come_from_the_reference_only():
    x_train = _data()
    x_test = np.random.default_rng(5).normal(size=(50, 4)) * 3.0
    kept = drop_rows(x_test, reference=x_train)
    np.testing.assert_array_equal(kept, x_test[_brute_force_keep(x_test, x_train)])


def test_dataframe_and_dataset():
    x = _data()
    frame = pd.DataFrame(x, columns=list("abcd"))
    cleaner = RowCleaner(max_missing=0.2, method="mad", z=5.0).fit(frame)
    kept = cleaner.transform(frame)
    assert isinstance(kept, pd.DataFrame)
    assert 4 not in kept.index and 3 not in kept.index  # 25% > 20% missing
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(len(x))))
    ids = [int(e[1]) for e in cleaner.filter_dataset(ds).as_numpy_iterator()]
    assert ids == kept.index.tolist()


def test_missing_only_and_errors():
    x = np.array([[1.0, 2.0], [np.nan, np.nan], [1.5, 2.5], [2.0, 3.0]])
    np.testing.assert_array_equal(drop_rows(x, method=None), x[[0, 2, 3]])
    with pytest.raises(ValueError, match="`max_missing` must be"):
        RowCleaner(max_missing=2)
    with pytest.raises(ValueError, match="`method` must be one of"):
        RowCleaner(method="sigma")
    with pytest.raises(ValueError, match="`max_outlier_features` must be"):
        RowCleaner(max_outlier_features=1.5)
    with pytest.raises(ValueError, match="`z` must be"):
        RowCleaner(method=None, z=0.0)  # checked even when no fence is used
    with pytest.raises(ValueError, match="call fit"):
        RowCleaner().mask(x)
    with pytest.raises(ValueError, match="`x` must be non-empty"):
        RowCleaner().fit(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="feature 0 has no finite"):
        RowCleaner().fit(np.array([[np.nan, 1.0], [np.nan, 2.0]]))
    with pytest.raises(ValueError, match="fitted on 2 features"):
        RowCleaner().fit(x[[0, 2, 3]]).mask(np.zeros((1, 3)))
