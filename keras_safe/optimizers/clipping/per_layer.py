"""Per-layer clipping: the global-norm rule applied to each variable, or each layer, on its own."""

from keras import ops

from keras_safe._validation import check_choice, check_number
from keras_safe.optimizers.clipping.base import ClipRule, any_flag, scale_factor

__all__ = ["GROUPS", "PerLayerClip", "layer_of"]

#: How `PerLayerClip` groups the variables.
GROUPS = ("variable", "layer")


def layer_of(path):
    """The layer part of a variable path: the path without its last component.

    Example:
        >>> layer_of("model/dense/kernel")
        'model/dense'
    """
    return path.rsplit("/", 1)[0] if "/" in path else path


class PerLayerClip(ClipRule):
    """`mode="per_layer"`: each group's gradient has L2 norm at most `clip_norm`.

    A group is one variable (`group="variable"`), or one layer (`group="layer"`: the variables
    whose paths share everything but the last component, such as `dense/kernel` and
    `dense/bias`). A group whose norm `n` exceeds `clip_norm` is scaled by `clip_norm / n`;
    the others are left as they are.

    Args:
        clip_norm: the threshold of every group, a positive number.
        group: `"variable"` or `"layer"`.

    Example:
        >>> from keras_safe.optimizers import GradientClip
        >>> GradientClip("sgd", mode="per_layer", group="layer").rule
        PerLayerClip(clip_norm=1.0, group='layer')
    """

    mode = "per_layer"
    arguments = ("clip_norm", "group")

    def __init__(self, clip_norm=1.0, group="variable"):
        self.clip_norm = check_number(
            "clip_norm",
            clip_norm,
            low=0,
            low_inclusive=False,
            fix="pass a positive number, the largest norm each group keeps.",
        )
        self.group = check_choice(
            "group",
            group,
            GROUPS,
            "use 'variable' (each variable on its own) or 'layer' (a layer's variables together).",
        )

    def _group_norms(self, variables, norms):
        if self.group == "variable":
            return list(norms)
        squares = {}
        for v, n in zip(variables, norms, strict=True):
            if n is not None:
                key = layer_of(v.path)
                squares[key] = squares.get(key, 0.0) + ops.square(n)
        return [
            None if n is None else ops.sqrt(squares[layer_of(v.path)])
            for v, n in zip(variables, norms, strict=True)
        ]

    def clip(self, grads, variables, norms, global_norm):
        threshold = ops.convert_to_tensor(self.clip_norm, "float32")
        clipped, flags = [], []
        for g, n in zip(grads, self._group_norms(variables, norms), strict=True):
            if g is None:
                clipped.append(None)
                continue
            clipped.append(g * ops.cast(scale_factor(n, threshold), g.dtype))
            flags.append(ops.greater(n, threshold))
        return clipped, any_flag(flags)
