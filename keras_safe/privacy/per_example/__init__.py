"""Per-example gradient norms and clipped gradient sums: the model side of DP-SGD.

For a batch, keras_safe computes every example's gradient norm and the sum of the per-example
gradients clipped to a bound, without materialising per-example gradients where a layer allows
it:

1. Layer rules (ghost clipping, Goodfellow 2015; Lee & Kifer 2020; Li et al. 2022).
   While the forward pass runs, each layer a rule supports (`registry.DEFAULT_RULES`: Dense,
   EinsumDense, convolutions of every kind, Embedding, LoRA-enabled Dense, EinsumDense and
   Embedding, Layer/GroupNormalization, PReLU and the SimpleRNN/LSTM/GRU cells) records what
   its per-example gradients need; one backward pass gives each example's gradient in a
   factored form (`forms`). Users add rules with `keras_safe.privacy.register_rule`.
2. Every other trainable variable gets its per-example gradients from a Jacobian of the
   per-example losses (`fallback`): vectorized with `pfor`, or a loop over examples.
3. `verify` checks on real examples, before training, that examples do not interact and that
   the fallback and registered rules agree with the one-example-at-a-time reference
   (`reference`); it picks the fallback mode that agrees, or refuses.

Norms are rigorous upper bounds (never below the exact norm beyond a relative 1e-6, float
cancellation included); see `forms` and `clipped_gradient_sum`. Microbatches (TF Privacy's
`num_microbatches`) group examples: a microbatch is one "example" whose loss is the mean of its
members' losses.

Exported here is what a new rule is written with: `PerExampleRule` (the base class and its
contract) and the gradient forms a rule returns (`OuterProductGrad`, `MaterialisedGrad`,
`EmbeddingGrad`, `GradientForm` to write another, `summed_form`). The registry is
`keras_safe.privacy.register_rule` / `unregister_rule` / `get_rule` / `rule_names`; the modules
here (`clipping`, `install`, `registry`, `verification`, `reference`, `fallback`, `numerics`,
`rules/`) are internal.
"""

from keras_safe.privacy.per_example.embedding_form import EmbeddingGrad
from keras_safe.privacy.per_example.forms import (
    GradientForm,
    MaterialisedGrad,
    OuterProductGrad,
    summed_form,
)
from keras_safe.privacy.per_example.rules.base import PerExampleRule

__all__ = [
    "EmbeddingGrad",
    "GradientForm",
    "MaterialisedGrad",
    "OuterProductGrad",
    "PerExampleRule",
    "summed_form",
]
