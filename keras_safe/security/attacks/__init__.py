"""Evasion attacks: small classes in a registry, and one-call functions (internal; the public
names are exported by `keras_safe.security`).

| name     | class         | uses gradients | reference                        |
|----------|---------------|----------------|----------------------------------|
| `fgsm`   | `FGSM`        | yes            | Goodfellow et al. 2015           |
| `pgd`    | `PGD`         | yes            | Madry et al. 2018                |
| `apgd`   | `APGD`        | yes            | Croce & Hein 2020                |
| `square` | `Square`      | no             | Andriushchenko et al. 2020       |
| `noise`  | `RandomNoise` | no             | baseline: random signs           |

- `base`: `Attack`, the contract (settings, `_static`, `_dynamic`, `_build`: a search written
  against an objective, so the same code evaluates robustness and trains adversarially);
- `gradient`, `auto_pgd`, `square_search`: the attacks;
- `functions`: `fgsm`, `pgd`, `apgd`, `square`, `random_noise`;
- `registry`: `DEFAULT_EVASION_ATTACKS` and `register_evasion_attack` for new attacks.
"""
