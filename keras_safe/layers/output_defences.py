"""Output defences: serving layers that reveal less of the model through its predictions.

Put one after the model's softmax when serving it (`keras.Sequential([model, TopKOnly(1)])`);
train the model without it. Each layer keeps the model's predicted class: the arg-max of its
output is the arg-max of its input (`LabelOnly` returns that class itself), so accuracy is
unchanged. They take rows of class probabilities, shape `(batch, classes)` with two or more
classes.

What they do not do: none of them makes a model robust to adversarial examples, and none
gives a formal guarantee. Because they flatten or cut the gradient of the output, they make
gradient attacks look weaker than they are (gradient masking): evaluate robustness on the
model without them, or with `keras_safe.security.evaluate_robustness`'s gradient-free check.
"""

import keras
from keras import ops

from keras_safe._validation import check_number, fail

__all__ = ["LabelOnly", "PredictionRounding", "ReverseSigmoid", "TopKOnly"]


def _check_classes(layer, input_shape, low=2):
    classes = input_shape[-1]
    if len(input_shape) != 2 or classes is None or classes < low:
        fail(
            "inputs",
            tuple(input_shape),
            f"class probabilities of shape (batch, classes) with classes >= {low} for "
            f"{type(layer).__name__}",
            "put the layer after the model's softmax output; for a one-unit sigmoid output "
            "serve the two probabilities (1 - p, p).",
        )
    return classes


def _top_mask(inputs):
    """One-hot rows (in the input's dtype) of each row's arg-max."""
    return ops.one_hot(ops.argmax(inputs, axis=-1), ops.shape(inputs)[-1], dtype=inputs.dtype)


class _OutputDefence(keras.layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = False

    def build(self, input_shape):
        _check_classes(self, input_shape)
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="keras_safe")
class PredictionRounding(_OutputDefence):
    """Rounds each probability to `decimals` decimal places, keeping the predicted class.

    The predicted class keeps its rounded value (at least one unit of the last decimal);
    every other class is rounded and then capped one unit below it, so rounding never creates
    a tie that would change the arg-max.

    Protects against: attacks that need precise confidences. Model extraction by solving
    equations from the returned probabilities (Tramer et al. 2016, who propose rounding as a
    countermeasure) needs more queries or fails; score-based membership inference and model
    inversion get coarser signals.

    Does not protect against: attacks that use the predicted label only (label-only
    extraction and membership inference, decision-based evasion attacks); extraction by
    distillation still learns from the rounded scores. No formal guarantee.

    Args:
        decimals: decimal places kept (0 to 6).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Example:
        >>> import numpy as np
        >>> from keras_safe.layers import PredictionRounding
        >>> p = np.array([[0.344, 0.341, 0.315]], "float32")
        >>> np.asarray(PredictionRounding(decimals=2)(p)).astype("float64").round(2).tolist()
        [[0.34, 0.33, 0.32]]
    """

    def __init__(self, decimals=2, **kwargs):
        super().__init__(**kwargs)
        self.decimals = check_number("decimals", decimals, low=0, high=6, integer=True)

    def call(self, inputs):
        unit = 10.0 ** (-self.decimals)
        top = _top_mask(inputs)
        rounded = ops.round(inputs / unit) * unit
        top_value = ops.maximum(ops.sum(rounded * top, axis=-1, keepdims=True), unit)
        others = ops.minimum(rounded, top_value - unit)
        return top * top_value + (1.0 - top) * others

    def get_config(self):
        config = super().get_config()
        config["decimals"] = self.decimals
        return config


@keras.saving.register_keras_serializable(package="keras_safe")
class TopKOnly(_OutputDefence):
    """Returns the `k` largest probabilities and zeros for every other class.

    Protects against: attacks that learn from the whole probability vector. Extraction by
    distillation and score-based membership inference lose the scores of the other classes;
    with `k=1` only the predicted class and its confidence are revealed.

    Does not protect against: attacks on the label and the top scores (label-only
    extraction and membership inference, decision-based or top-k score-based evasion).
    No formal guarantee.

    Args:
        k: number of classes kept (>= 1).
        renormalize: rescale the kept probabilities to sum to 1 (hides how much probability
            the dropped classes had).
        **kwargs: base layer arguments.

    Example:
        >>> import numpy as np
        >>> from keras_safe.layers import TopKOnly
        >>> p = np.array([[0.125, 0.625, 0.25]], "float32")
        >>> np.asarray(TopKOnly(k=2)(p)).tolist()
        [[0.0, 0.625, 0.25]]
    """

    def __init__(self, k=1, renormalize=False, **kwargs):
        super().__init__(**kwargs)
        self.k = check_number("k", k, low=1, integer=True)
        self.renormalize = bool(renormalize)

    def build(self, input_shape):
        classes = _check_classes(self, input_shape)
        if self.k > classes:
            fail("k", self.k, f"at most the number of classes ({classes})", "lower k.")
        super().build(input_shape)

    def call(self, inputs):
        _, indices = ops.top_k(inputs, self.k)
        keep = ops.sum(ops.one_hot(indices, ops.shape(inputs)[-1], dtype=inputs.dtype), axis=1)
        kept = inputs * keep
        if self.renormalize:
            kept = kept / ops.maximum(ops.sum(kept, axis=-1, keepdims=True), 1e-12)
        return kept

    def get_config(self):
        config = super().get_config()
        config.update(k=self.k, renormalize=self.renormalize)
        return config


