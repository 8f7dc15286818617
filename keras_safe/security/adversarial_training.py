"""Adversarial training as stages of keras_safe's train step: any registered attack, one of two
training objectives.

`make_robust(model, epsilon, attack=..., objective=...)` installs one stage
(`keras_safe.training.stages`) on the model. The attack (any registered evasion attack: PGD by
default, FGSM, APGD, Square, a user's) finds the perturbation with its own search
(`Attack.perturb`); the objective says what it raises and what the step trains on:

- `"adversarial"`, `AdversarialExamples` (Madry et al. 2018, "Towards deep learning models
  resistant to adversarial attacks"): a data stage that replaces each batch by the attack's
  adversarial examples of the model's own per-example loss; the step then trains on them as on
  any data. With PGD this is PGD adversarial training.
- `"trades"`, `TRADES` (Zhang et al. 2019, "Theoretically principled trade-off between
  robustness and accuracy"): a loss stage whose per-example loss is
  `CE(f(x), y) + beta * KL(f(x) || f(x'))`, where the attack's `x'` raises that KL divergence
  inside the ball. The search runs before the step's gradient pass (`prepare`), and the step
  hands its result to `losses`: no state is kept between the two.

Both keep examples independent: example i's adversarial input is found from example i and the
weights alone (the model runs in inference mode during the search and the attacks' steps are per
example), so under DP-SGD (`make_private`, either order) each example's gradient is that of its
own adversarial loss, clipped and noised like any other. Both are serializable and saved with the
model (their attack's name and settings included).
"""

import inspect

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import check_choice, check_number, fail
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.security import _common
from keras_safe.security.attacks.base import Attack
from keras_safe.security.attacks.registry import get_evasion_attack, make_attack
from keras_safe.training.private_model import install_train_step
from keras_safe.training.stages import TrainingStage, get_stages, set_stages

__all__ = ["AdversarialExamples", "OBJECTIVES", "TRADES", "make_robust"]

OBJECTIVES = ("adversarial", "trades")
"""The training objectives of `make_robust`."""

# make_robust's `method` of keras_safe 0.2.0: an (attack, objective) pair.
_METHODS = {"pgd": ("pgd", "adversarial"), "trades": ("pgd", "trades")}
# The settings of the stages of keras_safe 0.2.0, saved flat beside the PGD settings.
_LEGACY_PGD = ("steps", "step_size", "norm", "clip_min", "clip_max", "random_start", "from_logits")


def _input(x):
    if not tf.is_tensor(x) and not isinstance(x, np.ndarray):
        fail(
            "x",
            type(x).__name__,
            "one input tensor for adversarial training",
            "give the model a single input.",
        )
    return tf.cast(x, tf.float32)


def _never_fooled(value):
    return value, tf.zeros(tf.shape(value), tf.bool)


class _AdversarialStage(TrainingStage):
    """A stage that runs an evasion attack: its settings, and its saved form."""

    def __init__(self, attack):
        if not isinstance(attack, Attack):
            fail("attack", attack, "an evasion attack object", "e.g. PGD(0.1, steps=10).")
        if attack.targeted:
            fail(
                "targeted",
                True,
                "False for adversarial training (the attack raises the training objective)",
                "leave targeted out.",
            )
        self.attack = attack

    @property
    def epsilon(self):
        """The attack's perturbation budget."""
        return self.attack.epsilon

    def get_config(self):
        return {"attack": {"name": self.attack.name, "config": self.attack.get_config()}}

    @classmethod
    def _attack_from(cls, config):
        """The attack of a saved config, also of keras_safe 0.2.0's flat PGD settings."""
        config = dict(config)
        saved = config.pop("attack", None)
        if saved is not None:
            return make_attack(saved["name"], **saved["config"]), config
        settings = {key: config.pop(key) for key in _LEGACY_PGD if key in config}
        return make_attack("pgd", epsilon=config.pop("epsilon"), **settings), config


