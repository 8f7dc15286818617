"""Membership inference attacks, one class per attack, in one registry.

- `base`: `MembershipAttack` (the contract of an attack) and `AttackContext` (what it may use);
- `threshold`: `loss`, `confidence`, `entropy`, `modified_entropy`;
- `learned`: `learned`, a classifier on all features, scored out of fold;
- `lira`: `lira_online`, `lira_offline` (family `lira`), with shadow models;
- `registry`: the registry, `register_attack` for new attacks.
"""

from keras_safe.audit.attacks.base import AttackContext, MembershipAttack
from keras_safe.audit.attacks.learned import learned_scores
from keras_safe.audit.attacks.lira import lira_scores, train_shadow_models
from keras_safe.audit.attacks.registry import (
    attack_families,
    attack_names,
    get_attack,
    register_attack,
    resolve_attacks,
    unregister_attack,
)

__all__ = [
    "AttackContext",
    "MembershipAttack",
    "attack_families",
    "attack_names",
    "get_attack",
    "learned_scores",
    "lira_scores",
    "register_attack",
    "resolve_attacks",
    "train_shadow_models",
    "unregister_attack",
]
