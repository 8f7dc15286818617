"""Per-example features of a model's predictions, used by membership inference attacks.

The loss of an example is computed, in this order of preference, with:

1. the `loss_fn` argument when one is given (a Keras loss object, a loss name or a function
   `loss_fn(y_true, y_pred)` returning one value per example);
2. the model's compiled loss (`model.compile(loss=...)`), evaluated per example;
3. sparse categorical crossentropy of the predicted class probabilities (categorical
   crossentropy when the labels are one-hot), for classifiers that were never compiled.

Class probabilities come from the model output: a softmax (several units) or a sigmoid (one unit)
is applied when the output is logits. Whether the output is logits is read from the compiled
loss's `from_logits` when it has one, else guessed from the values (probabilities lie in [0, 1]
and, for several units, sum to 1 per row); pass `from_logits` to decide it yourself.
"""

from __future__ import annotations

import keras
import numpy as np

_TINY = 1e-30


def num_examples(x):
    """Number of examples in `x` (an array, or a list / dict of arrays for multi-input models)."""
    leaves = keras.tree.flatten(x)
    if not leaves:
        raise ValueError("The inputs hold no array. Fix: pass a numpy array of examples.")
    return int(np.shape(leaves[0])[0])


def take(x, index):
    """Rows `index` of `x` (an array or a nested structure of arrays)."""
    return keras.tree.map_structure(lambda a: np.asarray(a)[index], x)


def concatenate(parts):
    """Concatenates a list of arrays (or of equally nested structures of arrays) along axis 0."""
    return keras.tree.map_structure(lambda *a: np.concatenate(a, axis=0), *parts)