@keras.saving.register_keras_serializable(package="keras_safe")
class AdversarialExamples(_AdversarialStage):
    """Data stage of adversarial training (Madry et al. 2018): trains on the attack's examples.

    Replaces the batch's inputs by the attack's adversarial examples of the model's compiled
    per-example loss (the model runs with `training=False` during the search). With PGD: from a
    uniform random point of the ball (`random_start=True`, else from `x`), `steps` steps of
    `step_size` along the sign (linf) or the normalised gradient (l2), each followed by the
    projection onto the epsilon ball and `[clip_min, clip_max]`.

    Args:
        attack: the evasion attack (an `Attack` object, untargeted), e.g.
            `PGD(0.1, steps=10, clip_min=0.0, clip_max=1.0)`.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import PGD
        >>> from keras_safe.security.adversarial_training import AdversarialExamples
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x = np.full((2, 4), 0.5, "float32")
        >>> stage = AdversarialExamples(PGD(0.1, steps=3, clip_min=0.0, clip_max=1.0))
        >>> x_adv, _, _ = stage.transform(model, x, np.array([0, 1]), None)
        >>> bool(np.abs(np.asarray(x_adv) - x).max() <= 0.1 + 1e-6)
        True
    """

    def transform(self, model, x, y, sample_weight):
        if y is None:
            fail("y", None, "the targets of the batch", "adversarial training needs labels.")
        x = _input(x)
        loss = PerExampleLoss(model)

        def objective(x_adv):
            return _never_fooled(loss(y, model(x_adv, training=False)))

        return self.attack.perturb(objective, x), y, sample_weight

    @classmethod
    def from_config(cls, config):
        attack, _ = cls._attack_from(config)
        return cls(attack)


@keras.saving.register_keras_serializable(package="keras_safe")
class TRADES(_AdversarialStage):
    """Loss stage of TRADES (Zhang et al. 2019): accuracy plus smoothness in the ball.

    Per example, `loss_i = L(y_i, f(x_i)) + beta * KL(p(x_i) || p(x'_i))` (times the sample
    weight), where `L` is the compiled loss, `p` the predicted class probabilities and
    `x'_i` is the attack's search for a high KL divergence, started, as in the paper, from
    `x_i + 0.001 * N(0, 1)` (with an attack whose `random_start` is False: from `x_i` plus one
    fixed small offset, the same for every example and step, for reproducible runs). The
    search runs in inference mode with the clean probabilities held fixed, before the step's
    gradient pass (`prepare`); the loss differentiates through both `f(x_i)` and `f(x'_i)`.
    `beta` trades clean accuracy (small) for robustness (large; the paper uses 1 to 6).

    Args:
        attack: the evasion attack (an `Attack` object, untargeted); its `from_logits` says
            whether the model outputs logits (None: from the compiled loss, then from the
            output activation).
        beta: weight of the KL term (>= 0).

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import PGD
        >>> from keras_safe.security.adversarial_training import TRADES
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> stage = TRADES(PGD(0.1, steps=3), beta=6.0)
        >>> x, y = np.full((5, 4), 0.5, "float32"), np.arange(5) % 3
        >>> losses, _ = stage.losses(model, x, y, None, lambda y, p, w: (
        ...     keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True)))
        >>> tuple(losses.shape)
        (5,)
    """

    overrides_losses = True

    def __init__(self, attack, beta=6.0):
        super().__init__(attack)
        self.beta = check_number("beta", beta, low=0.0)

    def prepare(self, model, x, y, sample_weight):
        """The adversarial inputs `x'`, found before the step's gradient pass."""
        x = _input(x)
        kind = _common.stage_output_kind(model, self.attack.from_logits)
        clean = tf.nn.log_softmax(_common.logits(model(x, training=False), kind))

        def objective(x_adv):
            return _never_fooled(_kl(clean, _common.logits(model(x_adv, training=False), kind)))

        if getattr(self.attack, "random_start", True):
            noise = tf.random.normal(tf.shape(x))
        else:
            noise = tf.random.stateless_normal(tf.shape(x[:1]), [0, 0])
        return self.attack.perturb(objective, x, start=x + 0.001 * noise)

    def losses(self, model, x, y, sample_weight, per_example_loss, prepared=None):
        x_adv = prepared if prepared is not None else self.prepare(model, x, y, sample_weight)
        kind = _common.stage_output_kind(model, self.attack.from_logits)
        y_pred = model(x, training=True)
        clean = tf.nn.log_softmax(_common.logits(y_pred, kind))
        adversarial = _common.logits(model(x_adv, training=True), kind)
        kl = _kl(clean, adversarial)
        if sample_weight is not None:
            kl = kl * tf.reshape(tf.cast(sample_weight, kl.dtype), [-1])
        return per_example_loss(y, y_pred, sample_weight) + self.beta * kl, y_pred

    def get_config(self):
        config = super().get_config()
        config["beta"] = self.beta
        return config

    @classmethod
    def from_config(cls, config):
        attack, rest = cls._attack_from(config)
        return cls(attack, beta=rest.get("beta", 6.0))


def _kl(log_p, logits_q):
    """KL(p || q) per example, from p's log-probabilities and q's logits."""
    return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(logits_q)), axis=-1)


