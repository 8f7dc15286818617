"""keras-hub models under DP-SGD with LoRA adapters (the optional `hub` extra).

Tiny backbones are built from their configs with random weights (no download). One example is
one sequence: its loss is Keras's loss for a batch holding that sequence alone (for a causal
LM, the cross-entropy summed over its unmasked tokens, divided by the sequence length), so
clipping bounds what one sequence moves. Epsilon is checked against dp-accounting called
directly (`tests.dp_reference`).

keras-hub is in the `[test]` extra: without it these tests fail (they do not skip), so that a
test environment without it cannot pass unnoticed. The slowest three are marked slow; the
default suite keeps a LoRA causal LM's clipped sum, its per-sequence loss and a Poisson fit.
"""

import keras
import numpy as np
import pytest

import keras_safe
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example.install import layers_with_rules
from keras_safe.privacy.per_example.registry import find_rule
from keras_safe.privacy.per_example.rules import DenseRule, LoRAEinsumDenseRule
from tests import dp_reference

try:
    import keras_hub
except ImportError:
    pytest.fail(
        "keras-hub is not installed, so the keras-hub tests cannot run. The [test] extra "
        "installs it: pip install -e '.[test]' (or pip install keras-hub).",
        pytrace=False,
    )

VOCABULARY, LENGTH, RANK = 40, 8, 2
SIZES = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16)


def _adapters_at_random(backbone, rng):
    """LoRA on the backbone (query/value projections), with random adapters (B starts at 0)."""
    backbone.enable_lora(RANK)
    for variable in backbone.trainable_variables:
        if variable.name.startswith("lora_"):
            variable.assign(rng.normal(size=variable.shape) * 0.5)


def _classifier(rng, lora=True):
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, max_sequence_length=LENGTH, dropout=0.0, **SIZES
    )
    if lora:
        _adapters_at_random(backbone, rng)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None, dropout=0.0
    )


def _causal_lm(rng, lora=True):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY, max_sequence_length=LENGTH, dropout=0.0, **SIZES
    )
    if lora:
        _adapters_at_random(backbone, rng)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def _padding(count, rng):
    lengths = rng.integers(3, LENGTH + 1, count)
    return np.arange(LENGTH)[None, :] < lengths[:, None]


def _classifier_data(count, rng):
    mask = _padding(count, rng)
    ids = np.where(mask, rng.integers(1, VOCABULARY, (count, LENGTH)), 0).astype("int32")
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}
    return x, rng.integers(0, 3, count)


def _lm_data(count, rng):
    """Inputs, next-token labels and the padding mask as per-token sample weights."""
    mask = _padding(count, rng)
    tokens = rng.integers(1, VOCABULARY, (count, LENGTH + 1))
    ids = np.where(mask, tokens[:, :-1], 0).astype("int32")
    labels = np.where(mask, tokens[:, 1:], 0).astype("int32")
    return {"token_ids": ids, "padding_mask": mask}, labels, mask.astype("float32")


