"""Shared pieces of the attacks: inputs and labels, output kind, losses and projections.

The numpy side turns what the user passes (numpy arrays, tensors, `tf.data` datasets) into
batches and labels. The graph side (`logits`, `objective`, `project`, ...) is plain TensorFlow
that runs inside the attacks' compiled functions.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import check_choice, check_number, fail

__all__ = [
    "NORMS",
    "as_labels",
    "batches",
    "check_epsilon",
    "check_norm",
    "check_outputs",
    "check_range",
    "direction",
    "fooled",
    "logits",
    "margin",
    "model_fn",
    "objective",
    "output_kind",
    "perturbation_norms",
    "project",
    "random_in_ball",
    "stage_output_kind",
]

NORMS = ("linf", "l2")

#: Probabilities are floored here before their log is taken.
_TINY = 1e-30


def check_norm(norm):
    return check_choice("norm", norm, NORMS, "use norm='linf' (max-norm) or norm='l2'.")


def check_range(clip_min, clip_max):
    """Checks the input range; returns float32 arrays (or None, None when unbounded)."""
    if (clip_min is None) != (clip_max is None):
        fail(
            "clip_min" if clip_min is None else "clip_max",
            None,
            "given together with its partner",
            "pass both clip_min and clip_max (the valid input range), or neither.",
        )
    if clip_min is None:
        return None, None
    low = np.asarray(clip_min, dtype=np.float32)
    high = np.asarray(clip_max, dtype=np.float32)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low < high)):
        fail(
            "clip_min",
            clip_min,
            f"finite and below clip_max={clip_max!r} everywhere",
            "pass the valid input range, for example clip_min=0.0, clip_max=1.0.",
        )
    return low, high


def check_epsilon(epsilon, name="epsilon"):
    return check_number(
        name, epsilon, low=0.0, fix="pass the attack budget, e.g. 8/255 for linf on [0, 1] images."
    )


def batches(x, y, batch_size):
    """Yields `(x_batch, y_batch)` from arrays, tensors or a `tf.data.Dataset`.

    A dataset must yield batches of `x`, `(x, y)` or `(x, y, sample_weight)`; `y` is then taken
    from the dataset and the `y` argument must be None.
    """
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            fail(
                "y",
                "array",
                "None when x is a tf.data.Dataset",
                "put the labels in the dataset as (x, y) batches, or pass arrays.",
            )
        for element in x:
            xb, yb, _ = keras.utils.unpack_x_y_sample_weight(element)
            yield xb, yb
        return
    n = int(x.shape[0])
    if y is not None and int(np.shape(y)[0]) != n:
        fail("y", f"{np.shape(y)[0]} labels", f"one label per input ({n})", "align x and y.")
    for start in range(0, n, batch_size):
        yield (
            x[start : start + batch_size],
            None if y is None else y[start : start + batch_size],
        )


def as_labels(y, num_classes):
    """Integer class labels `[B]` from int labels, one-hot rows or 0/1 targets."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        return np.argmax(y, axis=1).astype(np.int32)
    y = y.reshape(len(y), -1)[:, 0] if y.ndim > 1 else y
    if num_classes == 1:
        return (y > 0.5).astype(np.int32)
    if np.any(y != np.round(y)) or np.any(y < 0) or np.any(y >= num_classes):
        fail(
            "y",
            y[:5].tolist(),
            f"class labels in [0, {num_classes}) or one-hot rows",
            "pass the true classes (untargeted) or the target classes (targeted=True).",
        )
    return y.astype(np.int32)


def _compiled_from_logits(model):
    loss = getattr(model, "loss", None)
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        if "from_logits" in config:
            return bool(config["from_logits"])
    if isinstance(loss, str) and "crossentropy" in loss:
        return False
    return None


def _output_activation(model):
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "softmax"
    name = getattr(getattr(last, "activation", None), "__name__", "")
    return name if name in ("softmax", "sigmoid") else None


def stage_output_kind(model, from_logits=None):
    """`"logits"` or `"probabilities"` without running the model (compiled loss, last layer)."""
    if from_logits is not None:
        return "logits" if from_logits else "probabilities"
    compiled = _compiled_from_logits(model)
    if compiled is not None:
        return "logits" if compiled else "probabilities"
    return "probabilities" if _output_activation(model) else "logits"


def output_kind(model, outputs, from_logits=None):
    """Whether `outputs` (a batch of the model's outputs) are logits or probabilities.

    `from_logits` decides when given. Otherwise rows of two or more values that all lie in
    [0, 1] are probabilities (a softmax, or a softmax behind an output defence that rounds or
    cuts it; trained logits have negative values); a single output unit (binary) follows the
    compiled loss, then the output activation, then whether every value lies in [0, 1].
    """
    if from_logits is not None:
        return "logits" if from_logits else "probabilities"
    outputs = np.asarray(outputs, dtype=np.float64)
    in_unit = bool(np.all(outputs >= 0) and np.all(outputs <= 1))
    if outputs.shape[-1] > 1:
        return "probabilities" if in_unit else "logits"
    compiled = _compiled_from_logits(model)
    if compiled is not None:
        return "logits" if compiled else "probabilities"
    if _output_activation(model) == "sigmoid":
        return "probabilities"
    return "probabilities" if in_unit else "logits"


