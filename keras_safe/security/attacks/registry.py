"""The registry of evasion attacks: names to `Attack` classes, the built-in ones in a fixed order.

keras_safe's one registry shape (`keras_safe._registry`): `DEFAULT_EVASION_ATTACKS`, then
`register_evasion_attack` / `unregister_evasion_attack` / `get_evasion_attack` /
`evasion_attack_names`; a name taken is refused unless `replace=True` is given. An attack is
registered under its class attribute `name`, and every registered attack works wherever an
attack name is accepted: `evaluate_robustness`, `RobustnessAudit`, `make_robust`.
"""

from keras_safe._registry import Registry
from keras_safe._validation import fail
from keras_safe.security.attacks.auto_pgd import APGD
from keras_safe.security.attacks.base import Attack
from keras_safe.security.attacks.gradient import FGSM, PGD, RandomNoise
from keras_safe.security.attacks.square_search import Square

__all__ = [
    "DEFAULT_EVASION_ATTACKS",
    "evasion_attack_names",
    "get_evasion_attack",
    "make_attack",
    "register_evasion_attack",
    "unregister_evasion_attack",
]

DEFAULT_EVASION_ATTACKS = (FGSM, PGD, APGD, Square, RandomNoise)
"""The built-in evasion attacks, in order."""

_ATTACKS = Registry(
    "evasion attack",
    DEFAULT_EVASION_ATTACKS,
    name_of=lambda attack_class: attack_class.name,
    register_call="keras_safe.security.register_evasion_attack",
)


def register_evasion_attack(attack_class, *, replace=False):
    """Registers an `Attack` subclass under its `name`; usable as a class decorator.

    The class follows `keras_safe.security.Attack`'s contract: its settings are attributes,
    `_static()` the hashable settings that shape its graph, `_dynamic()` the numbers fed to it,
    and `_build(static)` the per-batch search (see `Attack`).

    Args:
        attack_class: the `Attack` subclass.
        replace: replace the attack registered under the same name (a built-in one included)
            on purpose; without it a name taken is refused.

    Returns:
        `attack_class`.

    Raises:
        keras_safe._validation.ArgumentError: not an `Attack` subclass with a name, or a name
            taken (without `replace`).

    Example:
        >>> from keras_safe.security import PGD
        >>> @register_evasion_attack
        ... class PGD50(PGD):
        ...     '''PGD with 50 steps by default.'''
        ...     name = "pgd50"
        ...     def __init__(self, epsilon, steps=50, **kwargs):
        ...         super().__init__(epsilon, steps=steps, **kwargs)
        >>> get_evasion_attack("pgd50")(0.1).steps
        50
        >>> unregister_evasion_attack("pgd50")
    """
    if not (isinstance(attack_class, type) and issubclass(attack_class, Attack)):
        fail(
            "attack_class",
            attack_class,
            "a subclass of keras_safe.security.Attack",
            "subclass Attack and set its class attribute name.",
        )
    if not isinstance(attack_class.name, str) or not attack_class.name:
        fail(
            "attack_class.name",
            attack_class.name,
            "a non-empty string",
            "set the class attribute name = 'my_attack'.",
        )
    return _ATTACKS.register(attack_class, replace=replace)


def unregister_evasion_attack(name):
    """Removes the attack registered under `name` (built-in attacks cannot be removed).

    Raises:
        keras_safe._validation.ArgumentError: no attack was registered under `name`.
    """
    _ATTACKS.unregister(name)


def get_evasion_attack(name):
    """The `Attack` class registered under `name`.

    Raises:
        keras_safe._validation.ArgumentError: an unknown name.

    Example:
        >>> get_evasion_attack("pgd")(0.1, steps=10).get_config()["steps"]
        10
    """
    return _ATTACKS.get(name, "attack")


def evasion_attack_names():
    """The names of the attacks: the built-in ones in order, then the registered ones.

    Example:
        >>> evasion_attack_names()
        ('fgsm', 'pgd', 'apgd', 'square', 'noise')
    """
    return _ATTACKS.names()


def make_attack(attack, **settings):
    """An attack object: `attack` itself when it is an `Attack`, else the class registered
    under the name `attack` built with `settings`."""
    if isinstance(attack, Attack):
        return attack
    return get_evasion_attack(attack)(**settings)
