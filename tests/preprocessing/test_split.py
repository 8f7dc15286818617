"""train_val_test_split and drop_cross_duplicates."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from keras_safe.preprocessing import drop_cross_duplicates, train_val_test_split


def _ids(part):
    return part[:, 0].astype(int)


def _data(n=503, classes=(0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05), seed=1):
    rng = np.random.default_rng(seed)
    y = rng.choice(len(classes), size=n, p=classes)
    x = np.column_stack([np.arange(n), rng.normal(size=(n, 2))])  # column 0: row id
    return x, y


@pytest.mark.parametrize("val,test", [(0.1, 0.1), (0.15, 0.2), (0.0, 0.3), (0.25, 0.0)])
def test_sizes_no_overlap_and_class_proportions_within_one(val, test):
    x, y = _data()
    n = len(x)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = train_val_test_split(x, y, val=val, test=test)
    ids = [_ids(x_tr), _ids(x_va), _ids(x_te)]
    # A partition: no overlap, nothing lost.
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(n))
    # Rows and labels stay aligned.
    for part_x, part_y in [(x_tr, y_tr), (x_va, y_va), (x_te, y_te)]:
        np.testing.assert_array_equal(part_y, y[_ids(part_x)])
    fractions = [1 - val - test, val, test]
    for part_y, frac in zip([y_tr, y_va, y_te], fractions, strict=True):
        assert abs(len(part_y) - n * frac) <= 1
        for c in np.unique(y):
            assert abs(np.sum(part_y == c) - np.sum(y == c) * frac) <= 1 + 1e-9


def test_same_seed_same_split_other_seed_other_split():
    x, y = _data()
    a = train_val_test_split(x, y, seed=7)
    b = train_val_test_split(x, y, seed=7)
    c = train_val_test_split(x, y, seed=8)
    for p in range(3):
        np.testing.assert_array_equal(a[p][0], b[p][0])
    assert set(_ids(a[2][0])) != set(_ids(c[2][0]))


@pytest.mark.parametrize("stratify", [True, False])
def test_groups_are_never_split(stratify):
    x, y = _data(n=600)
    groups = np.random.default_rng(3).integers(0, 80, size=len(x))
    parts = train_val_test_split(x, y, val=0.2, test=0.2, groups=groups, stratify=stratify)
    owner = {}
    for p, (px, _) in enumerate(parts):
        for g in np.unique(groups[_ids(px)]):
            assert owner.setdefault(g, p) == p, f"group {g} in parts {owner[g]} and {p}"
    sizes = [len(px) for px, _ in parts]
    assert sum(sizes) == 600
    # Whole groups of ~7.5 rows: sizes are approximate but close to the fractions.
    np.testing.assert_allclose(sizes, [360, 120, 120], atol=20)


def test_pandas_in_pandas_out_and_continuous_targets():
    x, y = _data(n=200)
    frame = pd.DataFrame(x, columns=["id", "a", "b"], index=np.arange(200) * 10)
    target = pd.Series(np.random.default_rng(0).normal(size=200), index=frame.index)  # regression
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = train_val_test_split(frame, target, seed=0)
    assert isinstance(x_tr, pd.DataFrame) and isinstance(y_tr, pd.Series)
    assert (len(x_tr), len(x_va), len(x_te)) == (160, 20, 20)
    assert x_tr.index.equals(y_tr.index)  # aligned rows
    assert not set(x_tr.index) & set(x_te.index)
    # Without y: features only.
    (x_tr, y_tr), _, _ = train_val_test_split(x, test=0.5, val=0.0)
    assert y_tr is None and len(x_tr) == 100


def test_one_hot_labels_are_stratified():
    x, y = _data(n=300)
    onehot = np.eye(7)[y]
    (_, y_tr), (_, y_va), _ = train_val_test_split(x, onehot, val=0.2, test=0.1)
    for c in range(7):
        assert abs(y_va[:, c].sum() - 0.2 * np.sum(y == c)) <= 1


def test_dataset_form():
    x, y = _data(n=300)
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y))
    train, val, test = train_val_test_split(ds, val=0.2, test=0.2, seed=0)
    parts = [np.stack([e[0] for e in d.as_numpy_iterator()]) for d in (train, val, test)]
    labels = [np.array([e[1] for e in d.as_numpy_iterator()]) for d in (train, val, test)]
    ids = [_ids(p) for p in parts]
    np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(300))
    # Same rows as the array form with the same seed.
    array_parts = train_val_test_split(x, y, val=0.2, test=0.2, seed=0)
    for got, (ax, _) in zip(ids, array_parts, strict=True):
        assert set(got) == set(_ids(ax))
    for lab, frac in zip(labels, [0.6, 0.2, 0.2], strict=True):
        for c in range(7):
            assert abs(np.sum(lab == c) - frac * np.sum(y == c)) <= 1
    groups = np.arange(300) // 5
    train, val, test = train_val_test_split(ds, groups=groups, seed=0)
    seen = [
        set(groups[_ids(np.stack([e[0] for e in d.as_numpy_iterator()]))])
        for d in (train, val, test)
    ]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_bad_arguments():
    x, y = _data(n=100)
    with pytest.raises(ValueError, match="`val \\+ test` must be < 1"):
        train_val_test_split(x, y, val=0.5, test=0.5)
    with pytest.raises(ValueError, match="`test` must be a fraction"):
        train_val_test_split(x, y, test=-0.1)
    y_rare = y.copy()
    y_rare[0] = 42
    with pytest.raises(ValueError, match="class 42 has only 1 member.*stratify=False"):
        train_val_test_split(x, y_rare)
    train_val_test_split(x, y_rare, stratify=False)  # the fix works
    with pytest.raises(
        ValueError, match=r"`y` must be aligned with the data \(100 rows\), got 99 rows"
    ):
        train_val_test_split(x, y[:-1])
    with pytest.raises(
        ValueError, match="`groups` must be at least 3 distinct groups.*got 2 distinct"
    ):
        train_val_test_split(x, y, groups=np.arange(100) % 2, stratify=False)


def test_drop_cross_duplicates():
    x, y = _data(n=40)
    x_train = x[:20]
    x_val = np.concatenate([x[20:30], x[:3]])  # 3 rows leaked from train
    negative_zero = x[:1].copy()
    negative_zero[0, 0] = -0.0  # row 0 has id 0.0: equal to a train row
    x_test = np.concatenate([x[30:], x[25:27], x[5:6], negative_zero])
    y_val, y_test = np.arange(len(x_val)), np.arange(len(x_test))
    (tr, va, te), counts = drop_cross_duplicates(
        (x_train, y[:20]), (x_val, y_val), (x_test, y_test), return_counts=True
    )
    assert counts == {"val": 3, "test": 4}  # 2 rows also in val, 2 also in train
    np.testing.assert_array_equal(va[0], x[20:30])
    np.testing.assert_array_equal(va[1], np.arange(10))
    np.testing.assert_array_equal(te[0], x[30:])
    # Brute-force check on the remaining parts: no test row equals a train or val row.
    for row in te[0]:
        assert not any(np.array_equal(row, r) for r in np.concatenate([tr[0], va[0]]))
    # DataFrames and NaN rows.
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0], "b": ["x", "y", "z"]})
    _, val_frame, _ = drop_cross_duplicates(frame.iloc[:2], frame.iloc[1:], frame.iloc[:0])
    assert val_frame["a"].tolist() == [3.0]
    with pytest.raises(ValueError, match="different feature shapes"):
        drop_cross_duplicates(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((1, 3)))


def test_stratified_rounding_on_random_class_sizes():
    rng = np.random.default_rng(0)
    for trial in range(25):
        num_classes = int(rng.integers(2, 40))
        counts = rng.integers(3, 60, size=num_classes)
        y = np.repeat(np.arange(num_classes), counts)
        x = np.arange(len(y))[:, None].astype(float)
        val, test = float(rng.uniform(0.05, 0.4)), float(rng.uniform(0.05, 0.4))
        parts = train_val_test_split(x, y, val=val, test=test, seed=trial)
        for (_, part_y), frac in zip(parts, [1 - val - test, val, test], strict=True):
            assert abs(len(part_y) - len(y) * frac) <= 1
            per_class = np.bincount(part_y, minlength=num_classes)
            assert np.all(np.abs(per_class - counts * frac) <= 1 + 1e-9), (trial, frac)
