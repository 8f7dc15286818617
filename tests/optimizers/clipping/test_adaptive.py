"""Adaptive (quantile-tracking) clipping of Andrew et al. (2021) against a numpy reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_safe.optimizers import GradientClip
from keras_safe.optimizers.clipping import AdaptiveClip
from tests.optimizers.clipping.reference import (
    BATCH,
    LR,
    ReferenceRule,
    assert_matches_reference,
    data,
    initial_weights,
    model,
    norm,
)


class AdaptiveReference(ReferenceRule):
    """Clip at c, then c <- c * exp(-eta * (b - q)), b = 1 if the norm was at most c."""

    def __init__(self, clip_norm, target_quantile, learning_rate):
        super().__init__()
        self.threshold = clip_norm
        self.q, self.eta = target_quantile, learning_rate

    def rule(self, grads, weights):
        total = math.sqrt(sum(norm(g) ** 2 for g in grads))
        c = self.threshold
        below = 1.0 if total <= c else 0.0
        self.threshold = c * math.exp(-self.eta * (below - self.q))
        factor = 1.0 if total <= c else c / total
        return [g * factor for g in grads], total > c


def test_matches_numpy_reference():
    kwargs = {"clip_norm": 12.0, "target_quantile": 0.5, "quantile_learning_rate": 0.4}
    optimizer = assert_matches_reference(
        "adaptive", kwargs, lambda: AdaptiveReference(12.0, 0.5, 0.4)
    )
    assert isinstance(optimizer.rule, AdaptiveClip)


def test_threshold_settles_near_the_target_quantile():
    # Norms drawn from a known distribution: the threshold should end near its q-quantile.
    rng = np.random.default_rng(0)
    norms = rng.lognormal(mean=0.0, sigma=0.5, size=1500).astype("float32")
    optimizer = GradientClip(
        keras.optimizers.SGD(0.0),
        mode="adaptive",
        clip_norm=10.0,
        target_quantile=0.8,
        quantile_learning_rate=0.05,
    )
    variable = keras.Variable(np.zeros(1, "float32"))
    optimizer.build([variable])

    @tf.function
    def step(n):
        optimizer.apply([tf.reshape(n, [1])], [variable])
        return optimizer.step_logs()["clip_norm"]

    thresholds = [float(step(tf.constant(n))) for n in norms]
    late = np.mean(thresholds[-500:])
    truth = math.exp(0.5 * 0.8416212335729143)  # lognormal(0, 0.5) at its 0.8 quantile
    assert abs(late - truth) / truth < 0.1, (late, truth)


def test_threshold_ignores_non_finite_steps():
    x, y = data(batches=1)
    optimizer = GradientClip(keras.optimizers.SGD(LR), mode="adaptive", clip_norm=2.0)
    net = model(optimizer, initial_weights())
    x[0, 0] = np.inf
    net.train_on_batch(x, y)
    assert float(optimizer.step_logs()["clip_norm"]) == pytest.approx(2.0)
    assert int(optimizer.step_logs()["skipped_steps"]) == 1


def test_loads_the_variables_of_a_file_from_keras_safe_0_1_0():
    # 0.1.0 saved the wrapper's variables in the same order as now, but with an unused
    # moving average right after the threshold; the inner optimizer's variables follow.
    x, y = data(batches=3)
    trained = GradientClip(keras.optimizers.Adam(0.01), mode="adaptive", clip_norm=3.0)
    model(trained, initial_weights()).fit(x, y, batch_size=BATCH, verbose=0)
    values = [np.array(v) for v in trained.variables]
    names = [v.path.rsplit("/", 1)[1] for v in trained.variables]
    after = names.index("clip_threshold") + 1
    assert names[after] == "variable_grad_norm"
    legacy = values[:after] + [np.float32(123.0)] + values[after:]
    fresh = GradientClip(keras.optimizers.Adam(0.01), mode="adaptive", clip_norm=3.0)
    fresh.build(model(fresh, initial_weights()).trainable_variables)
    fresh.load_own_variables({str(i): v for i, v in enumerate(legacy)})
    restored = [np.array(v) for v in fresh.variables]
    assert len(restored) == len(values)
    for want, got in zip(values, restored, strict=True):
        np.testing.assert_array_equal(want, got)
    assert float(fresh.step_logs()["clip_norm"]) == float(trained.step_logs()["clip_norm"])


def test_defaults():
    assert GradientClip("sgd", mode="adaptive").rule.get_config() == {
        "clip_norm": 1.0,
        "target_quantile": 0.5,
        "quantile_learning_rate": 0.2,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_quantile": 1.5}, "`target_quantile` must be .*< 1"),
        ({"target_quantile": 0.0}, "`target_quantile` must be .*> 0"),
        ({"quantile_learning_rate": 0.0}, "`quantile_learning_rate` must be .*> 0"),
        ({"clip_norm": "auto"}, "`clip_norm`"),
        ({"clip_norm": -2.0}, "`clip_norm` must be .*> 0"),
        ({"auto_factor": 2.0}, "`auto_factor` .*mode='adaptive'"),
        ({"group": "layer"}, "`group` .*mode='adaptive'"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match) as error:
        GradientClip(keras.optimizers.SGD(), mode="adaptive", **kwargs)
    assert "Fix:" in str(error.value)
