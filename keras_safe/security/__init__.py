"""keras_safe.security: evasion attacks, robustness evaluation and adversarial training.

- Attacks: `fgsm`, `pgd`, `apgd`, `square`, `random_noise` (one call), and their classes
  `FGSM`, `PGD`, `APGD`, `Square`, `RandomNoise`: batched, compiled once per model, on logits or
  probabilities, untargeted or targeted, inside an input range; numpy, tensor or `tf.data`
  inputs. A new attack subclasses `Attack` and is registered with `register_evasion_attack`
  (`unregister_evasion_attack`, `get_evasion_attack`, `evasion_attack_names`); a registered
  attack works wherever an attack name does.
- `evaluate_robustness`: accuracy under each attack over a range of epsilons, with the signs of
  gradient masking checked (`RobustnessReport`); `accuracy_under_attack` for one attack.
- `make_robust`: adversarial training with any registered attack, for one of two training
  objectives (`"adversarial"`: Madry et al.'s training on the attack's examples; `"trades"`:
  Zhang et al.'s TRADES), as stages of keras_safe's train step, composing with
  `keras_safe.privacy.make_private`.

Output defences for serving are in `keras_safe.layers`; `keras_safe.callbacks.RobustnessAudit`
measures robustness during `fit`. Here `epsilon` is an attack's perturbation budget (its norm
ball), not a privacy epsilon.
"""

from keras_safe.security.adversarial_training import make_robust
from keras_safe.security.attacks.auto_pgd import APGD
from keras_safe.security.attacks.base import Attack
from keras_safe.security.attacks.functions import apgd, fgsm, pgd, random_noise, square
from keras_safe.security.attacks.gradient import FGSM, PGD, RandomNoise
from keras_safe.security.attacks.registry import (
    evasion_attack_names,
    get_evasion_attack,
    register_evasion_attack,
    unregister_evasion_attack,
)
from keras_safe.security.attacks.square_search import Square
from keras_safe.security.evaluate import accuracy_under_attack, evaluate_robustness
from keras_safe.security.report import RobustnessReport

__all__ = [
    "APGD",
    "FGSM",
    "PGD",
    "Attack",
    "RandomNoise",
    "RobustnessReport",
    "Square",
    "accuracy_under_attack",
    "apgd",
    "evaluate_robustness",
    "evasion_attack_names",
    "fgsm",
    "get_evasion_attack",
    "make_robust",
    "pgd",
    "random_noise",
    "register_evasion_attack",
    "square",
    "unregister_evasion_attack",
]
