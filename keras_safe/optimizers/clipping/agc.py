"""Adaptive gradient clipping (AGC) of Brock, De, Smith and Simonyan (2021), "High-Performance
Large-Scale Image Recognition Without Normalization": each unit's gradient is clipped relative to
the norm of that unit's weights."""

from keras import ops

from keras_safe._validation import check_number
from keras_safe.optimizers.clipping.base import ClipRule, any_flag, l2_norm

__all__ = ["AGCClip", "unitwise_norm"]


def unitwise_norm(x):
    """The per-unit L2 norm used by adaptive gradient clipping (Brock et al. 2021).

    A unit is one output unit of a layer: scalars and vectors form one unit; for a tensor of
    rank 2 or more (Dense kernel `(in, out)`, Conv kernel `(h, w, in, out)`, Embedding table
    `(vocab, dim)`) every index of the last axis is a unit, so the norm is taken over all
    other axes.

    Args:
        x: a tensor.

    Returns:
        A float32 tensor broadcastable against `x`: a scalar for rank 0 and 1, otherwise the
        shape of `x` with every axis but the last reduced to 1.

    Example:
        >>> import numpy as np
        >>> unitwise_norm(np.array([[3.0, 0.0], [4.0, 1.0]])).numpy().tolist()
        [[5.0, 1.0]]
    """
    rank = len(x.shape)
    if rank <= 1:
        return l2_norm(x)
    return l2_norm(x, axis=tuple(range(rank - 1)), keepdims=True)


class AGCClip(ClipRule):
    """`mode="agc"`: unit-wise clipping relative to the weights (Brock et al. 2021).

    For each unit `i` (see `unitwise_norm`) of each variable `W` with gradient `G`: if
    `||G_i|| > clip_factor * max(||W_i||, epsilon)`, then
    `G_i <- clip_factor * max(||W_i||, epsilon) * G_i / ||G_i||`.

    Args:
        clip_factor: the largest ratio `lambda` of gradient norm to weight norm, > 0. The
            paper uses 0.01; larger values (0.02 - 0.16) suit small batches.
        epsilon: floor on the weight norm, so that zero-initialised weights (biases) can
            move, > 0.

    Example:
        >>> from keras_safe.optimizers import GradientClip
        >>> GradientClip("sgd", mode="agc", clip_factor=0.02).rule
        AGCClip(clip_factor=0.02, epsilon=0.001)
    """

    mode = "agc"
    arguments = ("clip_factor", "epsilon")

    def __init__(self, clip_factor=0.01, epsilon=1e-3):
        self.clip_factor = check_number(
            "clip_factor",
            clip_factor,
            low=0,
            low_inclusive=False,
            fix="use e.g. clip_factor=0.01 (the paper's value) to 0.16 for small batches.",
        )
        self.epsilon = check_number(
            "epsilon",
            epsilon,
            low=0,
            low_inclusive=False,
            fix="use e.g. epsilon=1e-3, the floor on a unit's weight norm.",
        )

    def clip(self, grads, variables, norms, global_norm):
        clipped, flags = [], []
        for g, v in zip(grads, variables, strict=True):
            if g is None:
                clipped.append(None)
                continue
            max_norm = self.clip_factor * ops.maximum(unitwise_norm(v), self.epsilon)
            g_norm = unitwise_norm(g)
            trigger = ops.greater(g_norm, max_norm)
            factor = ops.where(trigger, max_norm / ops.maximum(g_norm, 1e-30), 1.0)
            clipped.append(g * ops.cast(factor, g.dtype))
            flags.append(ops.any(trigger))
        return clipped, any_flag(flags)
