"""The models the DP benchmarks train: the families people train with DP-SGD.

Each entry of `MODELS` gives a model factory, its default batch size, a maker of synthetic
inputs of the right shape (speed does not depend on the values) and the number of classes.

- cnn: TF Privacy's tutorial CNN (two Conv2D, two Dense) on 28x28x1, batch 250.
- mlp: 784-512-512-10, batch 256.
- embedding: Embedding(10000, 64) over 100 tokens, average pooling, Dense 64, Dense 2.
- lstm: Embedding(2000, 32) + LSTM(32) + Dense over 40 steps, batch 64.
- transformer: a small text classifier, Embedding(10000, 64) over 64 tokens, two blocks of
  MultiHeadAttention (4 heads) + LayerNormalization + Dense (128) + LayerNormalization,
  average pooling, Dense 2; batch 64.
- resnet: ResNet-20 (He et al. 2016, CIFAR variant: 3 stages of 3 basic blocks, 16/32/64
  channels) with GroupNormalization in place of BatchNormalization, 32x32x3, batch 128.
- wrn: WideResNet-16-4 (Zagoruyko & Komodakis 2016) with GroupNormalization (16 groups), as
  in De et al. 2022's DP training on CIFAR-10, 32x32x3, batch 256.
- lora: LoRA fine-tuning (Hu et al. 2021) of a text classifier: token and position embeddings
  (2000 tokens, 64 places, d=128), 2 blocks of MultiHeadAttention (4 heads) and feed-forward
  (256), average pooling, Dense 2. Rank-8 adapters on the attention query and value projections
  and on the feed-forward Dense layers, the attention key and output projections trained at
  full rank, the head trained, every other weight frozen; int32 tokens, batch 64.
- hub: a tiny keras-hub BERT classifier (2 layers, d=64, 4 heads, feed-forward 128) built from
  its config with random weights (no download), `backbone.enable_lora(8)` and the
  `BertTextClassifier` head; it takes int32 token ids (0 pads the end of a sequence; the
  padding mask and the segment ids are computed from them), batch 64. Absent from `MODELS`
  where keras-hub is not installed (`UNAVAILABLE` says why).
"""

import importlib.util

import keras
import numpy as np

__all__ = [
    "MODELS",
    "UNAVAILABLE",
    "bert_classifier",
    "bert_on_tokens",
    "lora_transformer",
    "resnet",
    "transformer",
    "wide_resnet",
    "write_result",
]

L = keras.layers


def cnn():
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            L.Conv2D(16, 8, strides=2, padding="same", activation="relu"),
            L.MaxPool2D(2, 1),
            L.Conv2D(32, 4, strides=2, padding="valid", activation="relu"),
            L.MaxPool2D(2, 1),
            L.Flatten(),
            L.Dense(32, activation="relu"),
            L.Dense(10),
        ]
    )


def mlp():
    return keras.Sequential(
        [
            keras.Input((784,)),
            L.Dense(512, activation="relu"),
            L.Dense(512, activation="relu"),
            L.Dense(10),
        ]
    )


def embedding():
    return keras.Sequential(
        [
            keras.Input((100,), dtype="int32"),
            L.Embedding(10000, 64),
            L.GlobalAveragePooling1D(),
            L.Dense(64, activation="relu"),
            L.Dense(2),
        ]
    )


def lstm():
    return keras.Sequential(
        [
            keras.Input((40,), dtype="int32"),
            L.Embedding(2000, 32),
            L.LSTM(32),
            L.Dense(2),
        ]
    )


def transformer(vocabulary=10000, tokens=64, width=64, heads=4, hidden=128, blocks=2):
    inputs = keras.Input((tokens,), dtype="int32")
    h = L.Embedding(vocabulary, width)(inputs)
    for _ in range(blocks):
        attended = L.MultiHeadAttention(heads, width // heads)(h, h)
        h = L.LayerNormalization()(h + attended)
        ff = L.Dense(width)(L.Dense(hidden, activation="relu")(h))
        h = L.LayerNormalization()(h + ff)
    h = L.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, L.Dense(2)(h))


def _norm(groups):
    return L.GroupNormalization(groups=groups)


def _basic_block(h, channels, stride, groups):
    shortcut = h
    y = L.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(h)
    y = L.Activation("relu")(_norm(groups)(y))
    y = L.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    y = _norm(groups)(y)
    if stride != 1 or h.shape[-1] != channels:
        shortcut = L.Conv2D(channels, 1, strides=stride, use_bias=False)(h)
    return L.Activation("relu")(y + shortcut)


def resnet(blocks=3, widths=(16, 32, 64), groups=4, classes=10):
    inputs = keras.Input((32, 32, 3))
    h = L.Conv2D(widths[0], 3, padding="same", use_bias=False)(inputs)
    h = L.Activation("relu")(_norm(groups)(h))
    for stage, channels in enumerate(widths):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _basic_block(h, channels, stride, groups)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, L.Dense(classes)(h))


def _wide_block(h, channels, stride, groups):
    # Pre-activation block (norm, relu, conv, norm, relu, conv), as in WideResNet.
    y = L.Activation("relu")(_norm(groups)(h))
    shortcut = h
    if stride != 1 or h.shape[-1] != channels:
        shortcut = L.Conv2D(channels, 1, strides=stride, use_bias=False)(y)
    y = L.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)(y)
    y = L.Activation("relu")(_norm(groups)(y))
    y = L.Conv2D(channels, 3, padding="same", use_bias=False)(y)
    return y + shortcut


