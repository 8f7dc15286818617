"""Per-example features of a model's predictions, used by membership inference attacks.

The loss of an example is the one training uses, `keras_safe.privacy.losses.PerExampleLoss`:
the loss Keras would report for a batch holding that example alone, with its sample weight, the
output's mask and the compiled `loss_weights`. So a weighted or masked model is audited on the
loss it was trained on. The loss function is, in this order of preference:

1. the `loss_fn` argument when one is given (a Keras loss object, a loss name or a function
   `loss_fn(y_true, y_pred)` without reduction over the batch), in place of the compiled one;
2. the model's compiled loss (`model.compile(loss=...)`);
3. for a classifier that was never compiled, the crossentropy of its outputs: sparse
   categorical (categorical for one-hot labels, binary for one output unit).

It is evaluated in float64 when the loss supports it, so that the tiny losses of memorised
examples stay distinct (float32 rounds a crossentropy below about 6e-8 to 0).

Class probabilities come from the model output: a softmax (several units) or a sigmoid (one unit)
is applied when the output is logits. Whether the output is logits is read from the loss's
`from_logits` when it has one, else guessed from the values (probabilities lie in [0, 1] and, for
several units, sum to 1 per row); pass `from_logits` to decide it yourself.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_safe._data import Description, num_examples, take_inputs
from keras_safe._validation import check_number, fail
from keras_safe.privacy.losses import PerExampleLoss

__all__ = [
    "class_labels",
    "class_probabilities",
    "compute_features",
    "example_losses",
    "logit_confidence",
    "loss_from_logits",
    "predict",
]

_TINY = 1e-30


class _LossView:
    """The audited model seen with another loss: what `PerExampleLoss` reads of a model.

    Every attribute but the loss comes from the model; `compiled` is False so that the compiled
    `loss_weights`, which belong to the compiled loss, do not scale a loss given here.
    """

    compiled = False

    def __init__(self, model, loss):
        self._model = model
        self.loss = loss

    def __getattr__(self, name):
        if name == "_model":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self._model, name)


def _forward(model, x, batch_size):
    """The model's outputs on `x` in inference mode: a list of `(rows, output tensor)`."""
    batch_size = check_number("batch_size", batch_size, low=1, integer=True)
    n = num_examples(x)
    parts = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        out = model(take_inputs(x, rows), training=False)
        if isinstance(out, (list, tuple, dict)):
            fail(
                "model",
                Description(f"a model with {len(out)} outputs"),
                "a model with one output",
                "audit keras.Model(inputs, the_output_to_audit) built on the same layers.",
            )
        parts.append((rows, out))
    return parts


def _as_numpy(parts):
    return np.concatenate(
        [np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64) for _, out in parts], axis=0
    )


def predict(model, x, batch_size=256):
    """Model outputs on `x` (inference mode, in batches) as a float64 numpy array.

    Only models with one output are supported.

    Raises:
        ArgumentError: for a model with several outputs or a `batch_size` below 1.
    """
    return _as_numpy(_forward(model, x, batch_size))


def _given_loss(model, loss_fn):
    """The loss named by `loss_fn` or compiled into the model, or None."""
    if loss_fn is not None:
        return loss_fn
    compiled = getattr(model, "loss", None)
    if isinstance(compiled, (list, tuple, dict)) and len(compiled) == 1:
        return next(iter(compiled.values())) if isinstance(compiled, dict) else compiled[0]
    return compiled


def loss_from_logits(model, loss_fn=None):
    """`from_logits` of the loss that would be used, or None when the loss does not say."""
    loss = _given_loss(model, loss_fn)
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        if "from_logits" in config:
            return bool(config["from_logits"])
    return None


def _crossentropy(outputs, y, from_logits):
    """The loss of a classifier that was never compiled (see the module docstring)."""
    if outputs.ndim not in (1, 2):
        fail(
            "loss_fn",
            None,
            "a per-example loss for a model that is neither compiled with a loss nor a "
            f"classifier (its outputs have shape {outputs.shape})",
            "compile the model with its training loss, or pass loss_fn(y_true, y_pred).",
        )
    outputs = _as_2d(outputs)
    logits = not _looks_like_probabilities(outputs) if from_logits is None else bool(from_logits)
    class_labels(y, max(outputs.shape[1], 2))  # checks the labels
    if outputs.shape[1] == 1:
        return keras.losses.BinaryCrossentropy(from_logits=logits)
    if np.ndim(y) == 2 and np.shape(y)[1] == outputs.shape[1]:
        return keras.losses.CategoricalCrossentropy(from_logits=logits)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=logits)


