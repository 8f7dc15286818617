"""Global norm clipping, fixed and `clip_norm="auto"`, against numpy references."""

import math

import keras
import numpy as np
import pytest

from keras_safe.optimizers import GradientClip
from keras_safe.optimizers.clipping import AutoGlobalNormClip, GlobalNormClip
from tests.optimizers.clipping.reference import ReferenceRule, assert_matches_reference, norm


class FixedReference(ReferenceRule):
    """Pascanu et al. (2013): scale by min(1, c / N), N the global norm."""

    def __init__(self, clip_norm):
        super().__init__()
        self.clip_norm = clip_norm

    def rule(self, grads, weights):
        total = math.sqrt(sum(norm(g) ** 2 for g in grads))
        factor = 1.0 if total <= self.clip_norm else self.clip_norm / total
        return [g * factor for g in grads], total > self.clip_norm


class AutoReference(ReferenceRule):
    """Threshold auto_factor * (moving average of the clipped norms); the first step is free."""

    def __init__(self, auto_factor=2.0, ema_decay=0.99):
        super().__init__()
        self.auto_factor, self.ema_decay = auto_factor, ema_decay
        self.threshold = math.inf
        self.average = None

    def rule(self, grads, weights):
        total = math.sqrt(sum(norm(g) ** 2 for g in grads))
        c = self.threshold
        factor = 1.0 if total <= c else c / total
        kept = min(total, c)
        if self.average is None:
            self.average = kept
        else:
            self.average = self.ema_decay * self.average + (1 - self.ema_decay) * kept
        self.threshold = self.auto_factor * self.average
        return [g * factor for g in grads], total > c


def test_fixed_threshold_matches_numpy_reference():
    optimizer = assert_matches_reference(
        "global_norm", {"clip_norm": 20.0}, lambda: FixedReference(20.0)
    )
    assert isinstance(optimizer.rule, GlobalNormClip)


def test_auto_threshold_matches_numpy_reference():
    kwargs = {"clip_norm": "auto", "auto_factor": 1.5, "ema_decay": 0.5}
    optimizer = assert_matches_reference(
        "global_norm", kwargs, lambda: AutoReference(auto_factor=1.5, ema_decay=0.5)
    )
    assert isinstance(optimizer.rule, AutoGlobalNormClip)


def _eager_steps(optimizer, gradients):
    """Applies each list of gradients to variables starting at zero; returns the updates."""
    variables = [keras.Variable(np.zeros_like(g), dtype="float32") for g in gradients[0]]
    updates = []
    for grads in gradients:
        before = [np.array(v) for v in variables]
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        updates.append([b - np.array(v) for b, v in zip(before, variables, strict=True)])
    return updates


def test_one_step_is_scaled_to_the_threshold_and_keeps_its_direction():
    grads = [np.array([[3.0, 0.0], [0.0, 4.0]], "float32"), np.array([0.0, 12.0], "float32")]
    (update,) = _eager_steps(GradientClip(keras.optimizers.SGD(1.0), clip_norm=2.0), [grads])
    # Global norm 13 > 2: SGD(1) moves by the gradient times 2 / 13.
    for got, g in zip(update, grads, strict=True):
        np.testing.assert_allclose(got, g * 2.0 / 13.0, rtol=1e-6)
    (small,) = _eager_steps(GradientClip(keras.optimizers.SGD(1.0), clip_norm=20.0), [grads])
    for got, g in zip(small, grads, strict=True):
        np.testing.assert_allclose(got, g, rtol=1e-6)


def test_auto_threshold_lets_the_first_step_through_and_clips_a_spike():
    optimizer = GradientClip(
        keras.optimizers.SGD(1.0), clip_norm="auto", auto_factor=2.0, ema_decay=0.5
    )
    steps = [[np.array([3.0, 4.0], "float32")], [np.array([0.0, 100.0], "float32")]]
    first, spike = _eager_steps(optimizer, steps)
    np.testing.assert_allclose(first[0], [3.0, 4.0])  # never clipped: norm 5 starts the average
    np.testing.assert_allclose(spike[0], [0.0, 10.0], rtol=1e-6)  # 2 * 5
    # The spike enters the average clipped (10, not 100): 0.5 * 5 + 0.5 * 10 = 7.5.
    assert float(optimizer.step_logs()["clip_norm"]) == pytest.approx(15.0)


def test_defaults():
    assert GradientClip("sgd").rule.get_config() == {"clip_norm": 1.0}
    assert GradientClip("sgd", clip_norm="auto").rule.get_config() == {
        "clip_norm": "auto",
        "auto_factor": 2.0,
        "ema_decay": 0.99,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_norm": -1.0}, "`clip_norm` must be .*> 0.*'auto'"),
        ({"clip_norm": 0.0}, "`clip_norm`"),
        ({"clip_norm": "big"}, "`clip_norm`"),
        ({"clip_norm": math.inf}, "`clip_norm` must be finite"),
        ({"clip_norm": True}, "`clip_norm`"),
        ({"auto_factor": 2.0}, "`auto_factor` .*Fix: pass clip_norm='auto'"),
        ({"ema_decay": 0.9}, "`ema_decay` .*Fix: pass clip_norm='auto'"),
        ({"clip_norm": "auto", "auto_factor": 0.5}, "`auto_factor` must be .*> 1"),
        ({"clip_norm": "auto", "ema_decay": 1.0}, "`ema_decay` must be .*< 1"),
        ({"group": "layer"}, "`group` .*mode='global_norm'"),
        ({"clip_factor": 0.1}, "`clip_factor` .*mode='global_norm'"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        GradientClip(keras.optimizers.SGD(), mode="global_norm", **kwargs)
    assert "Fix:" in str(error.value)
