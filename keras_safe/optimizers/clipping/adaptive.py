"""Adaptive clipping: a global-norm threshold that tracks a quantile of the gradient norms.

Andrew, Thakkar, McMahan and Ramaswamy (2021), "Differentially Private Learning with Adaptive
Clipping": after each step the threshold moves geometrically,
`c <- c * exp(-eta * (b - q))`, where `b` is 1 if the step's norm was at most `c` and 0
otherwise. In expectation it settles where a fraction `q` of the norms lies below it.
"""

import keras
from keras import ops

from keras_safe._validation import check_number, check_probability
from keras_safe.optimizers.clipping.base import ClipRule, scale_gradients

__all__ = ["AdaptiveClip"]


class AdaptiveClip(ClipRule):
    """`mode="adaptive"`: global norm clipping at a threshold that tracks a norm quantile.

    Args:
        clip_norm: the initial threshold, a positive number.
        target_quantile: the quantile `q` of the gradient norm to track, in (0, 1); 0.5 (the
            median) as in the paper.
        quantile_learning_rate: the step size `eta` of the geometric update, > 0; 0.2 as in
            the paper.

    Example:
        >>> from keras_safe.optimizers import GradientClip
        >>> GradientClip("sgd", mode="adaptive", clip_norm=2.0).rule
        AdaptiveClip(clip_norm=2.0, target_quantile=0.5, quantile_learning_rate=0.2)
    """

    mode = "adaptive"
    arguments = ("clip_norm", "target_quantile", "quantile_learning_rate")
    # keras_safe 0.1.0 also saved a moving average it did not use.
    legacy_unused_variables = 1

    def __init__(self, clip_norm=1.0, target_quantile=0.5, quantile_learning_rate=0.2):
        self.clip_norm = check_number(
            "clip_norm",
            clip_norm,
            low=0,
            low_inclusive=False,
            fix="pass a positive number, the threshold of the first step.",
        )
        self.target_quantile = check_probability(
            "target_quantile",
            target_quantile,
            fix="use e.g. target_quantile=0.5, which tracks the median norm.",
        )
        self.quantile_learning_rate = check_number(
            "quantile_learning_rate",
            quantile_learning_rate,
            low=0,
            low_inclusive=False,
            fix="use e.g. quantile_learning_rate=0.2 (the paper's value).",
        )

    def build(self, optimizer, var_list):
        self._threshold = optimizer.add_variable(
            (),
            initializer=keras.initializers.Constant(self.clip_norm),
            dtype="float32",
            name="clip_threshold",
        )

    def clip(self, grads, variables, norms, global_norm):
        return scale_gradients(grads, global_norm, ops.convert_to_tensor(self._threshold))

    def update(self, global_norm, was_clipped, finite):
        threshold = ops.convert_to_tensor(self._threshold)
        below = ops.cast(ops.logical_not(was_clipped), "float32")
        moved = threshold * ops.exp(-self.quantile_learning_rate * (below - self.target_quantile))
        self._threshold.assign(ops.where(finite, moved, threshold))

    def step_logs(self):
        """`clip_norm`: the threshold of the next step."""
        return {"clip_norm": ops.convert_to_tensor(self._threshold)}