def _takes(cls, name):
    """Whether the constructor of attack class `cls` takes the argument `name`."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        if name in parameters:
            return True
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return False
    return False


def _attack_of(attack, epsilon, settings, attack_settings):
    """The attack object `make_robust` trains with."""
    if isinstance(attack, Attack):
        if epsilon is not None or attack_settings:
            fail(
                "epsilon" if epsilon is not None else sorted(attack_settings)[0],
                epsilon if epsilon is not None else attack_settings,
                "left out when attack is an Attack object (its own settings apply)",
                "set them on the attack object, or pass the attack's name.",
            )
        return attack
    if epsilon is None:
        fail("epsilon", None, "the perturbation budget", "pass e.g. epsilon=0.1.")
    cls = get_evasion_attack(attack)
    chosen = {k: v for k, v in settings.items() if _takes(cls, k)}
    return cls(epsilon, **chosen, **attack_settings)


def make_robust(
    model,
    epsilon=None,
    attack="pgd",
    objective="adversarial",
    beta=6.0,
    steps=10,
    step_size=None,
    norm="linf",
    clip_min=None,
    clip_max=None,
    random_start=True,
    from_logits=None,
    method=None,
    **attack_settings,
):
    """Makes `fit` train `model` adversarially, with any registered attack.

    Installs keras_safe's train step (as `make_private` does) and the stage of `objective`,
    replacing an adversarial stage installed before and keeping any other stage. It composes
    with `keras_safe.privacy.make_private` in either order (adversarial examples first, then
    per-example clipped, noised gradients of the adversarial loss) and with `GradientClip`;
    with a plain optimizer the model simply trains robustly. The stage, its attack included, is
    saved with the model.

    Args:
        model: a compiled or not yet compiled `keras.Model` with a single input.
        epsilon: the attack's perturbation budget (None when `attack` is an `Attack` object).
        attack: a registered evasion attack's name (`keras_safe.security.evasion_attack_names()`:
            `"pgd"`, `"fgsm"`, `"apgd"`, ...) or an untargeted `Attack` object (whose settings
            apply as they are).
        objective: `"adversarial"` (Madry et al. 2018: train on the attack's examples of the
            model's loss) or `"trades"` (Zhang et al. 2019).
        beta: TRADES' weight of the robustness term (ignored by `"adversarial"`).
        steps, step_size, random_start: the attack's settings, for an attack that takes them
            (PGD: `steps` steps of `step_size`, None: `2.5 * epsilon / steps`, from a random
            point of the ball; APGD: `steps`).
        norm: `"linf"` or `"l2"`.
        clip_min: lower end of the valid input range, or None.
        clip_max: upper end of the valid input range, or None.
        from_logits: whether the model outputs logits (TRADES; None: from the compiled loss).
        method: the shorthand of keras_safe 0.2.0, `"pgd"` (`attack="pgd"`,
            `objective="adversarial"`) or `"trades"` (`attack="pgd"`, `objective="trades"`).
        **attack_settings: other settings of a named attack (`restarts`, `loss`, `queries`...).

    Returns:
        `model`.

    Raises:
        keras_safe._validation.ArgumentError: an unknown attack, objective or method, settings
            the attack refuses, or a targeted attack.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import make_robust
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> model = make_robust(model, epsilon=0.1, steps=3, clip_min=0.0, clip_max=1.0)
        >>> x = np.random.default_rng(0).uniform(size=(16, 4)).astype("float32")
        >>> _ = model.fit(x, np.arange(16) % 3, epochs=1, verbose=0)
        >>> model = make_robust(model, epsilon=0.1, attack="fgsm", objective="trades")
        >>> _ = model.fit(x, np.arange(16) % 3, epochs=1, verbose=0)
    """
    if method is not None:
        check_choice("method", method, tuple(_METHODS), "use 'pgd' or 'trades'.")
        if attack != "pgd" or objective != "adversarial":
            fail(
                "method",
                method,
                "left out when attack or objective is given",
                "give attack= and objective= alone.",
            )
        attack, objective = _METHODS[method]
    check_choice("objective", objective, OBJECTIVES, "use 'adversarial' or 'trades'.")
    settings = dict(steps=steps, step_size=step_size, norm=norm, clip_min=clip_min)
    settings.update(clip_max=clip_max, random_start=random_start, from_logits=from_logits)
    chosen = _attack_of(attack, epsilon, settings, attack_settings)
    stage = AdversarialExamples(chosen) if objective == "adversarial" else TRADES(chosen, beta)
    install_train_step(model)
    others = [s for s in get_stages(model) if not isinstance(s, _AdversarialStage)]
    set_stages(model, [*others, stage])
    return model
