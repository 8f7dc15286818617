"""Leak-free splitting: deterministic, stratified, group-aware train/val/test splits."""

from collections import deque

import numpy as np
import tensorflow as tf

from keras_safe._data import (
    Description,
    describe,
    is_dataframe,
    is_series,
    length,
    take_rows,
    to_array,
)
from keras_safe._validation import fail

__all__ = ["drop_cross_duplicates", "train_val_test_split"]

_PART_NAMES = ("train", "val", "test")


def _check_fraction(name, value):
    try:
        ok = not isinstance(value, bool) and 0.0 <= float(value) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        fail(name, value, "a fraction in [0, 1)", f"pass for example {name}=0.1.")
    return float(value)


def _check_aligned(name, count, n, what="rows"):
    if count != n:
        fail(
            name,
            Description(f"{count} {what}"),
            f"aligned with the data ({n} rows)",
            "pass one entry per row.",
        )


def _largest_remainder(exact, total):
    """Rounds `exact` (summing to `total`) to integers with the same sum, each floor or ceil."""
    floors = np.floor(exact + 1e-9).astype(int)
    remainder = int(total - floors.sum())
    if remainder > 0:
        order = np.argsort(-(exact - floors), kind="stable")
        floors[order[:remainder]] += 1
    return floors


def _controlled_rounding(counts, fractions, rng):
    """Allocates `counts[c]` members of each class to parts, each within one of exact.

    Returns an integer table `alloc[c, p]` with `alloc[c, p]` equal to the floor or ceiling of
    `counts[c] * fractions[p]`, rows summing to `counts` and columns summing to the
    largest-remainder rounding of the part sizes. Such a rounding always exists (Bacharach,
    "Matrix rounding problems", 1966); it is found as a maximum flow between classes and parts
    over the cells with a fractional part.
    """
    counts = np.asarray(counts, dtype=int)
    exact = counts[:, None] * fractions[None, :]
    floors = np.floor(exact + 1e-9).astype(int)
    frac = exact - floors
    can = frac > 1e-9
    row_need = counts - floors.sum(axis=1)
    col_total = _largest_remainder(fractions * counts.sum(), counts.sum())
    col_need = col_total - floors.sum(axis=0)
    num_classes, num_parts = exact.shape
    extra = np.zeros_like(floors)
    row_left = row_need.copy()
    col_left = col_need.copy()
    # Greedy start in random class order, then augmenting paths (Ford-Fulkerson).
    for c in rng.permutation(num_classes):
        for p in np.argsort(-frac[c], kind="stable"):
            if row_left[c] == 0:
                break
            if can[c, p] and col_left[p] > 0 and extra[c, p] == 0:
                extra[c, p] = 1
                row_left[c] -= 1
                col_left[p] -= 1
    while row_left.sum() > 0:
        # BFS over the residual graph: class -> part on a free fractional cell, part -> class
        # on an assigned cell (undo), ending at a part with spare capacity.
        start = [c for c in range(num_classes) if row_left[c] > 0]
        parent = {("c", c): None for c in start}
        queue = deque(("c", c) for c in start)
        end = None
        while queue and end is None:
            kind, i = queue.popleft()
            if kind == "c":
                for p in range(num_parts):
                    node = ("p", p)
                    if can[i, p] and extra[i, p] == 0 and node not in parent:
                        parent[node] = (kind, i)
                        if col_left[p] > 0:
                            end = node
                            break
                        queue.append(node)
            else:
                for c in np.flatnonzero(extra[:, i] == 1):
                    node = ("c", int(c))
                    if node not in parent:
                        parent[node] = (kind, i)
                        queue.append(node)
        if end is None:  # pragma: no cover - excluded by the matrix rounding theorem
            raise RuntimeError("stratified allocation failed; please report this data shape")
        node = end
        col_left[end[1]] -= 1
        while parent[node] is not None:
            prev = parent[node]
            if node[0] == "p":
                extra[prev[1], node[1]] = 1
            else:
                extra[node[1], prev[1]] = 0
            node = prev
        row_left[node[1]] -= 1
    return floors + extra


