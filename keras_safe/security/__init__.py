"""keras_safe.security: evasion attacks, robustness evaluation and adversarial training."""

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
