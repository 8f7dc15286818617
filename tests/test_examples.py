"""The scripts in `examples/` run offline with small settings and do what they print."""

import importlib.util
import math
import pathlib

import pytest

import keras_safe
from keras_safe.optimizers import find_dp_optimizer
from tests import dp_reference

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_keras_hub():
    try:
        import keras_hub  # noqa: F401
    except ImportError:
        pytest.fail(
            "keras-hub is not installed; the [test] extra installs it: pip install -e '.[test]'",
            pytrace=False,
        )


@pytest.mark.slow
def test_dp_lora_keras_hub_fine_tunes_within_its_budget(monkeypatch):
    _require_keras_hub()
    noises = []

    class RecordedBudget(keras_safe.callbacks.PrivacyBudget):
        """Records the noise the DP optimizer trained with (the script recompiles after)."""

        def on_train_end(self, logs=None):
            noises.append(find_dp_optimizer(self.model.optimizer).noise_multiplier)
            super().on_train_end(logs)

    monkeypatch.setattr(keras_safe.callbacks, "PrivacyBudget", RecordedBudget)
    example = _load("dp_lora_keras_hub")
    epsilon, records, batch = 4.0, 512, 64
    result = example.main(
        ["--records", str(records), "--epochs", "1", "--epsilon", str(epsilon)]
        + ["--batch-size", str(batch), "--pretrain-epochs", "3"]
    )
    delta = 1 / records**1.1
    assert result["delta"] == pytest.approx(delta)
    # The noise the run used, its steps (one epoch of Poisson batches at rate 64 / 512) and
    # dp-accounting: the true epsilon is within the target, and the reported one is it.
    (noise,) = noises
    expected = dp_reference.epsilon(noise, batch / records, math.ceil(records / batch), delta)
    assert expected <= epsilon
    assert result["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert result["epsilon"] > 0.99 * epsilon  # calibrated to the target, not far below
    # Fine-tuning on the records' own format lowers the held-out loss even under DP.
    assert result["after"][0] < result["before"][0] - 0.05
