"""keras_safe.security: evasion attacks, robustness evaluation and adversarial training.

- Attacks (`fgsm`, `pgd`, `apgd`, `square`, `random_noise`, and their classes in `ATTACKS`):
  batched, compiled once per model, on logits or probabilities, untargeted or targeted, inside
  an input range; numpy, tensor or `tf.data` inputs.
- `evaluate_robustness`: accuracy under each attack over a range of epsilons, with the signs of
  gradient masking checked (`RobustnessReport`); `accuracy_under_attack` for one attack.
- `make_robust`: PGD adversarial training or TRADES as stages of keras_safe's train step,
  composing with `keras_safe.privacy.make_private` (`AdversarialExamples`, `TRADES`).

Output defences for serving are in `keras_safe.layers`; `keras_safe.callbacks.RobustnessAudit`
measures robustness during `fit`.
"""

from keras_safe.security.adversarial_training import TRADES, AdversarialExamples, make_robust
from keras_safe.security.attacks import (
    APGD,
    ATTACKS,
    FGSM,
    PGD,
    Attack,
    RandomNoise,
    Square,
    apgd,
    fgsm,
    get_attack,
    pgd,
    random_noise,
    register_attack,
    square,
)
from keras_safe.security.evaluate import accuracy_under_attack, evaluate_robustness
from keras_safe.security.report import RobustnessReport

__all__ = [
    "APGD",
    "AdversarialExamples",
    "ATTACKS",
    "FGSM",
    "PGD",
    "Attack",
    "RandomNoise",
    "RobustnessReport",
    "Square",
    "TRADES",
    "accuracy_under_attack",
    "apgd",
    "evaluate_robustness",
    "fgsm",
    "get_attack",
    "make_robust",
    "pgd",
    "random_noise",
    "register_attack",
    "square",
]
