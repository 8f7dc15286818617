"""The registry of membership inference attacks: names to attack classes, in a fixed order.

The built-in attacks are `DEFAULT_ATTACKS`, an explicit ordered tuple; users add theirs with
`register_membership_attack` (keras_safe's one registry shape, `keras_safe._registry`:
`unregister_membership_attack`, `get_membership_attack`, `membership_attack_names`, and a name
taken is refused unless `replace=True`). `membership_inference(..., attacks=...)` and the
`MembershipInferenceAudit` callback look attacks up here by name or family, so a registered
attack works in both.
"""

from keras_safe._registry import Registry
from keras_safe._validation import fail
from keras_safe.audit.attacks.base import MembershipAttack
from keras_safe.audit.attacks.learned import LearnedAttack
from keras_safe.audit.attacks.lira import LiraOfflineAttack, LiraOnlineAttack
from keras_safe.audit.attacks.threshold import (
    ConfidenceAttack,
    EntropyAttack,
    LossAttack,
    ModifiedEntropyAttack,
)

__all__ = [
    "DEFAULT_ATTACKS",
    "get_membership_attack",
    "membership_attack_families",
    "membership_attack_names",
    "register_membership_attack",
    "resolve_attacks",
    "unregister_membership_attack",
]

#: The built-in attacks, in the order they are listed and reported.
DEFAULT_ATTACKS = (
    LossAttack,
    ConfidenceAttack,
    EntropyAttack,
    ModifiedEntropyAttack,
    LearnedAttack,
    LiraOnlineAttack,
    LiraOfflineAttack,
)

_ATTACKS = Registry(
    "membership attack",
    DEFAULT_ATTACKS,
    name_of=lambda attack_class: attack_class.name,
    register_call="keras_safe.audit.register_membership_attack",
)


def membership_attack_names():
    """Names of the attacks: the built-in ones in order, then the registered ones.

    Example:
        >>> membership_attack_names()[:3]
        ('loss', 'confidence', 'entropy')
    """
    return _ATTACKS.names()


def membership_attack_families():
    """Family name -> names of its attacks (`attacks=("lira",)` runs a family).

    Example:
        >>> membership_attack_families()
        {'lira': ('lira_online', 'lira_offline')}
    """
    families = {}
    for name, attack_class in zip(_ATTACKS.names(), _ATTACKS.entries()):
        if attack_class.family:
            families.setdefault(attack_class.family, []).append(name)
    return {family: tuple(names) for family, names in families.items()}


def _choices():
    return ", ".join(
        repr(n) for n in membership_attack_names() + tuple(membership_attack_families())
    )


def register_membership_attack(attack_class, *, replace=False):
    """Registers a membership inference attack under `attack_class.name`.

    The class subclasses `keras_safe.audit.MembershipAttack` and follows its contract: a
    `name`, optionally a `family`, the flags `needs_classifier` and `trains_models`, and
    `score(context)` returning member and non-member scores (larger = more likely a member).
    Usable as a class decorator.

    Args:
        attack_class: the attack class.
        replace: replace the attack registered under the same name (a built-in one included)
            on purpose; without it a name taken is refused.

    Returns:
        `attack_class`, so that the function works as a decorator.

    Raises:
        ArgumentError: not a `MembershipAttack` subclass with `score`, a name that is not a
            non-empty string, a name taken (without `replace`), or a name or family that
            clashes with an existing family or attack name.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.audit import MembershipAttack, membership_inference
        >>> @register_membership_attack
        ... class MaxProbability(MembershipAttack):
        ...     '''Members get a more confident top prediction, whatever its class.'''
        ...     name = "max_probability"
        ...     needs_classifier = True
        ...
        ...     def score(self, context):
        ...         return (context.member_features["max_probability"],
        ...                 context.non_member_features["max_probability"])
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(40, 4)), rng.integers(0, 2, 40)
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> report = membership_inference(model, (x[:20], y[:20]), (x[20:], y[20:]),
        ...                               attacks=("loss", "max_probability"), slices=False)
        >>> sorted(report.summary())
        ['loss', 'max_probability']
        >>> unregister_membership_attack("max_probability")
    """
    if not (isinstance(attack_class, type) and issubclass(attack_class, MembershipAttack)):
        fail(
            "attack_class",
            attack_class,
            "a subclass of keras_safe.audit.MembershipAttack",
            "subclass MembershipAttack and define `name` and `score(context)`.",
        )
    name = attack_class.name
    if not isinstance(name, str) or not name:
        fail(
            "attack_class.name",
            name,
            "a non-empty string",
            "set the class attribute name = 'my_attack'.",
        )
    if attack_class.score is MembershipAttack.score:
        fail(
            "attack_class",
            attack_class,
            "a class that defines score(context)",
            "return (member_scores, non_member_scores) from score(context).",
        )
    families = membership_attack_families()
    family = attack_class.family
    if name in families or (family and family in _ATTACKS and family != name):
        fail(
            "attack_class.name",
            name if name in families else family,
            "a name that is not also an attack family (or a family that is not an attack)",
            "choose distinct names for attacks and families.",
        )
    return _ATTACKS.register(attack_class, replace=replace)


def unregister_membership_attack(name):
    """Removes the attack registered under `name` (built-in attacks cannot be removed).

    Raises:
        ArgumentError: if no attack was registered under that name.
    """
    _ATTACKS.unregister(name)


def get_membership_attack(name):
    """The attack class registered under `name`.

    Raises:
        ArgumentError: if no attack has that name.

    Example:
        >>> get_membership_attack("loss").__name__
        'LossAttack'
    """
    return _ATTACKS.get(name, "attacks")


def resolve_attacks(attacks, name="attacks"):
    """The attacks named in `attacks` (names or families), as instances, without repeats.

    Args:
        attacks: one name or a sequence of names; a family name stands for all its attacks.
        name: the argument's name, for error messages.

    Returns:
        A list of `MembershipAttack` instances, in the order asked for.

    Raises:
        ArgumentError: an unknown name, or no attack at all.

    Example:
        >>> [attack.name for attack in resolve_attacks(("loss", "lira", "loss"))]
        ['loss', 'lira_online', 'lira_offline']
    """
    if isinstance(attacks, str):
        attacks = (attacks,)
    if not isinstance(attacks, (list, tuple)):
        fail(name, attacks, "an attack name or a list of them", "pass e.g. attacks=('loss',).")
    families = membership_attack_families()
    chosen = []
    for attack in attacks:
        if isinstance(attack, str) and attack in families:
            names = families[attack]
        elif isinstance(attack, str) and attack in _ATTACKS:
            names = (attack,)
        else:
            fail(
                name,
                attack,
                f"registered attack names, one of {_choices()}",
                "check the spelling, or register the attack with "
                "keras_safe.audit.register_membership_attack.",
            )
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        fail(name, attacks, "at least one attack name", "pass e.g. attacks=('loss',).")
    return [_ATTACKS.get(n)() for n in chosen]