def wide_resnet(depth=16, width=4, groups=16, classes=10):
    blocks = (depth - 4) // 6
    inputs = keras.Input((32, 32, 3))
    h = L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    for stage, channels in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _wide_block(h, channels, stride, groups)
    h = L.Activation("relu")(_norm(groups)(h))
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, L.Dense(classes)(h))


LORA_RANK = 8
LORA_VOCABULARY = 2000
LORA_TOKENS = 64


def _lora_block(h, width, heads, feed_forward):
    attention = L.MultiHeadAttention(heads, width // heads)
    h = L.LayerNormalization()(h + attention(h, h))
    ff = L.Dense(feed_forward, activation="relu")(h)
    return L.LayerNormalization()(h + L.Dense(width)(ff)), attention


def lora_transformer(width=128, heads=4, feed_forward=256, blocks=2, full_key_output=False):
    """The LoRA text classifier: rank-8 adapters on the attention query/value projections and
    the feed-forward Dense layers, the head trainable, the other base weights frozen.

    `full_key_output=True` also trains the attention key and output projections at full rank.
    """
    ids = keras.Input((LORA_TOKENS,), dtype="int32")
    h = L.Embedding(LORA_VOCABULARY, width)(ids)
    places = keras.ops.cumsum(keras.ops.ones_like(ids), axis=1) - 1
    h = h + L.Embedding(LORA_TOKENS, width)(places)
    attentions = []
    for _ in range(blocks):
        h, attention = _lora_block(h, width, heads, feed_forward)
        attentions.append(attention)
    h = L.GlobalAveragePooling1D()(h)
    head = L.Dense(2)
    model = keras.Model(ids, head(h))
    dense = [layer for layer in model.layers if isinstance(layer, L.Dense)]
    adapted = [a.query_dense for a in attentions] + [a.value_dense for a in attentions]
    adapted += [layer for layer in dense if layer is not head]
    for layer in model.layers:
        layer.trainable = layer is head
    for attention in attentions:  # its query and value projections get adapters
        attention.trainable = True  # every projection, until frozen below
        attention.key_dense.trainable = full_key_output
        attention.output_dense.trainable = full_key_output
    for layer in adapted:
        layer.trainable = False
        layer.enable_lora(LORA_RANK)  # adds the adapters, trainable; freezes the kernel
        layer.trainable = True
        for variable in layer.weights:
            variable.trainable = variable.name.startswith("lora_")
    return model


def _lora_full_key_output():
    return lora_transformer(full_key_output=True)


def bert_classifier():
    """A tiny keras-hub BERT classifier with LoRA on the backbone (random weights); it takes
    keras-hub's dict of `token_ids`, `segment_ids` and `padding_mask`."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=LORA_VOCABULARY,
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=LORA_TOKENS,
    )
    backbone.enable_lora(LORA_RANK)
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0
    )


def bert_on_tokens():
    """`bert_classifier` taking int32 token ids alone (0 pads; one segment)."""
    ids = keras.Input((LORA_TOKENS,), dtype="int32")
    inputs = {
        "token_ids": ids,
        "segment_ids": keras.ops.zeros_like(ids),
        "padding_mask": keras.ops.cast(keras.ops.not_equal(ids, 0), "int32"),
    }
    return keras.Model(ids, bert_classifier()(inputs))


def _images(shape):
    return lambda n, rng: rng.normal(size=(n, *shape)).astype("float32")


def _tokens(vocabulary, length):
    return lambda n, rng: rng.integers(0, vocabulary, (n, length)).astype("int32")


def _padded_tokens(vocabulary, length):
    """Token ids 1..vocabulary-1, each sequence padded with 0 after a length drawn from
    [length / 2, length]."""

    def make(n, rng):
        ids = rng.integers(1, vocabulary, (n, length))
        lengths = rng.integers(length // 2, length + 1, n)
        return np.where(np.arange(length)[None, :] < lengths[:, None], ids, 0).astype("int32")

    return make


MODELS = {
    "cnn": (cnn, 250, _images((28, 28, 1)), 10),
    "mlp": (mlp, 256, _images((784,)), 10),
    "embedding": (embedding, 256, _tokens(10000, 100), 2),
    "lstm": (lstm, 64, _tokens(2000, 40), 2),
    "transformer": (transformer, 64, _tokens(10000, 64), 2),
    "resnet": (resnet, 128, _images((32, 32, 3)), 10),
    "wrn": (wide_resnet, 256, _images((32, 32, 3)), 10),
    "lora": (_lora_full_key_output, 64, _tokens(LORA_VOCABULARY, LORA_TOKENS), 2),
}
UNAVAILABLE = {}  # name: why the model cannot be built here
if importlib.util.find_spec("keras_hub") is None:
    UNAVAILABLE["hub"] = "keras-hub is not installed (pip install keras_safe[hub])"
else:
    MODELS["hub"] = (bert_on_tokens, 64, _padded_tokens(LORA_VOCABULARY, LORA_TOKENS), 2)


def write_result(path, result):
    """Writes a benchmark's result file (sorted keys, indented, one final newline)."""
    import json
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
        f.write("\n")
