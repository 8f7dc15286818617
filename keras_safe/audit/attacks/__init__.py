"""Membership inference attacks, one class per attack, in one registry (internal; the public
names are exported by `keras_safe.audit`).

- `base`: `MembershipAttack` (the contract of an attack) and `AttackContext` (what it may use);
- `threshold`: `loss`, `confidence`, `entropy`, `modified_entropy`;
- `learned`: `learned`, a classifier on all features, scored out of fold;
- `lira`: `lira_online`, `lira_offline` (family `lira`), with shadow models;
- `registry`: `DEFAULT_ATTACKS` and `register_membership_attack` for new attacks.
"""
