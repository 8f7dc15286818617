"""Adaptive gradient clipping (AGC, Brock et al. 2021) against a numpy reference."""

import keras
import numpy as np
import pytest

from keras_safe.optimizers import GradientClip
from keras_safe.optimizers.clipping import AGCClip, unitwise_norm
from tests.optimizers.clipping.reference import ReferenceRule, assert_matches_reference


def numpy_unit_norms(a):
    """One norm per output unit (last axis); one norm for scalars and vectors."""
    a = np.asarray(a, np.float64)
    if a.ndim <= 1:
        return np.full_like(a, np.sqrt(np.sum(a**2)))
    return np.sqrt(np.sum(a**2, axis=tuple(range(a.ndim - 1)), keepdims=True))


class AGCReference(ReferenceRule):
    """G_i <- lambda max(|W_i|, eps) G_i / |G_i| where |G_i| > lambda max(|W_i|, eps)."""

    def __init__(self, clip_factor, epsilon):
        super().__init__()
        self.clip_factor, self.epsilon = clip_factor, epsilon

    def rule(self, grads, weights):
        out, any_clipped = [], False
        for g, w in zip(grads, weights, strict=True):
            max_norm = self.clip_factor * np.maximum(numpy_unit_norms(w), self.epsilon)
            g_norm = numpy_unit_norms(g)
            trigger = g_norm > max_norm
            any_clipped |= bool(trigger.any())
            out.append(np.where(trigger, g * max_norm / np.maximum(g_norm, 1e-30), g))
        return out, any_clipped


def test_matches_numpy_reference():
    optimizer = assert_matches_reference(
        "agc", {"clip_factor": 15.0, "epsilon": 1e-3}, lambda: AGCReference(15.0, 1e-3)
    )
    assert isinstance(optimizer.rule, AGCClip)


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4), (3, 3, 2, 5)])
def test_unitwise_norm_matches_numpy(shape):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    want = numpy_unit_norms(x)
    got = np.asarray(unitwise_norm(x))
    assert got.shape == (() if len(shape) <= 1 else want.shape)
    np.testing.assert_allclose(np.broadcast_to(got, want.shape), want, rtol=1e-6)


def test_each_unit_is_clipped_against_its_own_weights():
    # Kernel units (columns): weight norms 5 and 1; gradient norms 10 and 0.01. Bias is zero,
    # so its limit is clip_factor * epsilon.
    kernel = keras.Variable(np.array([[3.0, 0.0], [4.0, 1.0]], "float32"))
    bias = keras.Variable(np.zeros(2, "float32"))
    grads = [np.array([[6.0, 0.01], [8.0, 0.0]], "float32"), np.array([3.0, 4.0], "float32")]
    optimizer = GradientClip(keras.optimizers.SGD(1.0), mode="agc", clip_factor=0.1, epsilon=1e-2)
    optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], [kernel, bias])
    # Column 0: limit 0.1 * 5 = 0.5 < 10, scaled to norm 0.5; column 1: 0.01 <= 0.1, kept.
    np.testing.assert_allclose(np.array(kernel), [[3.0 - 0.3, -0.01], [4.0 - 0.4, 1.0]], rtol=1e-6)
    # Bias: norm 5 > 0.1 * max(0, 0.01) = 1e-3, scaled to norm 1e-3.
    np.testing.assert_allclose(np.array(bias), [-0.6e-3, -0.8e-3], rtol=1e-5)
    assert float(optimizer.step_logs()["clip_fraction"]) == 1.0


def test_defaults():
    assert GradientClip("sgd", mode="agc").rule.get_config() == {
        "clip_factor": 0.01,
        "epsilon": 1e-3,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"clip_factor": 0.0}, "`clip_factor` must be .*> 0"),
        ({"clip_factor": "x"}, "`clip_factor`"),
        ({"epsilon": -1.0}, "`epsilon` must be .*> 0"),
        ({"clip_norm": 1.0}, "`clip_norm` must be left unset with mode='agc'"),
        ({"group": "layer"}, "`group` .*mode='agc'"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        GradientClip(keras.optimizers.SGD(), mode="agc", **kwargs)
    assert "Fix:" in str(error.value)
