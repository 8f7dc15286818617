"""Embedding: each example's gradient adds its output gradients to the rows it looked up."""

import keras

from keras_safe.privacy.per_example.embedding_form import EmbeddingGrad
from keras_safe.privacy.per_example.rules.base import PerExampleRule, plain_keras_call, positions

__all__ = ["EmbeddingRule"]


class EmbeddingRule(PerExampleRule):
    """`keras.layers.Embedding` (ids of any shape; repeated ids within an example add up)."""

    @staticmethod
    def supports(layer):
        return plain_keras_call(layer, keras.layers.Embedding)

    @staticmethod
    def forward(layer, record, inputs, *args, **kwargs):
        ids = keras.ops.cast(inputs, "int32")
        z = keras.ops.take(layer.embeddings, ids, axis=0)
        record(ids, z)
        return keras.ops.cast(z, layer.compute_dtype)

    @staticmethod
    def forms(layer, ids, dz):
        flat_ids = positions(ids)
        g = positions(dz, dz.shape[-1])
        return [EmbeddingGrad(layer.embeddings, flat_ids, g)]
