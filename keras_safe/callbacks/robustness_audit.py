"""A callback that measures accuracy under an evasion attack during training."""

import math

import keras

from keras_safe._validation import check_number, fail
from keras_safe.security.attacks.base import Attack
from keras_safe.security.attacks.registry import evasion_attack_names, make_attack
from keras_safe.security.evaluate import accuracy_under_attack

__all__ = ["RobustnessAudit"]

_KEYS = ("clean_accuracy", "adversarial_accuracy")


@keras.saving.register_keras_serializable(package="keras_safe")
class RobustnessAudit(keras.callbacks.Callback):
    """Attacks a held-out set every few epochs and writes the accuracies into `logs`.

    At the end of every `every`-th epoch it attacks `(x, y)` with `attack` at `epsilon` and
    writes into the epoch `logs`:

    - `clean_accuracy`: accuracy on `x`;
    - `adversarial_accuracy`: fraction of examples classified correctly both clean and under
      the attack (see `keras_safe.security.accuracy_under_attack`).

    On the other epochs both keys hold NaN, so every epoch has the same keys. `History`,
    CSVLogger and TensorBoard see them when they come after this callback in the `callbacks`
    list (Keras adds its own progress bar and `History` last). Each audit is also kept in
    `self.history` as `(epoch, clean_accuracy, adversarial_accuracy)`.

    The attack's graph is compiled once and reused at every audit (it reads the current
    weights). Keep the audit set small (a few hundred examples): PGD costs `steps` gradient
    passes over it.

    Serialization: `get_config` holds the settings, never the data; a callback rebuilt with
    `from_config` needs `set_data(x, y)` before `fit`.

    Args:
        x: audit inputs (numpy or tensor).
        y: their true labels (integers or one-hot rows).
        epsilon: the attack budget.
        attack: a registered attack name (`"pgd"`, `"fgsm"`, `"apgd"`, `"square"`, `"noise"`).
        every: audit every this many epochs (>= 1).
        norm: `"linf"` or `"l2"`.
        clip_min: lower end of the valid input range, or None.
        clip_max: upper end of the valid input range, or None.
        attack_settings: other settings of the attack, e.g. `{"steps": 10}`.
        batch_size: examples per attack call.
        verbose: 1 prints a line per audit.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.callbacks import RobustnessAudit
        >>> rng = np.random.default_rng(0)
        >>> x = rng.uniform(size=(64, 4)).astype("float32")
        >>> y = (x[:, 0] > 0.5).astype("int64")
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> audit = RobustnessAudit(x, y, epsilon=0.1, attack_settings={"steps": 5},
        ...                         clip_min=0.0, clip_max=1.0, verbose=0)
        >>> history = model.fit(x, y, epochs=2, callbacks=[audit], verbose=0)
        >>> sorted(k for k in history.history if "accuracy" in k)
        ['adversarial_accuracy', 'clean_accuracy']
    """

    def __init__(
        self,
        x=None,
        y=None,
        epsilon=0.1,
        attack="pgd",
        every=1,
        norm="linf",
        clip_min=None,
        clip_max=None,
        attack_settings=None,
        batch_size=256,
        verbose=1,
    ):
        super().__init__()
        if isinstance(attack, Attack):
            fail(
                "attack",
                attack,
                "a registered attack name",
                f"pass attack={attack.name!r} and its settings as attack_settings.",
            )
        if attack not in evasion_attack_names():
            fail(
                "attack",
                attack,
                f"one of {sorted(evasion_attack_names())}",
                "pick a registered attack name.",
            )
        self.every = check_number("every", every, low=1, integer=True)
        self.attack_name = attack
        self.attack_settings = dict(attack_settings or {})
        self.verbose = int(verbose)
        settings = {**self.attack_settings, "norm": norm, "batch_size": batch_size}
        settings.update(clip_min=clip_min, clip_max=clip_max)
        self.attack = make_attack(attack, epsilon=epsilon, **settings)
        self.history = []
        self.x = self.y = None
        if x is not None or y is not None:
            self.set_data(x, y)

    def set_data(self, x, y):
        """Sets the audit data (needed after `from_config`, which carries none)."""
        if x is None or y is None:
            fail("x", x, "given together with y", "pass the audit inputs and their labels.")
        self.x, self.y = x, y

    def on_train_begin(self, logs=None):
        if self.x is None:
            raise ValueError(
                "RobustnessAudit has no audit data (a callback rebuilt from its config carries "
                "none). Fix: call callback.set_data(x, y) before fit."
            )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if (epoch + 1) % self.every != 0:
            for key in _KEYS:
                logs[key] = math.nan
            return
        result = accuracy_under_attack(
            self.model, self.x, self.y, self.attack, batch_size=self.attack.batch_size
        )
        logs.update(result)
        self.history.append((epoch, result["clean_accuracy"], result["adversarial_accuracy"]))
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: clean accuracy {result['clean_accuracy']:.4f}, "
                f"under {self.attack_name} (eps={self.attack.epsilon:g}) "
                f"{result['adversarial_accuracy']:.4f}"
            )

    def get_config(self):
        """The settings (the audit data is not part of the config)."""
        return {
            "epsilon": self.attack.epsilon,
            "attack": self.attack_name,
            "every": self.every,
            "norm": self.attack.norm,
            "clip_min": self.attack.get_config()["clip_min"],
            "clip_max": self.attack.get_config()["clip_max"],
            "attack_settings": self.attack_settings,
            "batch_size": self.attack.batch_size,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        """A callback without audit data; call `set_data(x, y)` before `fit`."""
        return cls(**config)
