"""DP fine-tuning of a keras-hub causal language model with LoRA adapters, offline.

The privacy unit is one sequence (one record): DP-SGD clips each sequence's gradient, so the
released adapters are (epsilon, delta)-DP with respect to adding or removing one record
(Yu et al. 2022, "Differentially Private Fine-tuning of Language Models"). The steps:

1. A backbone: by default a tiny GPT-2 built from its config and pretrained here, without
   privacy, on public text (no download). With `--preset NAME` (for example `gpt2_base_en`)
   and a network connection, a real pretrained preset and its tokenizer instead; without a
   network the script says so and uses the tiny model.
2. `backbone.enable_lora(rank)`: every base weight frozen, low-rank adapters on the attention
   query and value projections (keras_safe computes their per-example gradients from rank-r
   factors, at about the speed of plain training).
3. DP fine-tuning on the private records with `fit`: Poisson-sampled batches
   (`keras_safe.privacy.poisson_batches`, the sampling the accountant assumes), the padding of
   each sequence masked by per-token sample weights, the noise calibrated to `--epsilon`, and
   the spent budget reported by `PrivacyBudget`.

Usage: python examples/dp_lora_keras_hub.py [--records 2048] [--epochs 3] [--epsilon 8]
       [--preset gpt2_base_en]
Needs the `hub` extra: pip install keras_safe[hub].
"""

import argparse
import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_safe  # noqa: E402

LENGTH = 16
NAMES = ["ana", "ben", "chen", "dara", "eli", "fatima", "goran", "hana", "ivo", "jun"]
CITIES = ["oslo", "lima", "pune", "kyiv", "quito", "accra", "hanoi", "perth"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
AMOUNTS = [str(10 * k) for k in range(1, 11)]
WORDS = ["visited", "lives", "in", "on", "and", "paid", "euros", "likes", "the", "market"]
VOCABULARY = ["<pad>", "<end>", *NAMES, *CITIES, *DAYS, *AMOUNTS, *WORDS]


def public_text(count, rng):
    """Public pretraining text: who lives where and what they like."""
    return [
        f"{rng.choice(NAMES)} lives in {rng.choice(CITIES)} and likes the market"
        for _ in range(count)
    ]


def private_records(count, rng):
    """The private data: one record per person-visit (the unit DP protects)."""
    return [
        f"{rng.choice(NAMES)} visited {rng.choice(CITIES)} on {rng.choice(DAYS)} "
        f"and paid {rng.choice(AMOUNTS)} euros"
        for _ in range(count)
    ]


def word_tokens(texts):
    """`(x, y, sample_weight)` for next-token training with the word-level vocabulary."""
    index = {word: i for i, word in enumerate(VOCABULARY)}
    ids = np.zeros((len(texts), LENGTH + 1), "int32")
    for row, text in enumerate(texts):
        words = [index[w] for w in text.split()][:LENGTH] + [index["<end>"]]
        ids[row, : len(words)] = words
    mask = ids[:, 1:] > 0  # a position is trained when its next token is not padding
    x = {"token_ids": ids[:, :-1], "padding_mask": ids[:, :-1] > 0}
    return x, ids[:, 1:], mask.astype("float32")


def network_available(host="www.kaggle.com", port=443, timeout=3.0):
    """True when `host` answers (keras-hub presets download from there)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tiny_model(public, pretrain_epochs, rng):
    """A tiny GPT-2 built from its config and pretrained here on public text (no privacy)."""
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(VOCABULARY),
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=LENGTH,
        dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    x, y, w = word_tokens(public)
    model.fit(x, y, sample_weight=w, batch_size=32, epochs=pretrain_epochs, verbose=0)
    return model, word_tokens


def preset_model(preset):
    """A real pretrained preset and its tokenizer (downloads; needs the network)."""
    model = keras_hub.models.CausalLM.from_preset(preset, preprocessor=None)
    preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset, sequence_length=LENGTH)

    def tokens(texts):
        x, y, w = preprocessor(texts)
        return keras.tree.map_structure(keras.ops.convert_to_numpy, (x, y, w))

    return model, tokens


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--records", type=int, default=2048, help="private training records")
    parser.add_argument("--epochs", type=float, default=3, help="passes over the records")
    parser.add_argument("--batch-size", type=int, default=64, help="expected Poisson batch")
    parser.add_argument("--epsilon", type=float, default=8.0, help="the privacy budget")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--pretrain-epochs", type=int, default=4, help="tiny model only")
    parser.add_argument("--preset", help="a keras-hub preset, loaded when the network is there")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    if args.preset and network_available():
        print(f"Loading the preset {args.preset}.")
        model, tokens = preset_model(args.preset)
    else:
        if args.preset:
            print(f"No network: {args.preset} cannot be downloaded; using the tiny model.")
        print("A tiny GPT-2 built from its config, pretrained here on public text.")
        model, tokens = tiny_model(public_text(4 * args.batch_size, rng), args.pretrain_epochs, rng)

    records = private_records(args.records, rng)
    x, y, w = tokens(records)
    held_out = tokens(private_records(256, np.random.default_rng(1)))
    model.compile()  # keras-hub's loss and weighted accuracy, to evaluate
    before = model.evaluate(*held_out[:2], sample_weight=held_out[2], verbose=0)

    model.backbone.enable_lora(args.rank)
    adapters = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    print(f"Trainable: {adapters:,} adapter weights of {total:,}.")

    delta = 1.0 / args.records**1.1
    model.compile(
        optimizer=keras_safe.optimizers.DPAdam(
            learning_rate=1e-2, l2_norm_clip=1.0, target_epsilon=args.epsilon, delta=delta
        ),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    # keras-hub tasks turn arrays into a dataset inside their fit: make the model private
    # first, so keras_safe reads the data settings from what fit is given.
    model = keras_safe.privacy.make_private(model)
    data = keras_safe.privacy.poisson_batches(
        x, y, w, batch_size=args.batch_size, epochs=args.epochs
    )
    budget = keras_safe.callbacks.PrivacyBudget(delta=delta, verbose=0)
    model.fit(data, epochs=1, callbacks=[budget], shuffle=False, verbose=0)

    model.compile()
    after = model.evaluate(*held_out[:2], sample_weight=held_out[2], verbose=0)
    print(
        f"Held-out records: loss {before[0]:.3f} -> {after[0]:.3f}, next-token accuracy "
        f"{before[1]:.3f} -> {after[1]:.3f}."
    )
    print(
        f"Privacy: epsilon = {budget.epsilon:.2f} at delta = {delta:.1e}, one record = one "
        f"sequence, {budget.steps} steps."
    )
    return {"before": before, "after": after, "epsilon": budget.epsilon, "delta": delta}


if __name__ == "__main__":
    main()
