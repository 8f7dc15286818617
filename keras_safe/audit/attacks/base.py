"""What a membership inference attack is: a named scoring rule, and what it may use."""

__all__ = ["AttackContext", "MembershipAttack"]


class AttackContext:
    """What an attack may use when it scores the audit examples.

    Attributes:
        model: the audited Keras model.
        members: `(x, y, sample_weight)` of the examples the model trained on (`sample_weight`
            is None when none was given).
        non_members: the same for the examples it did not train on.
        member_features: dict of per-example features of the members
            (`keras_safe.audit.features.compute_features`: `loss`, and for classifiers
            `confidence`, `entropy`, `modified_entropy`, `logit_confidence`, ...).
        non_member_features: the same for the non-members.
        settings: the audit's keyword arguments (`loss_fn`, `from_logits`, `batch_size`,
            `seed`, `learned_attack_model`, `cv_folds`, `model_factory`, `num_shadows`,
            `shadow_fit_kwargs`, `shadow_data`, `lira_fix_variance`).
        metadata: dict written into the report; an attack may record its settings here.
    """

    def __init__(
        self,
        model,
        members,
        non_members,
        member_features,
        non_member_features,
        settings=None,
        metadata=None,
    ):
        self.model = model
        self.members = members
        self.non_members = non_members
        self.member_features = member_features
        self.non_member_features = non_member_features
        self.settings = dict(settings or {})
        self.metadata = {} if metadata is None else metadata
        self._shared = {}

    @property
    def is_classifier(self):
        """Whether the model gives class probabilities (so class-based features exist)."""
        return "confidence" in self.member_features

    def shared(self, key, compute):
        """`compute()`, run once per audit and shared by every attack asking for `key`.

        LiRA's online and offline variants use it to train one set of shadow models.
        """
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]


class MembershipAttack:
    """Base class of membership inference attacks: subclass it and register the subclass.

    Contract of a subclass:

    - `name`: the string users pass in `attacks=(...)`, unique in the registry.
    - `family` (optional): a group name; `attacks=("<family>",)` runs every registered attack
      of that family (`"lira"` runs `lira_online` and `lira_offline`).
    - `needs_classifier`: True when the attack needs class probabilities; the audit refuses
      it, with a clear error, for a model that is not a classifier.
    - `trains_models`: True when the attack trains models (shadow models); the per-epoch
      `MembershipInferenceAudit` callback refuses those.
    - `score(context)`: returns `(member_scores, non_member_scores)`, two 1-D float arrays with
      one finite score per member and per non-member, larger meaning "more likely a member".
      `context` is an `AttackContext`. A score may depend on the membership labels only
      through out-of-sample fitting (as the learned attack's cross-validation does).
    """

    name = None
    family = None
    needs_classifier = False
    trains_models = False

    def score(self, context):
        raise NotImplementedError(f"{type(self).__name__} does not define score(context).")
