"""RobustnessAudit writes clean and adversarial accuracy, recomputed here by hand."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_safe
from keras_safe._validation import ArgumentError
from keras_safe.callbacks import RobustnessAudit
from keras_safe.optimizers import DPSGD
from keras_safe.security import make_robust
from tests.security.conftest import digits, make_mlp
from tests.testing import assert_config_round_trip


def _fgsm_by_hand(model, x, y, epsilon):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
    return np.clip(x.numpy() + epsilon * np.sign(tape.gradient(loss, x).numpy()), 0.0, 1.0)


class _Capture(keras.callbacks.Callback):
    """Keeps a copy of the logs and of the model's predictions at each epoch end."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.rows = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        pred = self.model.predict(self.x, verbose=0).argmax(1)
        x_adv = _fgsm_by_hand(self.model, self.x, self.y, 0.1)
        adv = self.model.predict(x_adv, verbose=0).argmax(1)
        self.rows.append(
            (dict(logs), (pred == self.y).mean(), ((pred == self.y) & (adv == self.y)).mean())
        )


def test_logs_match_an_independent_computation():
    x, y = digits()
    keras.utils.set_random_seed(0)
    model = make_mlp()
    audit = RobustnessAudit(
        x[1200:1400],
        y[1200:1400],
        epsilon=0.1,
        attack="fgsm",
        every=2,
        clip_min=0.0,
        clip_max=1.0,
        verbose=0,
    )
    capture = _Capture(x[1200:1400], y[1200:1400])
    history = model.fit(
        x[:600], y[:600], epochs=4, batch_size=64, callbacks=[audit, capture], verbose=0
    )
    for epoch, (logs, clean, adversarial) in enumerate(capture.rows):
        if epoch % 2 == 0:
            assert math.isnan(logs["clean_accuracy"]) and math.isnan(logs["adversarial_accuracy"])
        else:
            assert logs["clean_accuracy"] == pytest.approx(clean, abs=1e-9)
            assert logs["adversarial_accuracy"] == pytest.approx(adversarial, abs=1e-9)
            assert logs["adversarial_accuracy"] < logs["clean_accuracy"]
    assert len(history.history["adversarial_accuracy"]) == 4
    assert [row[0] for row in audit.history] == [1, 3]


def test_pgd_audit_and_saved_settings():
    x, y = digits()
    keras.utils.set_random_seed(0)
    model = make_mlp()
    audit = RobustnessAudit(x[:100], y[:100], epsilon=0.1, attack_settings={"steps": 5}, verbose=0)
    model.fit(x[:300], y[:300], epochs=1, batch_size=64, callbacks=[audit], verbose=0)
    ((_, clean, adversarial),) = audit.history
    assert 0 <= adversarial < clean
    clone = assert_config_round_trip(audit)
    assert clone.x is None
    with pytest.raises(ValueError, match="set_data"):
        model.fit(x[:64], y[:64], epochs=1, callbacks=[clone], verbose=0)
    clone.set_data(x[:100], y[:100])
    model.fit(x[:64], y[:64], epochs=1, callbacks=[clone], verbose=0)
    assert len(clone.history) == 1


@pytest.mark.parametrize(
    "settings, argument",
    [
        ({"attack": "boundary"}, "attack"),
        ({"every": 0}, "every"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"norm": "l1"}, "norm"),
    ],
)
def test_bad_settings_name_the_argument(settings, argument):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        RobustnessAudit(**settings)


def test_audits_a_private_robustly_trained_model():
    x, y = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        DPSGD(0.5, l2_norm_clip=1.0, noise_multiplier=0.5, seed=0),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras_safe.privacy.make_private(model)
    make_robust(model, 0.1, steps=3, clip_min=0.0, clip_max=1.0)
    audit = RobustnessAudit(
        x[1200:1300],
        y[1200:1300],
        epsilon=0.1,
        attack_settings={"steps": 5},
        clip_min=0.0,
        clip_max=1.0,
        verbose=0,
    )
    history = model.fit(x[:512], y[:512], epochs=4, batch_size=64, callbacks=[audit], verbose=0)
    clean, adversarial = history.history["clean_accuracy"], history.history["adversarial_accuracy"]
    assert all(0.0 <= a <= c <= 1.0 for a, c in zip(adversarial, clean))
    assert clean[-1] > 0.2  # learning (chance is 0.1) under noise and attacks