def _compile(model, noise=0.0):
    """Compiles with DP-SGD. A private fit needs `make_private` before `fit` on keras-hub
    tasks: their `fit` turns arrays into a dataset before Keras's `fit` sees them, so a
    `PrivacyBudget` alone could not read the number of examples (it refuses instead)."""
    model.compile(
        optimizer=keras_safe.optimizers.DPSGD(
            learning_rate=0.5, l2_norm_clip=0.1, noise_multiplier=noise
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return keras_safe.privacy.make_private(model)


def _values(model):
    return {v.path: np.array(v) for v in model.weights}


@pytest.mark.slow  # several seconds (BERT backbone, or the Jacobian fallback)
def test_lora_classifier_clipped_sum_matches_one_example_at_a_time():
    rng = np.random.default_rng(0)
    model = _compile(_classifier(rng))
    trained = {v.path.split("/")[-1] for v in model.trainable_variables}
    # What backbone.enable_lora leaves trainable (adapters and the projections' biases), the head.
    assert trained == {"lora_kernel_a", "lora_kernel_b", "bias", "kernel"}
    rules = {layer.name: rule for layer, rule in layers_with_rules(model).items()}
    assert rules == {
        "query": LoRAEinsumDenseRule,
        "value": LoRAEinsumDenseRule,
        "logits": DenseRule,
    }
    x, y = _classifier_data(6, rng)
    check = keras_safe.testing.assert_dp_matches_reference(model, x, y)
    assert check.max_error < 1e-4 and 0.9 < check.max_sensitivity <= 1 + 1e-5
    assert check.fallback is None


def test_lora_causal_lm_clipped_sum_matches_one_example_at_a_time():
    rng = np.random.default_rng(1)
    model = _compile(_causal_lm(rng))
    x, y, weights = _lm_data(6, rng)
    check = keras_safe.testing.assert_dp_matches_reference(model, x, y, sample_weight=weights)
    assert check.max_error < 1e-4 and 0.9 < check.max_sensitivity <= 1 + 1e-5
    assert check.fallback is None


def test_causal_lm_loss_is_one_value_per_sequence_from_its_unmasked_tokens():
    rng = np.random.default_rng(2)
    model = _causal_lm(rng)
    model.compile()  # keras-hub's own loss: token cross-entropy from logits
    x, y, weights = _lm_data(5, rng)
    per_example = PerExampleLoss(model)

    def losses(x, y):
        return np.asarray(per_example(y, model(x), weights))

    logits = np.asarray(model(x), "float64")
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    token = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    expected = (token * weights).sum(axis=1) / LENGTH
    np.testing.assert_allclose(losses(x, y), expected, rtol=1e-5)
    base = losses(x, y)
    # Another sequence's tokens move only that sequence's loss.
    changed = {k: v.copy() for k, v in x.items()}
    changed["token_ids"][0] = (changed["token_ids"][0] + 1) % VOCABULARY
    moved = losses(changed, y)
    assert moved[0] != base[0]
    np.testing.assert_array_equal(moved[1:], base[1:])
    # Tokens and labels behind the padding move nothing.
    padded = ~x["padding_mask"]
    assert padded.any()
    hidden = {k: v.copy() for k, v in x.items()}
    hidden["token_ids"] = np.where(padded, 7, x["token_ids"]).astype("int32")
    np.testing.assert_allclose(losses(hidden, np.where(padded, 5, y)), base, rtol=1e-6)


@pytest.mark.slow  # several seconds (BERT backbone, or the Jacobian fallback)
def test_dp_fit_trains_only_the_adapters_and_reports_epsilon():
    rng = np.random.default_rng(3)
    model = _compile(_classifier(rng), noise=1.0)
    x, y = _classifier_data(24, rng)
    before = _values(model)
    trained = {v.path for v in model.trainable_variables}
    budget = keras_safe.callbacks.PrivacyBudget(delta=1e-3, verbose=0)
    history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[budget], verbose=0)
    after = _values(model)
    for path, value in before.items():
        moved = not np.array_equal(value, after[path])
        assert moved is (path in trained), path
    # Poisson batches drawn from the arrays: 2 epochs of 3 steps at rate 8 / 24.
    assert budget.steps == 6
    expected = dp_reference.epsilon(1.0, 8 / 24, 6, 1e-3)
    assert budget.epsilon == pytest.approx(expected, rel=1e-6)
    assert history.history["epsilon"][-1] == pytest.approx(budget.epsilon)


def test_dp_fit_causal_lm_on_poisson_batches_reports_epsilon():
    rng = np.random.default_rng(4)
    model = _compile(_causal_lm(rng), noise=1.2)
    x, y, weights = _lm_data(32, rng)
    data = keras_safe.privacy.poisson_batches(x, y, weights, batch_size=8, epochs=1)
    before = _values(model)
    budget = keras_safe.callbacks.PrivacyBudget(delta=1e-3, verbose=0)
    history = model.fit(data, epochs=1, callbacks=[budget], shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    after = _values(model)
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    assert moved and moved <= {v.path for v in model.trainable_variables}
    assert budget.steps == 4
    expected = dp_reference.epsilon(1.2, 8 / 32, 4, 1e-3)
    assert budget.epsilon == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow  # several seconds (BERT backbone, or the Jacobian fallback)
def test_keras_hub_layers_without_a_rule_go_to_the_verified_fallback():
    # Full fine-tuning: the tied token embedding (ReversibleEmbedding, its own call) and the
    # position embedding have no rule; they are verified against the reference, never trusted.
    rng = np.random.default_rng(5)
    model = _compile(_causal_lm(rng, lora=False))
    backbone = model.backbone
    assert find_rule(backbone.token_embedding) is None
    assert find_rule(backbone.position_embedding) is None
    x, y, weights = _lm_data(6, rng)
    check = keras_safe.testing.assert_dp_matches_reference(model, x, y, sample_weight=weights)
    assert check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5
    assert check.fallback in ("vectorized", "loop")
    # LoRA on the tied embedding does not make it a plain Embedding either.
    backbone.token_embedding.enable_lora(RANK)
    assert find_rule(backbone.token_embedding) is None
