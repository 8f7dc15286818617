"""Evasion attacks: small classes in a registry (`ATTACKS`), and one-call functions.

| name     | class         | uses gradients | reference                        |
|----------|---------------|----------------|----------------------------------|
| `fgsm`   | `FGSM`        | yes            | Goodfellow et al. 2015           |
| `pgd`    | `PGD`         | yes            | Madry et al. 2018                |
| `apgd`   | `APGD`        | yes            | Croce & Hein 2020                |
| `square` | `Square`      | no             | Andriushchenko et al. 2020       |
| `noise`  | `RandomNoise` | no             | baseline: random signs           |

A new attack subclasses `Attack` (settings, `_static`, `_dynamic`, `_build`) and registers
itself with `@register_attack`.
"""

from keras_safe.security.attacks.auto_pgd import APGD
from keras_safe.security.attacks.base import ATTACKS, Attack, get_attack, register_attack
from keras_safe.security.attacks.functions import apgd, fgsm, pgd, random_noise, square
from keras_safe.security.attacks.gradient import FGSM, PGD, RandomNoise
from keras_safe.security.attacks.square_search import Square

__all__ = [
    "APGD",
    "ATTACKS",
    "FGSM",
    "PGD",
    "Attack",
    "RandomNoise",
    "Square",
    "apgd",
    "fgsm",
    "get_attack",
    "pgd",
    "random_noise",
    "register_attack",
    "square",
]
