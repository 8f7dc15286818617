"""The built-in per-example gradient rules, one module per layer family."""

from keras_safe.privacy.per_example.rules.activation import PReLURule
from keras_safe.privacy.per_example.rules.base import PerExampleRule
from keras_safe.privacy.per_example.rules.conv import (
    ConvRule,
    ConvTransposeRule,
    DepthwiseConvRule,
    SeparableConvRule,
)
from keras_safe.privacy.per_example.rules.dense import DenseRule
from keras_safe.privacy.per_example.rules.einsum_dense import EinsumDenseRule
from keras_safe.privacy.per_example.rules.embedding import EmbeddingRule
from keras_safe.privacy.per_example.rules.lora import (
    LoRADenseRule,
    LoRAEinsumDenseRule,
    LoRAEmbeddingRule,
)
from keras_safe.privacy.per_example.rules.normalization import GroupNormRule, LayerNormRule
from keras_safe.privacy.per_example.rules.recurrent import (
    GRUCellRule,
    LSTMCellRule,
    SimpleRNNCellRule,
)

__all__ = [
    "ConvRule",
    "ConvTransposeRule",
    "DenseRule",
    "DepthwiseConvRule",
    "EinsumDenseRule",
    "EmbeddingRule",
    "GRUCellRule",
    "GroupNormRule",
    "LSTMCellRule",
    "LayerNormRule",
    "LoRADenseRule",
    "LoRAEinsumDenseRule",
    "LoRAEmbeddingRule",
    "PReLURule",
    "SeparableConvRule",
    "SimpleRNNCellRule",
    "PerExampleRule",
]
