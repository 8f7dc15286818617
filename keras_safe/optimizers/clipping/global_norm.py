"""Global norm clipping (Pascanu, Mikolov and Bengio 2013), with a fixed or automatic threshold.

All gradients of a step are scaled by `min(1, c / N)`, `N` their global L2 norm. The threshold
`c` is fixed (`GlobalNormClip`), or follows training (`AutoGlobalNormClip`, `clip_norm="auto"`):
`c = auto_factor * m`, `m` an exponential moving average of the already clipped global norms of
the earlier steps, so that sudden spikes are clipped without picking a number by hand.
"""

import math

import keras
from keras import ops

from keras_safe._validation import check_number, check_probability, fail
from keras_safe.optimizers.clipping.base import ClipRule, scale_gradients

__all__ = ["AutoGlobalNormClip", "GlobalNormClip"]

_AUTO = "auto"


class GlobalNormClip(ClipRule):
    """`mode="global_norm"`, fixed threshold: a step's global norm is at most `clip_norm`.

    Args:
        clip_norm: the threshold, a positive number (or `"auto"`, which selects
            `AutoGlobalNormClip` when given to `GradientClip`).

    Example:
        >>> from keras_safe.optimizers import GradientClip
        >>> GradientClip("sgd", mode="global_norm", clip_norm=5.0).rule
        GlobalNormClip(clip_norm=5.0)
    """

    mode = "global_norm"
    arguments = ("clip_norm",)

    def __init__(self, clip_norm=1.0):
        self.clip_norm = check_number(
            "clip_norm",
            clip_norm,
            low=0,
            low_inclusive=False,
            fix="pass a positive number (the largest global gradient norm a step keeps), or "
            "'auto' for a threshold that follows the running average of the norm.",
        )

    @classmethod
    def select(cls, arguments):
        if arguments.get("clip_norm") == _AUTO:
            return AutoGlobalNormClip
        return cls

    @classmethod
    def reject(cls, name, value):
        if name in AutoGlobalNormClip.arguments:
            fail(
                name,
                value,
                "left unset unless clip_norm='auto'",
                "pass clip_norm='auto' to use it, or remove it.",
            )
        super().reject(name, value)

    def clip(self, grads, variables, norms, global_norm):
        return scale_gradients(grads, global_norm, self.clip_norm)


class AutoGlobalNormClip(ClipRule):
    """`mode="global_norm"` with `clip_norm="auto"`: clip spikes above the running average.

    The threshold of a step is `auto_factor * m`, where `m` is the exponential moving average
    (decay `ema_decay`) of the global norms of the earlier finite steps after clipping
    (`min(N, threshold)`, so a spike does not raise the threshold much). The first step is
    never clipped: its norm starts the average.

    Args:
        clip_norm: `"auto"`.
        auto_factor: multiple of the average above which a step is clipped, > 1.
        ema_decay: decay of the moving average, in [0, 1).

    Example:
        >>> from keras_safe.optimizers import GradientClip
        >>> GradientClip("sgd", clip_norm="auto", auto_factor=3.0).rule
        AutoGlobalNormClip(clip_norm='auto', auto_factor=3.0, ema_decay=0.99)
    """

    mode = "global_norm"
    arguments = ("clip_norm", "auto_factor", "ema_decay")

    def __init__(self, clip_norm=_AUTO, auto_factor=2.0, ema_decay=0.99):
        if clip_norm != _AUTO:
            fail("clip_norm", clip_norm, "'auto'", "use GlobalNormClip for a fixed threshold.")
        self.clip_norm = _AUTO
        self.auto_factor = check_number(
            "auto_factor",
            auto_factor,
            low=1,
            low_inclusive=False,
            fix="use e.g. auto_factor=2.0 (clip steps whose norm is twice the average).",
        )
        self.ema_decay = check_probability(
            "ema_decay",
            ema_decay,
            allow_zero=True,
            fix="use e.g. ema_decay=0.99 (an average over about the last 100 steps).",
        )

    def build(self, optimizer, var_list):
        # Infinite until a finite step was seen: the first step is never clipped.
        self._threshold = optimizer.add_variable(
            (),
            initializer=keras.initializers.Constant(math.inf),
            dtype="float32",
            name="clip_threshold",
        )
        self._norm_average = optimizer.add_variable(
            (), initializer="zeros", dtype="float32", name="norm_average"
        )

    def clip(self, grads, variables, norms, global_norm):
        return scale_gradients(grads, global_norm, ops.convert_to_tensor(self._threshold))

    def update(self, global_norm, was_clipped, finite):
        threshold = ops.convert_to_tensor(self._threshold)
        first = ops.logical_not(ops.isfinite(threshold))
        kept = ops.minimum(global_norm, threshold)
        average = ops.where(
            first,
            kept,
            self.ema_decay * self._norm_average + (1.0 - self.ema_decay) * kept,
        )
        self._norm_average.assign(ops.where(finite, average, self._norm_average))
        self._threshold.assign(ops.where(finite, self.auto_factor * average, self._threshold))

    def step_logs(self):
        """`clip_norm`: the threshold of the next step (infinite before the first step)."""
        return {"clip_norm": ops.convert_to_tensor(self._threshold)}