def _per_example_loss(model, loss_fn, outputs, y, from_logits):
    """The training path's per-example loss of `model` (with `loss_fn` in place of its own)."""
    if loss_fn is None and getattr(model, "loss", None) is not None:
        return PerExampleLoss(model)
    loss = loss_fn if loss_fn is not None else _crossentropy(outputs, y, from_logits)
    return PerExampleLoss(_LossView(model, loss))


def _float64(y_pred):
    """`y_pred` in float64 with its Keras mask (which `PerExampleLoss` reads) kept."""
    mask = getattr(y_pred, "_keras_mask", None)  # keras-internal: keras-mask
    cast = tf.cast(y_pred, tf.float64)
    if mask is not None:
        cast._keras_mask = mask  # keras-internal: keras-mask
    return cast


def _batch_losses(loss, y, y_pred, sample_weight):
    y = np.asarray(y)
    rank = len(y_pred.shape)
    if rank == y.ndim + 1 and y_pred.shape[-1] == 1:
        y = y[..., None]  # labels (n,) for a one-unit output (n, 1), as Keras's compile does
    elif y.ndim == rank + 1 and y.shape[-1] == 1:
        y = y[..., 0]
    try:
        values = loss(tf.constant(y, tf.float64), _float64(y_pred), sample_weight)
    except Exception:  # a loss that only supports the model's own dtype
        values = loss(y, y_pred, sample_weight)
    return np.asarray(keras.ops.convert_to_numpy(values), dtype=np.float64).reshape(-1)


def _losses(model, parts, outputs, y, sample_weight, loss_fn, from_logits):
    loss = _per_example_loss(model, loss_fn, outputs, y, from_logits)
    values = np.concatenate(
        [
            _batch_losses(
                loss, y[rows], out, None if sample_weight is None else sample_weight[rows]
            )
            for rows, out in parts
        ]
    )
    if values.shape[0] != len(outputs):
        fail(
            "loss_fn",
            Description(f"a loss giving {values.shape[0]} values for {len(outputs)} examples"),
            "a loss with one value per example",
            "pass a loss without reduction over the batch, e.g. "
            "keras.losses.SparseCategoricalCrossentropy(reduction=None).",
        )
    return values


def example_losses(
    model, x, y, sample_weight=None, *, loss_fn=None, from_logits=None, batch_size=256
):
    """The per-example loss of `model` on `(x, y)`, as training computes it.

    Args:
        model: a Keras model with one output.
        x: inputs.
        y: labels or targets.
        sample_weight: optional weight of every example, applied as in training.
        loss_fn: optional loss in place of the compiled one (see the module docstring).
        from_logits: whether the output is logits, for the loss of an uncompiled classifier.
        batch_size: prediction batch size.

    Returns:
        A float64 array of shape `(num_examples,)`.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> model.compile(loss="mse")
        >>> y_pred = model.predict(np.ones((3, 2)), verbose=0)[:, 0]
        >>> losses = example_losses(model, np.ones((3, 2)), [0.0, 1.0, 2.0], [1.0, 1.0, 0.0])
        >>> np.allclose(losses, [y_pred[0] ** 2, (y_pred[1] - 1) ** 2, 0.0], rtol=1e-5)
        True
    """
    y = np.asarray(y)
    parts = _forward(model, x, batch_size)
    outputs = _as_numpy(parts)
    if from_logits is None:
        from_logits = loss_from_logits(model, loss_fn)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return _losses(model, parts, outputs, y, weights, loss_fn, from_logits)


def _looks_like_probabilities(outputs):
    if outputs.size == 0 or np.min(outputs) < 0.0 or np.max(outputs) > 1.0:
        return False
    if outputs.shape[1] == 1:
        return True
    return bool(np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))


def _as_2d(outputs):
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if outputs.ndim != 2:
        fail(
            "outputs",
            Description(f"outputs of shape {outputs.shape}"),
            "class scores of shape (num_examples, num_classes), as a classifier gives",
            "confidence-based attacks need a classifier; use attacks=('loss',) otherwise.",
        )
    return outputs


def class_probabilities(outputs, from_logits=None):
    """Class probabilities `(num_examples, num_classes)` from model outputs.

    A one-unit output is read as the probability (or logit) of class 1 of a binary classifier.

    Args:
        outputs: numpy array of model outputs, shape `(n,)`, `(n, 1)` or `(n, num_classes)`.
        from_logits: True if `outputs` are logits, False if probabilities, None to guess.

    Returns:
        A float64 array of probabilities, at least two columns.
    """
    outputs = _as_2d(outputs)
    if from_logits is None:
        from_logits = not _looks_like_probabilities(outputs)
    if outputs.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-outputs[:, 0])) if from_logits else outputs[:, 0]
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)
    if from_logits:
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)
    return np.clip(outputs, 0.0, 1.0)


