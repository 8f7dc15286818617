"""The per-example gradient rules: the built-in ones in an explicit order, and users' rules.

The registry has keras_safe's one shape (`keras_safe._registry`): `DEFAULT_RULES`, then
`register_rule` / `unregister_rule` / `get_rule` / `rule_names`. A rule's name is its `name`, else
its class name; a name taken is refused unless `replace=True` is given.
"""

from keras_safe._registry import Registry
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
from keras_safe.privacy.per_example.rules.base import rule_name

__all__ = [
    "DEFAULT_RULES",
    "find_rule",
    "get_rule",
    "is_builtin",
    "lookup_order",
    "register_rule",
    "rule_names",
    "unregister_rule",
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

_RULES = Registry(
    "per-example rule",
    DEFAULT_RULES,
    name_of=rule_name,
    register_call="keras_safe.privacy.register_rule",
)


def register_rule(rule, *, replace=False):
    """Registers a per-example gradient rule so DP-SGD clips a layer's gradients fast.

    Without a rule, a layer's weights get their per-example gradients from a Jacobian of the
    per-example losses (the fallback: verified, but slow and memory-hungry). A rule lets
    keras_safe take each example's gradient norm and the clipped sum from a few recorded
    tensors instead.

    **The contract.** A rule is a class (or object) with three static methods; subclassing
    `keras_safe.privacy.PerExampleRule` documents them.

    - `supports(layer) -> bool`: True for the layers the rule handles, and only those whose
      `call` it reproduces exactly. Registered rules are tried first (the latest first), then
      the built-in ones; the first rule that supports a layer handles it. A registered rule
      may take over a layer type a built-in rule handles.
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
    reference (`keras_safe.privacy.per_example.verification.verify`) and refuses to train, with a
    `PrivacyError` naming the rule, if its norms or clipped sums differ. Check a rule yourself
    with `keras_safe.testing.assert_dp_matches_reference`, which has a worked example.

    Args:
        rule: the rule (a class or an object with `supports`, `forward` and `forms`), named by
            its `name` attribute, else its class name.
        replace: replace the rule registered under the same name (a built-in one included) on
            purpose; the replacement is tried first, as the latest registered rule.

    Returns:
        `rule`, so `register_rule` works as a class decorator.

    Raises:
        ArgumentError: if `rule` lacks one of the three methods, or its name is taken (without
            `replace`).

    Example:
        >>> import keras
        >>> from keras_safe.privacy import PerExampleRule, register_rule, unregister_rule
        >>> from keras_safe.privacy.per_example import summed_form
        >>> class Scale(keras.layers.Layer):  # y = x * w, one weight per feature
        ...     def build(self, input_shape):
        ...         self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")
        ...     def call(self, x):
        ...         return x * self.w
        >>> @register_rule
        ... class ScaleRule(PerExampleRule):
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
        >>> from keras_safe.privacy import get_rule
        >>> get_rule("ScaleRule") is ScaleRule
        True
        >>> unregister_rule("ScaleRule")
    """
    missing = [m for m in ("supports", "forward", "forms") if not callable(getattr(rule, m, None))]
    if missing:
        fail(
            "rule",
            rule,
            "a class or object with callable `supports`, `forward` and `forms`",
            f"define {', '.join(missing)} (subclass keras_safe.privacy.PerExampleRule).",
        )
    return _RULES.register(rule, replace=replace)


def unregister_rule(rule):
    """Removes a registered rule, given by name or itself (built-in rules cannot be removed).

    Raises:
        ArgumentError: if no rule was registered under that name.

    Example:
        >>> try:
        ...     unregister_rule("DenseRule")
        ... except ValueError as error:
        ...     print(type(error).__name__)
        ArgumentError
    """
    _RULES.unregister(rule)


def get_rule(name):
    """The rule registered under `name` (a registered rule, else a built-in one).

    Example:
        >>> get_rule("DenseRule").__name__
        'DenseRule'
    """
    return _RULES.get(name)


def rule_names():
    """The names of the rules: the built-in ones in order, then the registered ones.

    Example:
        >>> rule_names()[:3]
        ('DenseRule', 'EinsumDenseRule', 'ConvRule')
    """
    return _RULES.names()


def lookup_order():
    """Every rule in the order they are tried: registered rules (the latest first), then the
    built-in ones (those a registered rule replaced by name left out).

    Example:
        >>> lookup_order() == DEFAULT_RULES
        True
    """
    return _RULES.lookup_order()


def is_builtin(rule):
    """True for keras_safe's own rules (verified by its tests), False for registered ones."""
    return _RULES.is_default(rule)


def find_rule(layer):
    """The first rule that supports `layer`, or None."""
    for rule in lookup_order():
        if rule.supports(layer):
            return rule
    return None