def check_pair(name, pair):
    """Validates a `(x, y)` pair and returns it as `(x, y)` with `y` a numpy array."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(
            f"`{name}` must be a pair (x, y) of inputs and labels, got {type(pair).__name__}. "
            f"Fix: pass {name}=(x_{name}, y_{name})."
        )
    x, y = pair
    if y is None:
        raise ValueError(f"`{name}` has no labels. Fix: pass {name}=(x, y) with labels y.")
    y = np.asarray(y)
    n = num_examples(x)
    if n != len(y):
        raise ValueError(
            f"`{name}` holds {n} inputs but {len(y)} labels. Fix: pass as many labels as inputs."
        )
    if n == 0:
        raise ValueError(f"`{name}` is empty. Fix: pass at least one example.")
    return x, y


def predict(model, x, batch_size=256):
    """Model outputs on `x` (inference mode, in batches) as a float64 numpy array.

    Only models with one output are supported.
    """
    batch_size = max(int(batch_size), 1)
    n = num_examples(x)
    parts = []
    for start in range(0, n, batch_size):
        out = model(take(x, slice(start, start + batch_size)), training=False)
        if isinstance(out, (list, tuple, dict)):
            raise ValueError(
                "The model has several outputs; membership inference needs a model with one "
                "output. Fix: audit keras.Model(inputs, the_output_to_audit) built on the same "
                "layers."
            )
        parts.append(np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64))
    return np.concatenate(parts, axis=0)


def _loss_object(model, loss_fn):
    """The loss to evaluate per example, or None for the built-in crossentropy."""
    if loss_fn is not None:
        return loss_fn
    compiled = getattr(model, "loss", None)
    if compiled is None:
        return None
    if isinstance(compiled, (list, tuple, dict)):
        if isinstance(compiled, dict) and len(compiled) == 1:
            return next(iter(compiled.values()))
        if isinstance(compiled, (list, tuple)) and len(compiled) == 1:
            return compiled[0]
        raise ValueError(
            "The model was compiled with several losses. Fix: pass `loss_fn` giving one loss "
            "per example for the audited output."
        )
    return compiled


def loss_from_logits(model, loss_fn=None):
    """`from_logits` of the loss that would be used, or None when the loss does not say."""
    loss = _loss_object(model, loss_fn)
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        if "from_logits" in config:
            return bool(config["from_logits"])
    return None


def per_example_loss(model, y, outputs, loss_fn=None, from_logits=None):
    """Loss of every example (see the module docstring for which loss is used).

    Args:
        model: the Keras model (its compiled loss is used when `loss_fn` is None).
        y: labels, one row per example.
        outputs: the model outputs on the examples (numpy array).
        loss_fn: optional loss overriding the compiled one.
        from_logits: whether `outputs` are logits; used only by the built-in crossentropy.

    Returns:
        A float64 array of shape `(num_examples,)`.

    Raises:
        ValueError: if the loss does not give one value per example.
    """
    loss = _loss_object(model, loss_fn)
    if loss is None:
        probs = class_probabilities(outputs, from_logits)
        labels = class_labels(y, probs.shape[1])
        p_true = probs[np.arange(len(labels)), labels]
        return -np.log(np.maximum(p_true, _TINY))
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise ValueError(
            f"Cannot evaluate the loss {loss!r}. Fix: pass `loss_fn`, a callable "
            "loss_fn(y_true, y_pred) returning one loss per example."
        )
    y = np.asarray(y)
    if outputs.ndim == y.ndim + 1 and outputs.shape[-1] == 1:
        y = y[..., None]  # labels (n,) for a one-unit output (n, 1), as Keras's compile does
    elif y.ndim == outputs.ndim + 1 and y.shape[-1] == 1:
        y = y[..., 0]
    # The unreduced losses (`Loss.call`), in float64 when the loss supports it so that tiny
    # losses of memorised examples stay distinct; float32 otherwise.
    evaluate = loss.call if isinstance(loss, keras.losses.Loss) else loss

    def run(dtype):
        return evaluate(
            keras.ops.convert_to_tensor(y, dtype=dtype),
            keras.ops.convert_to_tensor(outputs, dtype=dtype),
        )

    try:
        values = run("float64")
    except Exception:  # a loss that only supports float32
        try:
            values = run("float32")
        except Exception as error:
            raise ValueError(
                f"The loss {loss!r} failed on the model outputs ({error}). Fix: pass "
                "`loss_fn(y_true, y_pred)` returning one loss per example."
            ) from error
    values = np.asarray(keras.ops.convert_to_numpy(values), dtype=np.float64)
    n = len(outputs)
    if values.ndim == 0 or values.shape[0] != n:
        raise ValueError(
            f"The loss returned shape {values.shape} for {n} examples; membership inference "
            "needs one loss per example. Fix: pass `loss_fn` without reduction, e.g. "
            "keras.losses.SparseCategoricalCrossentropy(reduction=None)."
        )
    return values.reshape(n, -1).mean(axis=1)


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
        raise ValueError(
            f"Expected class scores of shape (num_examples, num_classes), got {outputs.shape}. "
            "Fix: confidence-based attacks need a classifier; use attacks=('loss',) otherwise."
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
        raise ValueError(
            f"Labels must be class indices in [0, {num_classes}) for a model with "
            f"{num_classes} classes, got values in [{labels.min()}, {labels.max()}]."
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


def compute_features(model, x, y, loss_fn=None, from_logits=None, batch_size=256):
    """Per-example features of `model` on `(x, y)`.

    Args:
        model: a Keras model with one output.
        x: inputs.
        y: labels (class indices or one-hot for classifiers).
        loss_fn: optional per-example loss overriding the compiled loss.
        from_logits: whether the output is logits (None: read from the loss or guess).
        batch_size: prediction batch size.

    Returns:
        A dict of float64 arrays of shape `(n,)`: `loss`, and for classifiers also
        `confidence` (probability of the true class), `entropy` (Shannon entropy of the
        prediction), `modified_entropy` (Song & Mittal 2021), `logit_confidence`,
        `max_probability`, `correct` (0/1), `label` and `predicted` (class indices).
        Keys that need class probabilities are absent for models that are not classifiers.
    """
    outputs = predict(model, x, batch_size=batch_size)
    if from_logits is None:
        from_logits = loss_from_logits(model, loss_fn)
    features = {"loss": per_example_loss(model, y, outputs, loss_fn, from_logits)}
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
