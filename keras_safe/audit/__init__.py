"""keras_safe.audit: membership inference audits, their metrics and reports, and canary audits.

- `membership_inference(model, members, non_members, attacks=...)` -> `AuditReport`: loss,
  confidence, entropy, learned and LiRA attacks with ROC AUC, advantage, TPR at low FPR and
  empirical epsilon lower bounds, per attack and per slice. The loss is the training path's
  per-example loss (sample weights, masks and loss weights included).
- Attacks are classes in a registry: `attack_names()` lists them, `register_attack` adds one
  (a subclass of `MembershipAttack`), and it works in `membership_inference` and in the
  `MembershipInferenceAudit` callback.
- `canary_audit(model_factory, x, y, num_canaries=...)` -> `CanaryAuditResult`: an empirical
  epsilon lower bound of a (DP) training recipe to hold against the accountant's epsilon.
- `attack_metrics`, `epsilon_lower_bound`, `clopper_pearson`, `guessing_epsilon_lower_bound`:
  the metrics on their own, for scores computed elsewhere.
"""

from keras_safe.audit.attacks import (
    AttackContext,
    MembershipAttack,
    attack_families,
    attack_names,
    learned_scores,
    lira_scores,
    register_attack,
    train_shadow_models,
    unregister_attack,
)
from keras_safe.audit.canary import CanaryAuditResult, accountant_epsilon, canary_audit
from keras_safe.audit.features import compute_features, example_losses
from keras_safe.audit.membership import membership_inference
from keras_safe.audit.metrics import (
    attack_metrics,
    clopper_pearson,
    epsilon_lower_bound,
    guessing_epsilon_lower_bound,
    roc_points,
    tpr_at_fpr,
)
from keras_safe.audit.report import SUMMARY_METRICS, AuditReport

__all__ = [
    "SUMMARY_METRICS",
    "AttackContext",
    "AuditReport",
    "CanaryAuditResult",
    "MembershipAttack",
    "accountant_epsilon",
    "attack_families",
    "attack_metrics",
    "attack_names",
    "canary_audit",
    "clopper_pearson",
    "compute_features",
    "epsilon_lower_bound",
    "example_losses",
    "guessing_epsilon_lower_bound",
    "learned_scores",
    "lira_scores",
    "membership_inference",
    "register_attack",
    "roc_points",
    "tpr_at_fpr",
    "train_shadow_models",
    "unregister_attack",
]