def check_outputs(outputs):
    if isinstance(outputs, (list, tuple, dict)) or len(outputs.shape) != 2:
        fail(
            "model",
            "a model with outputs of shape "
            + str(getattr(outputs, "shape", type(outputs).__name__)),
            "a classifier with one output of shape (batch, classes)",
            "attack a model whose single output holds the class scores.",
        )


# ---------------------------------------------------------------- graph side


def logits(outputs, kind):
    """Class scores `[B, K]` whose softmax is the model's prediction (`K >= 2`)."""
    outputs = tf.cast(outputs, tf.float32)
    if kind == "probabilities":
        if outputs.shape[-1] == 1:
            p = tf.clip_by_value(outputs, 1e-7, 1.0 - 1e-7)
            outputs = tf.math.log(p) - tf.math.log1p(-p)
        else:
            return tf.math.log(tf.maximum(outputs, _TINY))
    if outputs.shape[-1] == 1:
        return tf.concat([tf.zeros_like(outputs), outputs], axis=-1)
    return outputs


def model_fn(model, kind, dtype):
    """A graph function `x -> logits` of `model` in inference mode."""

    def call(x):
        return logits(model(tf.cast(x, dtype), training=False), kind)

    return call


def fooled(z, labels, targeted):
    """Whether each prediction is the target (targeted) or not the label (untargeted)."""
    pred = tf.argmax(z, axis=-1, output_type=tf.int32)
    return tf.equal(pred, labels) if targeted else tf.not_equal(pred, labels)


def margin(z, labels):
    """`z_label - max_{j != label} z_j` per example (< 0: the label is not predicted)."""
    one_hot = tf.one_hot(labels, tf.shape(z)[-1], dtype=z.dtype)
    own = tf.reduce_sum(z * one_hot, axis=-1)
    other = tf.reduce_max(z - 1e9 * one_hot, axis=-1)
    return own - other


def _dlr(z, labels):
    # Difference of logits ratio (Croce & Hein 2020): shift- and scale-invariant margin.
    top = tf.sort(z, axis=-1, direction="DESCENDING")
    one_hot = tf.one_hot(labels, tf.shape(z)[-1], dtype=z.dtype)
    own = tf.reduce_sum(z * one_hot, axis=-1)
    other = tf.reduce_max(z - 1e9 * one_hot, axis=-1)
    return -(own - other) / (top[:, 0] - top[:, 2] + 1e-12)


def objective(z, labels, targeted, loss="ce"):
    """Per-example value the attack maximises."""
    if loss == "dlr":
        return _dlr(z, labels)
    if loss == "margin":
        m = margin(z, labels)
        return m if targeted else -m
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=z)
    return -ce if targeted else ce


def _axes(x):
    return list(range(1, len(x.shape)))


def _norm(v):
    return tf.sqrt(tf.reduce_sum(tf.square(v), axis=_axes(v), keepdims=True))


def direction(g, norm):
    """The steepest-ascent direction of unit size: `sign(g)` (linf) or `g / ||g||_2` (l2)."""
    if norm == "linf":
        return tf.sign(g)
    return g / tf.maximum(_norm(g), 1e-12)


def _reshape_eps(epsilon, x):
    epsilon = tf.cast(epsilon, x.dtype)
    if len(epsilon.shape) == 1:  # one budget per example
        return tf.reshape(epsilon, [-1] + [1] * (len(x.shape) - 1))
    return epsilon


def project(x_adv, x, epsilon, norm, low, high):
    """Projects onto the epsilon ball around `x`, then clips to `[low, high]` (when given).

    Clipping towards a box that contains `x` shortens every coordinate of the perturbation,
    so the result is inside both the ball and the box.
    """
    epsilon = _reshape_eps(epsilon, x)
    delta = x_adv - x
    if norm == "linf":
        delta = tf.clip_by_value(delta, -epsilon, epsilon)
    else:
        delta = delta * tf.minimum(1.0, epsilon / tf.maximum(_norm(delta), 1e-12))
    out = x + delta
    if low is not None:
        out = tf.clip_by_value(out, low, high)
    return out


def random_in_ball(x, epsilon, norm, seed):
    """A uniform random point of the epsilon ball around `x` (stateless in `seed`)."""
    epsilon = _reshape_eps(epsilon, x)
    if norm == "linf":
        return x + tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0) * epsilon
    seeds = tf.random.experimental.stateless_split(seed, 2)
    v = tf.random.stateless_normal(tf.shape(x), seeds[0])
    dim = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    shape = tf.concat([tf.shape(x)[:1], tf.ones([len(x.shape) - 1], tf.int32)], 0)
    radius = tf.random.stateless_uniform(shape, seeds[1]) ** (1.0 / dim)
    return x + v / tf.maximum(_norm(v), 1e-12) * radius * epsilon


def perturbation_norms(x_adv, x, norm):
    """Numpy: the perturbation's linf or l2 norm per example."""
    d = (np.asarray(x_adv, np.float64) - np.asarray(x, np.float64)).reshape(len(x), -1)
    return np.abs(d).max(axis=1) if norm == "linf" else np.sqrt((d**2).sum(axis=1))