@keras.saving.register_keras_serializable(package="keras_safe")
class LabelOnly(_OutputDefence):
    """Returns the predicted class only: an integer per row, or its one-hot row.

    Protects against: every attack that needs scores. Score-based membership inference,
    extraction by distillation on probabilities, model inversion from confidences and
    score-based evasion attacks (such as Square) all lose their signal.

    Does not protect against: label-only attacks, which need more queries but work:
    extraction from labels (Papernot et al. 2017; Tramer et al. 2016), label-only membership
    inference (Choquette-Choo et al. 2021), decision-based evasion (Brendel et al. 2018) and
    transfer attacks from a surrogate. No formal guarantee.

    Args:
        one_hot: return one-hot rows (float) instead of class indices (int32).
        **kwargs: base layer arguments.

    Example:
        >>> import numpy as np
        >>> from keras_safe.layers import LabelOnly
        >>> p = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], "float32")
        >>> np.asarray(LabelOnly()(p)).tolist()
        [1, 0]
    """

    def __init__(self, one_hot=False, **kwargs):
        super().__init__(**kwargs)
        self.one_hot = bool(one_hot)

    def call(self, inputs):
        if self.one_hot:
            return _top_mask(inputs)
        return ops.cast(ops.argmax(inputs, axis=-1), "int32")

    def compute_output_shape(self, input_shape):
        return input_shape if self.one_hot else input_shape[:-1]

    def compute_output_spec(self, inputs):
        if self.one_hot:
            return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)
        return keras.KerasTensor(inputs.shape[:-1], dtype="int32")

    def get_config(self):
        config = super().get_config()
        config["one_hot"] = self.one_hot
        return config


@keras.saving.register_keras_serializable(package="keras_safe")
class ReverseSigmoid(_OutputDefence):
    """Reverse-sigmoid perturbation of the probabilities (Lee et al. 2019).

    Each probability `y` becomes `y - beta * (sigmoid(gamma * logit(y)) - 1/2)`, clipped at 0,
    and the row is renormalised to sum to 1 (Lee, Edraki and Qi, "Defending against NN model
    stealing attacks using deceptive perturbations", IEEE S&P Workshops 2019). The
    perturbation is built so that a surrogate trained on the returned scores with
    cross-entropy is pushed away from the model. Where the perturbation would change the
    predicted class, the values of the model's class and the new top class are exchanged, so
    the arg-max is always the model's.

    Protects against: model stealing that trains a surrogate on the returned probabilities
    (distillation, Knockoff Nets); it also perturbs the confidences that score-based
    membership inference reads.

    Does not protect against: attacks that use the predicted label only, which it keeps by
    design (label-only extraction, label-only membership inference, decision-based evasion).
    The perturbation is deterministic: an attacker who knows or fits `beta` and `gamma` can
    partly invert it. No formal guarantee.

    Args:
        beta: size of the perturbation (> 0).
        gamma: slope applied to the logit of each probability (> 0).
        **kwargs: base layer arguments.

    Example:
        >>> import numpy as np
        >>> from keras_safe.layers import ReverseSigmoid
        >>> p = np.array([[0.7, 0.2, 0.1]], "float32")
        >>> out = np.asarray(ReverseSigmoid(beta=1.0, gamma=0.1)(p))
        >>> int(out.argmax()), round(float(out.sum()), 5)
        (0, 1.0)
    """

    def __init__(self, beta=1.0, gamma=0.1, **kwargs):
        super().__init__(**kwargs)
        self.beta = check_number("beta", beta, low=0.0, low_inclusive=False)
        self.gamma = check_number("gamma", gamma, low=0.0, low_inclusive=False)

    def call(self, inputs):
        p = ops.clip(inputs, 1e-6, 1.0 - 1e-6)
        logit = ops.log(p) - ops.log(1.0 - p)
        perturbed = ops.maximum(inputs - self.beta * (ops.sigmoid(self.gamma * logit) - 0.5), 0.0)
        out = perturbed / ops.maximum(ops.sum(perturbed, axis=-1, keepdims=True), 1e-12)
        top = _top_mask(inputs)
        best = _top_mask(out)
        top_value = ops.sum(out * top, axis=-1, keepdims=True)
        best_value = ops.sum(out * best, axis=-1, keepdims=True)
        out = out + top * (best_value - top_value) + best * (top_value - best_value)
        # An exact tie with another class would let the arg-max pick the lower index.
        tied = ops.logical_and(out >= best_value, top < 0.5)
        return ops.where(tied, out * (1.0 - 1e-6), out)

    def get_config(self):
        config = super().get_config()
        config.update(beta=self.beta, gamma=self.gamma)
        return config
