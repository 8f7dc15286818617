"""Stages of the one train step: what other features plug into it.

keras_safe's train step owns the gradient path of `fit`. Features that change what a step trains
on plug in as stages, so they compose instead of each overriding `train_step`:

- a *data stage* turns the batch into the batch the step trains on (adversarial examples, for
  example). It runs before the gradient pass and its result is treated as data: no gradient
  flows through it to the weights.
- a *loss stage* computes the per-example losses (shape `[B]`, one value per example that
  depends on that example alone) from the model and the batch (TRADES, for example, compares
  the model's outputs on the clean and the adversarial input). What it needs from the batch
  before the gradient pass (TRADES' adversarial inputs) it computes in `prepare`; the step
  passes the result to `losses` (a stage keeps no state from one call to the next).

Under DP-SGD, the per-example losses of the loss stage are what is clipped per example, so every
stage must keep examples independent: example i's adversarial input and loss may depend on
example i and the weights only.

A stage is a serializable object (`get_config` / `from_config`, registered with
`keras.saving.register_keras_serializable`) so that it is saved with the model.
"""

import keras

from keras_safe._validation import fail
from keras_safe.training.state import safe_state

__all__ = ["TrainingStage", "get_stages", "set_stages"]


class TrainingStage:
    """Base class of a train-step stage; subclasses override `transform` and/or `losses`.

    `transform(model, x, y, sample_weight)` returns the `(x, y, sample_weight)` to train on (the
    default returns them unchanged); the step stops gradients through the returned `x`.

    `prepare(model, x, y, sample_weight)` (loss stages only) runs after the data stages and
    before the gradient pass, outside the per-example rules; its result (treated as data: no
    gradient flows through it) is passed to `losses` as `prepared`. The default returns None.

    `losses(model, x, y, sample_weight, per_example_loss, prepared=None)` returns
    `(losses, y_pred)`: the per-example losses `[B]` and the predictions used for metrics.
    `per_example_loss(y, y_pred, sample_weight)` is the compiled loss split per example. The
    default is the model's forward pass followed by `per_example_loss`. At most one stage of a
    model may override `losses`.
    """

    #: Whether this stage overrides `losses` (the step allows at most one such stage).
    overrides_losses = False

    def transform(self, model, x, y, sample_weight):
        return x, y, sample_weight

    def prepare(self, model, x, y, sample_weight):
        return None

    def losses(self, model, x, y, sample_weight, per_example_loss, prepared=None):
        y_pred = model(x, training=True)
        return per_example_loss(y, y_pred, sample_weight), y_pred

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def get_stages(model):
    """The stages installed on `model`, in order (an empty list when none)."""
    return list(safe_state(model, create=False).stages)


def set_stages(model, stages):
    """Installs `stages` (a list of `TrainingStage`) on `model`, replacing earlier ones.

    Raises:
        keras_safe._validation.ArgumentError: if more than one stage overrides the losses.
    """
    stages = list(stages)
    if sum(bool(s.overrides_losses) for s in stages) > 1:
        fail(
            "stages",
            [type(s).__name__ for s in stages],
            "a list with at most one stage that computes the losses",
            "install one loss-changing method at a time (for example PGD or TRADES, not both).",
        )
    safe_state(model).stages = tuple(stages)
    if isinstance(model, keras.Model):
        model.train_function = None  # keras-internal: train-function
    return model
