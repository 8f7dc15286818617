"""What a tensor of the traced step depends on, and the shapes the rules reason about.

Every tensor of the step gets one of these values:

- `None`: nothing of the data (constants, weights, random draws, shapes);
- `Rows(axis, outer, inner)`: the data, row by row. The examples lie along `axis`, whose
  entry `(o * B + b) * inner + j` depends on example `b` alone (`0 <= o < outer`,
  `0 <= j < inner`); `outer` or `inner` exceed 1 where the batch axis was folded with another
  one (`[B, T, D] -> [B*T, D]` has `inner = T`; a concatenation of two batches has `outer = 2`);
- `ListRows(rows)`: a `TensorList` whose elements are `rows`;
- `Mixed(op, reason)`: the data across examples, with the op where it first happened.

`join` combines the values of one tensor seen along several paths (loop iterations, branches).
Symbolic shapes (`Sym(f)`, meaning `f` times the batch size) let the rules read reduction axes
and sizes that TensorFlow computes from shapes at run time (`BroadcastGradientArgs`).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

__all__ = ["ListRows", "Mixed", "Rows", "Sym", "is_data", "join", "mixed"]


@dataclasses.dataclass(frozen=True)
class Rows:
    axis: int
    outer: int = 1
    inner: int = 1

    def at(self, axis):
        return Rows(axis, self.outer, self.inner)


@dataclasses.dataclass(frozen=True)
class ListRows:
    rows: Rows


@dataclasses.dataclass(frozen=True)
class Mixed:
    op: str
    type: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Sym:
    """A dimension equal to `factor` times the (unknown) batch size."""

    factor: int


def mixed(op, reason):
    return Mixed(op.name, op.type, reason)


def is_data(value):
    return value is not None


def join(a, b, op=None, reason="takes rows from different places on different paths"):
    """The value of a tensor that is `a` on one path and `b` on another."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if isinstance(a, Mixed):
        return a
    if isinstance(b, Mixed):
        return b
    if op is None:
        return Mixed("?", "?", reason)
    return mixed(op, reason)


# -- static shapes and values ---------------------------------------------------------------------


def dims(tensor):
    """The static dimensions of `tensor` as a list (None: unknown), or None for an unknown rank."""
    shape = tensor.shape
    if shape.rank is None:
        return None
    return shape.as_list()


def rank(tensor):
    return tensor.shape.rank


def product(values):
    return math.prod(values) if values else 1


def static_value(tensor, symbols=None):
    """The value of a tensor computed from constants and shapes only, or None.

    `symbols` maps tensor refs to symbolic values (lists of ints and `Sym`) computed by the
    analysis for shape arithmetic TensorFlow cannot fold.
    """
    if symbols is not None and tensor.ref() in symbols:
        return symbols[tensor.ref()]
    try:
        value = tf.get_static_value(tensor)
    except (TypeError, ValueError, NotImplementedError):
        value = None
    if value is None:
        return None
    value = np.asarray(value)
    return value.tolist()


def int_list(value):
    """`value` as a list of Python ints (scalars become one-element lists), or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return None
        return [int(v) for v in value]
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    return None


def normalize_axes(axes, size):
    return sorted({a + size if a < 0 else a for a in axes})
