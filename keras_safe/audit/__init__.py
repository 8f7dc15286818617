"""keras_safe.audit: membership inference audits, their metrics and reports, and canary audits.

- `membership_inference(model, members, non_members, attacks=...)` -> `AuditReport`: loss,
  confidence, entropy, learned and LiRA attacks with ROC AUC, advantage, TPR at low FPR and
  empirical epsilon lower bounds, per attack and per slice. The loss is the training path's
  per-example loss (sample weights, masks and loss weights included).
- Attacks are classes in a registry: `membership_attack_names()` lists them (and
  `membership_attack_families()` their families), `register_membership_attack` adds one (a
  subclass of `MembershipAttack`, which receives an `AttackContext`), `get_membership_attack`
  and `unregister_membership_attack` complete it; a registered attack works in
  `membership_inference` and in the `MembershipInferenceAudit` callback.
- `canary_audit(model_factory, x, y, num_canaries=...)` -> `CanaryAuditResult`: an empirical
  epsilon lower bound of a (DP) training recipe to hold against the accountant's epsilon.
- `attack_metrics`, `epsilon_lower_bound`, `clopper_pearson`, `guessing_epsilon_lower_bound`:
  the metrics on their own, for scores computed elsewhere.
"""

from keras_safe.audit.attacks.base import AttackContext, MembershipAttack
from keras_safe.audit.attacks.registry import (
    get_membership_attack,
    membership_attack_families,
    membership_attack_names,
    register_membership_attack,
    unregister_membership_attack,
)
from keras_safe.audit.canary import CanaryAuditResult, canary_audit
from keras_safe.audit.membership import membership_inference
from keras_safe.audit.metrics import (
    attack_metrics,
    clopper_pearson,
    epsilon_lower_bound,
    guessing_epsilon_lower_bound,
)
from keras_safe.audit.report import AuditReport

__all__ = [
    "AttackContext",
    "AuditReport",
    "CanaryAuditResult",
    "MembershipAttack",
    "attack_metrics",
    "canary_audit",
    "clopper_pearson",
    "epsilon_lower_bound",
    "get_membership_attack",
    "guessing_epsilon_lower_bound",
    "membership_attack_families",
    "membership_attack_names",
    "membership_inference",
    "register_membership_attack",
    "unregister_membership_attack",
]