def class_labels(y, num_classes):
    """Integer class labels from integer, float or one-hot labels."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        return np.argmax(y, axis=1).astype(np.int64)
    labels = np.rint(y.reshape(len(y), -1)[:, 0]).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        fail(
            "y",
            Description(f"labels in [{labels.min()}, {labels.max()}]"),
            f"class indices in [0, {num_classes}) for a model with {num_classes} classes",
            "pass the class index (or a one-hot row) of every example.",
        )
    return labels


def logit_confidence(outputs, labels, from_logits=None):
    """Logit-scaled confidence log(p_y / (1 - p_y)) of the true class (Carlini et al. 2022).

    Computed from logits as `z_y - logsumexp(z_j, j != y)` when available, else from the
    probabilities with the wrong-class mass summed (not `1 - p_y`) to keep precision near 1.
    """
    outputs = _as_2d(outputs)
    if from_logits is None:
        from_logits = not _looks_like_probabilities(outputs)
    rows = np.arange(len(labels))
    if outputs.shape[1] == 1:
        if from_logits:
            z = outputs[:, 0]
            return np.where(labels == 1, z, -z)
        p1 = np.clip(outputs[:, 0], _TINY, 1.0 - 1e-16)
        p_true = np.where(labels == 1, p1, 1.0 - p1)
        return np.log(np.maximum(p_true, _TINY)) - np.log(np.maximum(1.0 - p_true, _TINY))
    if from_logits:
        z_true = outputs[rows, labels]
        others = outputs.copy()
        others[rows, labels] = -np.inf
        peak = others.max(axis=1)
        lse = peak + np.log(np.exp(others - peak[:, None]).sum(axis=1))
        return z_true - lse
    probs = np.clip(outputs, 0.0, 1.0)
    p_true = probs[rows, labels]
    wrong = probs.sum(axis=1) - p_true
    return np.log(np.maximum(p_true, _TINY)) - np.log(np.maximum(wrong, _TINY))


def compute_features(
    model, x, y, loss_fn=None, from_logits=None, batch_size=256, sample_weight=None
):
    """Per-example features of `model` on `(x, y)`.

    Args:
        model: a Keras model with one output.
        x: inputs.
        y: labels (class indices or one-hot for classifiers).
        loss_fn: optional per-example loss overriding the compiled loss.
        from_logits: whether the output is logits (None: read from the loss or guess).
        batch_size: prediction batch size.
        sample_weight: optional weight of every example; it scales the loss as in training
            (the other features do not depend on it).

    Returns:
        A dict of float64 arrays of shape `(n,)`: `loss`, and for classifiers also
        `confidence` (probability of the true class), `entropy` (Shannon entropy of the
        prediction), `modified_entropy` (Song & Mittal 2021), `logit_confidence`,
        `max_probability`, `correct` (0/1), `label` and `predicted` (class indices).
        Keys that need class probabilities are absent for models that are not classifiers.
    """
    y = np.asarray(y)
    parts = _forward(model, x, batch_size)
    outputs = _as_numpy(parts)
    if from_logits is None:
        from_logits = loss_from_logits(model, loss_fn)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    features = {"loss": _losses(model, parts, outputs, y, weights, loss_fn, from_logits)}
    try:
        probs = class_probabilities(outputs, from_logits)
        labels = class_labels(y, probs.shape[1])
    except ValueError:
        if getattr(model, "loss", None) is None and loss_fn is None:
            raise
        return features  # a regression model: only the loss is meaningful
    rows = np.arange(len(labels))
    p_true = probs[rows, labels]
    logp = np.log(np.maximum(probs, _TINY))
    log1mp = np.log(np.maximum(1.0 - probs, _TINY))
    entropy = -np.sum(probs * logp, axis=1)
    # Song & Mittal 2021: -(1 - p_y) log p_y - sum_{j != y} p_j log(1 - p_j).
    wrong = probs * log1mp
    modified = -(1.0 - p_true) * logp[rows, labels] - (wrong.sum(axis=1) - wrong[rows, labels])
    predicted = np.argmax(probs, axis=1)
    features.update(
        confidence=p_true,
        entropy=entropy,
        modified_entropy=modified,
        logit_confidence=logit_confidence(outputs, labels, from_logits),
        max_probability=probs.max(axis=1),
        correct=(predicted == labels).astype(np.float64),
        label=labels.astype(np.float64),
        predicted=predicted.astype(np.float64),
    )
    return features
