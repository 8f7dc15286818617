"""The per-example gradient rules: the built-in ones in an explicit order, and users' rules."""

from keras_safe._validation import fail
from keras_safe.privacy.per_example.rules import (
    ConvRule,
    ConvTransposeRule,
    DenseRule,
    DepthwiseConvRule,
    EinsumDenseRule,
    EmbeddingRule,
    GroupNormRule,
    GRUCellRule,
    LayerNormRule,
    LoRADenseRule,
    LoRAEinsumDenseRule,
    LoRAEmbeddingRule,
    LSTMCellRule,
    PReLURule,
    SeparableConvRule,
    SimpleRNNCellRule,
)

__all__ = [
    "DEFAULT_RULES",
    "find_rule",
    "is_builtin",
    "register_tap",
    "registered_rules",
    "unregister_tap",
]

DEFAULT_RULES = (
    DenseRule,
    EinsumDenseRule,
    ConvRule,
    DepthwiseConvRule,
    SeparableConvRule,
    ConvTransposeRule,
    EmbeddingRule,
    LoRADenseRule,
    LoRAEinsumDenseRule,
    LoRAEmbeddingRule,
    LayerNormRule,
    GroupNormRule,
    PReLURule,
    SimpleRNNCellRule,
    LSTMCellRule,
    GRUCellRule,
)
"""The built-in rules, in the order they are tried (after any registered rule)."""

_user_rules = []


def register_tap(rule):
    """Registers a per-example gradient rule ("tap") so DP-SGD clips a layer's gradients fast.

    Without a rule, a layer's weights get their per-example gradients from a Jacobian of the
    per-example losses (the fallback: verified, but slow and memory-hungry). A rule lets
    keras_safe take each example's gradient norm and the clipped sum from a few recorded
    tensors instead.

    **The contract.** A rule is a class (or object) with three static methods; subclassing
    `keras_safe.privacy.per_example.TapRule` documents them.

    - `supports(layer) -> bool`: True for the layers the rule handles, and only those whose
      `call` it reproduces exactly. Registered rules are tried first (the latest first), then
      the built-in ones; the first rule that supports a layer handles it.
    - `forward(layer, record, *args, **kwargs)`: runs in place of `layer.call` during the DP
      forward pass, with `call`'s arguments (`training` removed). It returns what `call` would
      return, and calls `record(saved, *zs)` once per call, where

      - `zs` are the tensors the layer's trainable weights act through (typically the
        pre-activations): the output depends on the weights only through `zs`, and every read
        of a weight lies on the path to some `z`;
      - `saved` is whatever `forms` needs (a tensor or a nested structure); its first tensor,
        like every `z`, has the example axis first, one row per example.
    - `forms(layer, saved, *dzs) -> list`: called after one backward pass with the recorded
      `saved` and, for each `z`, the gradient `dz` of the summed per-example losses (row i
      belongs to example i). It returns gradient forms (`OuterProductGrad`,
      `MaterialisedGrad`, `EmbeddingGrad` from `keras_safe.privacy.per_example`, or a
      subclass of `GradientForm`), each for one trainable weight of the layer. A weight's
      per-example gradient is the sum of its forms over the layer's calls; a weight without
      a form goes to the Jacobian fallback.

    **What the forms guarantee.** Row i of a form is example i's exact gradient of that weight
    (up to float rounding); `norm_bounds()` never underestimates a norm (the built-in forms
    return rigorous upper bounds, rounding included); `clipped_sum(factors)` is
    `sum_i factors[i] * gradient_i` and drops an example whose factor is 0 whole.

    **Verification.** keras_safe does not trust a registered rule: at the start of every
    `fit`, the train step checks it on a few real examples against the one-example-at-a-time
    reference (`keras_safe.privacy.per_example.verify`) and refuses to train, with a
    `PrivacyError` naming the rule, if its norms or clipped sums differ. Check a rule yourself
    with `keras_safe.testing.assert_dp_matches_reference`, which has a worked example.

    Args:
        rule: the rule (a class or an object with `supports`, `forward` and `forms`).

    Returns:
        `rule`, so `register_tap` works as a class decorator.

    Raises:
        ArgumentError: if `rule` lacks one of the three methods.

    Example:
        >>> import keras
        >>> from keras_safe.privacy.per_example import (
        ...     TapRule, register_tap, summed_form, unregister_tap)
        >>> class Scale(keras.layers.Layer):  # y = x * w, one weight per feature
        ...     def build(self, input_shape):
        ...         self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")
        ...     def call(self, x):
        ...         return x * self.w
        >>> @register_tap
        ... class ScaleRule(TapRule):
        ...     @staticmethod
        ...     def supports(layer):
        ...         return type(layer) is Scale
        ...     @staticmethod
        ...     def forward(layer, record, x):
        ...         z = x * layer.w
        ...         record(x, z)
        ...         return z
        ...     @staticmethod
        ...     def forms(layer, x, dz):
        ...         # dL/dw = sum over every axis but the example and feature axes of x * dz.
        ...         return [summed_form(layer.w, x * dz, list(range(1, len(x.shape) - 1)))]
        >>> from keras_safe.privacy.per_example import find_rule
        >>> find_rule(Scale()) is ScaleRule
        True
        >>> unregister_tap(ScaleRule)
    """
    missing = [m for m in ("supports", "forward", "forms") if not callable(getattr(rule, m, None))]
    if missing:
        fail(
            "rule",
            rule,
            "a class or object with callable `supports`, `forward` and `forms`",
            f"define {', '.join(missing)} (subclass keras_safe.privacy.per_example.TapRule).",
        )
    if rule in _user_rules:
        _user_rules.remove(rule)
    _user_rules.insert(0, rule)
    return rule


def unregister_tap(rule):
    """Removes a rule added by `register_tap` (built-in rules cannot be removed).

    Example:
        >>> from keras_safe.privacy.per_example import DenseRule
        >>> try:
        ...     unregister_tap(DenseRule)
        ... except ValueError as error:
        ...     print(type(error).__name__)
        ArgumentError
    """
    if rule not in _user_rules:
        names = ", ".join(repr(r) for r in _user_rules) or "none"
        fail(
            "rule",
            rule,
            "a rule added by register_tap",
            f"pass a registered rule; registered: {names}.",
        )
    _user_rules.remove(rule)


def registered_rules():
    """Every rule in the order they are tried: registered rules, then `DEFAULT_RULES`.

    Example:
        >>> registered_rules()[-len(DEFAULT_RULES):] == DEFAULT_RULES
        True
    """
    return (*_user_rules, *DEFAULT_RULES)


def is_builtin(rule):
    """True for keras_safe's own rules (verified by its tests), False for registered ones."""
    return rule in DEFAULT_RULES


def find_rule(layer):
    """The first rule that supports `layer`, or None."""
    for rule in registered_rules():
        if rule.supports(layer):
            return rule
    return None