def _stratify_labels(y, stratify, n):
    """Class labels to stratify on, or None."""
    if stratify is False or stratify is None:
        return None
    if stratify is not True:
        labels = np.asarray(stratify)
        _check_aligned("stratify", labels.shape[0], n, "labels")
        return labels.reshape(n, -1) if labels.ndim > 1 else labels
    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        is_onehot = np.isin(y, (0, 1)).all() and np.all(y.sum(axis=1) == 1)
        return np.argmax(y, axis=1) if is_onehot else None
    if y.ndim != 1:
        return None
    if y.dtype.kind in "fc":
        finite = np.isfinite(y)
        if not finite.all() or not np.all(y == np.round(y)):
            return None  # continuous target: split at random
    return y


def _encode(labels):
    if labels.ndim > 1:
        labels = np.array([row.tobytes() for row in np.ascontiguousarray(labels)])
    classes, codes = np.unique(labels, return_inverse=True)
    return classes, codes.reshape(-1)


def _assign(n, labels, groups, fractions, rng):
    """Part index (0 train, 1 val, 2 test) of every row, and the order of rows per part."""
    active = int(np.sum(fractions > 0))
    part = np.zeros(n, dtype=int)
    if labels is not None:
        classes, codes = _encode(labels)
        counts = np.bincount(codes, minlength=len(classes))
        too_few = np.flatnonzero(counts < active)
        if too_few.size:
            c = int(too_few[0])
            label = classes[c].item() if hasattr(classes[c], "item") else classes[c]
            fail(
                "stratify",
                Description(f"labels where class {label!r} has only {counts[c]} member(s)"),
                f"labels with at least {active} members per class, one for each non-empty part",
                "merge or drop rare classes, or pass stratify=False.",
            )
    if groups is None:
        if labels is None:
            sizes = _largest_remainder(fractions * n, n)
            perm = rng.permutation(n)
            part[perm[sizes[0] : sizes[0] + sizes[1]]] = 1
            part[perm[sizes[0] + sizes[1] :]] = 2
            return part
        alloc = _controlled_rounding(counts, fractions, rng)
        for c in range(len(classes)):
            members = rng.permutation(np.flatnonzero(codes == c))
            a0, a1 = alloc[c, 0], alloc[c, 1]
            part[members[a0 : a0 + a1]] = 1
            part[members[a0 + a1 :]] = 2
        return part
    # Group-aware: whole groups go to one part, largest groups first, each to the part whose
    # remaining need (in rows, or in rows of the group's classes when stratifying) is largest.
    group_ids, group_codes = np.unique(np.asarray(groups), return_inverse=True)
    group_codes = group_codes.reshape(-1)
    num_groups = len(group_ids)
    if num_groups < active:
        fail(
            "groups",
            Description(f"{num_groups} distinct group(s)"),
            f"at least {active} distinct groups, one per non-empty part (every group goes "
            "whole into one part)",
            "pass finer groups, or fewer parts (val=0 or test=0).",
        )
    sizes = np.bincount(group_codes, minlength=num_groups)
    order = rng.permutation(num_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    if labels is not None:
        profile = np.zeros((num_groups, len(classes)))
        np.add.at(profile, (group_codes, codes), 1.0)
        need = counts[None, :] * fractions[:, None]
    else:
        profile = sizes[:, None].astype(float)
        need = (fractions * n)[:, None]
    need = need.astype(float)
    taken = np.zeros(3, dtype=bool)
    group_part = np.zeros(num_groups, dtype=int)
    for k, g in enumerate(order):
        score = (need @ profile[g]) / max(sizes[g], 1)
        remaining_groups = num_groups - k
        missing = [p for p in range(3) if fractions[p] > 0 and not taken[p]]
        if len(missing) >= remaining_groups:
            candidates = missing  # keep every non-empty part non-empty
        else:
            candidates = [p for p in range(3) if fractions[p] > 0]
        p = max(candidates, key=lambda q: (score[q], -q))
        group_part[g] = p
        taken[p] = True
        need[p] -= profile[g]
    return group_part[group_codes]


def train_val_test_split(x, y=None, val=0.1, test=0.1, stratify=True, groups=None, seed=0):
    """Splits data into training, validation and test parts without leaks between them.

    Deterministic (same `seed`, same split), stratified (each class is spread over the parts
    in proportion: every part holds the floor or ceiling of `class_count * fraction` of each
    class, and the part sizes are the rounded fractions of `len(x)`), and group-aware: with
    `groups` (for example a person or patient id per row), all rows of a group land in the
    same part, so no person is in both the training and the test data. With groups,
    stratification and sizes are approximate (whole groups are assigned greedily, largest
    first, to the part that needs their rows most).

    `stratify=True` stratifies on `y` when `y` holds class labels (integers, strings, booleans,
    whole-number floats or one-hot rows); a continuous `y` is split at random. Pass an array
    as `stratify` to stratify on other labels, or `stratify=False` to turn it off.

    Args:
        x: numpy array (or array-like), pandas DataFrame, or an unbatched `tf.data.Dataset`
            whose elements are `x` or `(x, y, ...)`.
        y: targets aligned with `x` (array or pandas Series/DataFrame), or None. Must be None
            for a dataset (labels are read from its elements).
        val: fraction of rows for validation, in `[0, 1)`.
        test: fraction of rows for testing, in `[0, 1)`; `val + test` must be below 1.
        stratify: True, False, or an array of labels (one per row).
        groups: optional array of group ids (one per row).
        seed: seed of the shuffling.

    Returns:
        `(x_train, y_train), (x_val, y_val), (x_test, y_test)`, the same types as the inputs
        (rows of each part in shuffled order; `y_*` is None when `y` is None). For a
        `tf.data.Dataset`, a tuple `(train_ds, val_ds, test_ds)` of datasets that keep the
        input order (shuffle and batch the training part yourself); labels and groups are
        read with one pass over the dataset.

    Raises:
        ArgumentError: `val + test >= 1`, fractions outside `[0, 1)`, length mismatches, a
            stratify class with fewer members than non-empty parts, or fewer groups than parts.

    Example:
        >>> import numpy as np
        >>> x = np.arange(100).reshape(50, 2)
        >>> y = np.repeat([0, 1], 25)
        >>> (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = train_val_test_split(
        ...     x, y, val=0.2, test=0.2, seed=0)
        >>> len(x_tr), len(x_va), len(x_te), int(y_va.sum())
        (30, 10, 10, 5)
    """
    val = _check_fraction("val", val)
    test = _check_fraction("test", test)
    if val + test >= 1.0:
        fail(
            "val + test",
            val + test,
            "< 1 to leave training data",
            "pass smaller fractions, e.g. val=0.1, test=0.1.",
        )
    fractions = np.array([1.0 - val - test, val, test])
    rng = np.random.default_rng(seed)

    if isinstance(x, tf.data.Dataset):
        if y is not None:
            fail(
                "y",
                describe(y),
                "None when `x` is a tf.data.Dataset",
                "put the labels in the dataset elements as (x, y).",
            )
        return _split_dataset(x, fractions, stratify, groups, rng)

    n = length(x, "x")
    if n == 0:
        fail("x", describe(x), "non-empty", "pass the rows to split.")
    if y is not None:
        _check_aligned("y", length(y, "y"), n)
    if groups is not None:
        _check_aligned("groups", length(groups, "groups"), n)
    labels = _stratify_labels(to_array(y), stratify, n)
    part = _assign(n, labels, groups, fractions, rng)
    result = []
    for p in range(3):
        idx = rng.permutation(np.flatnonzero(part == p))
        result.append((take_rows(x, idx), take_rows(y, idx)))
    return tuple(result)


def _split_dataset(ds, fractions, stratify, groups, rng):
    spec = ds.element_spec
    has_labels = isinstance(spec, tuple) and len(spec) >= 2
    labels = None
    if stratify is True and has_labels:
        ys = [np.asarray(element[1]) for element in ds.as_numpy_iterator()]
        n = len(ys)
        labels = _stratify_labels(np.stack(ys) if ys else np.zeros(0), True, n)
    else:
        n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
        if stratify is not True:
            labels = _stratify_labels(None, stratify, n)
    if n == 0:
        fail("x", describe(ds, "without elements"), "non-empty", "pass the rows to split.")
    if groups is not None:
        _check_aligned("groups", length(groups, "groups"), n)
    part = tf.constant(_assign(n, labels, groups, fractions, rng), dtype=tf.int64)

    def select(p):
        keep = ds.enumerate().filter(lambda i, element: tf.equal(tf.gather(part, i), p))
        return keep.map(lambda i, element: element)

    return tuple(select(p) for p in range(3))


def _row_keys(data):
    """Hashable exact keys of the rows of an array or DataFrame (NaN == NaN, -0.0 == 0.0)."""
    if is_dataframe(data) or is_series(data):
        frame = data.to_frame() if is_series(data) else data
        if all(kind in "biuf" for kind in frame.dtypes.map(lambda d: d.kind)):
            data = frame.to_numpy(dtype="float64")
        else:
            import pandas as pd

            return [int(h) for h in pd.util.hash_pandas_object(frame, index=False)]
    array = np.asarray(data)
    array = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    if array.dtype.kind in "biuf":
        array = array.astype("float64") + 0.0  # one dtype for all parts; -0.0 becomes 0.0
        array[np.isnan(array)] = np.nan
        return [row.tobytes() for row in np.ascontiguousarray(array)]
    return [tuple(row.tolist()) for row in array]


def drop_cross_duplicates(train, val, test, return_counts=False):
    """Drops validation/test rows whose features also appear in an earlier part.

    Exact duplicates across parts (the same record collected twice, an augmented copy) let a
    model be evaluated on rows it was trained on. Rows of `val` equal to a `train` row, and
    rows of `test` equal to a `train` or `val` row, are dropped; `train` is not changed.
    Features are compared exactly (numeric values as float64, NaN equal to NaN).

    Args:
        train: `(x, y)` pair (as returned by `train_val_test_split`) or features `x`.
        val: same for validation.
        test: same for testing.
        return_counts: if True, also return `{"val": k, "test": m}`, the rows dropped.

    Returns:
        `(train, val, test)` in the same structure as given (and the counts if asked).

    Raises:
        ArgumentError: parts with different numbers of features.

    Example:
        >>> import numpy as np
        >>> train = (np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0, 1]))
        >>> val = (np.array([[1.0, 2.0], [5.0, 6.0]]), np.array([0, 1]))
        >>> test = (np.array([[5.0, 6.0]]), np.array([1]))
        >>> _, (x_val, _), (x_test, _) = drop_cross_duplicates(train, val, test)
        >>> x_val.tolist(), len(x_test)
        ([[5.0, 6.0]], 0)
    """

    def features(part):
        return part[0] if isinstance(part, tuple) else part

    widths = set()
    for name, part in zip(_PART_NAMES, (train, val, test), strict=True):
        x = features(part)
        shape = np.shape(x)
        if len(shape) >= 2:
            widths.add(tuple(shape[1:]))
        if x is None:
            fail(name, part, "features `x` or a pair `(x, y)`", "pass the part's rows.")
    if len(widths) > 1:
        fail(
            "train, val, test",
            Description(f"parts with different feature shapes {sorted(widths)}"),
            "parts with the same feature shape",
            "pass the three parts of one data set.",
        )
    seen = set(_row_keys(features(train)))
    out = [train]
    counts = {}
    for name, part in (("val", val), ("test", test)):
        keys = _row_keys(features(part))
        keep = np.array([k not in seen for k in keys], dtype=bool)
        counts[name] = int((~keep).sum())
        idx = np.flatnonzero(keep)
        if isinstance(part, tuple):
            out.append(tuple(take_rows(item, idx) for item in part))
        else:
            out.append(take_rows(part, idx))
        seen.update(k for k, kept in zip(keys, keep, strict=True) if kept)
    if return_counts:
        return tuple(out), counts
    return tuple(out)
