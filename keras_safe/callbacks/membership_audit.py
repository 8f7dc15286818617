"""A callback that runs a membership inference audit during training."""

import math

import keras

from keras_safe._data import check_examples
from keras_safe._validation import check_number, fail
from keras_safe.audit.attacks.registry import resolve_attacks
from keras_safe.audit.membership import membership_inference

__all__ = ["MembershipInferenceAudit"]

_TPR_KEY = "tpr_at_1pct_fpr"


@keras.saving.register_keras_serializable(package="keras_safe")
class MembershipInferenceAudit(keras.callbacks.Callback):
    """Audits membership inference every few epochs and writes the figures into `logs`.

    At the end of every `every`-th epoch it runs
    `keras_safe.audit.membership_inference(model, members, non_members, attacks=attacks)` on
    the whole audit set (no slices) and writes into the epoch `logs`:

    - `mia_auc`: the largest ROC AUC over the attacks;
    - `mia_tpr_at_1pct_fpr`: the largest true positive rate at 1% false positive rate;
    - with several attacks, also `mia_<attack>_auc` and `mia_<attack>_tpr_at_1pct_fpr`.

    On the other epochs the same keys hold NaN, so every epoch has the same keys (CSVLogger
    and `History` stay aligned). The progress bar, `History`, CSVLogger and TensorBoard see the
    figures when they come after this callback in the `callbacks` list (Keras adds its own
    progress bar and `History` after the user's callbacks). Every report is kept in
    `self.reports` as `(epoch, AuditReport)`.

    Keep the audit sets small (a few hundred examples each): one prediction pass over both
    sets per audit is the whole cost of the threshold attacks.

    Serialization: `get_config` holds the settings only, never the data. A callback rebuilt
    with `from_config` has no audit data; give it with `set_data(members, non_members)`
    before `fit`, otherwise `fit` raises a ValueError.

    Args:
        members: `(x, y)` or `(x, y, sample_weight)` training examples to audit (a subset of
            the training data).
        non_members: the same for examples from the same distribution never trained on.
        every: audit every this many epochs (>= 1); the last epoch of a run whose count is a
            multiple of `every` is audited.
        attacks: names of registered attacks that train no models (`loss`, `confidence`,
            `entropy`, `modified_entropy`, `learned`, or one added with
            `keras_safe.audit.register_membership_attack`).
        batch_size: prediction batch size.
        verbose: 1 prints a line per audit; 0 is silent (the figures still go to `logs`).

    Raises:
        ArgumentError: for `every` < 1, an unknown attack or an attack that trains models,
            such as LiRA (shadow models are too costly to train every epoch; run
            `membership_inference` after training).

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.callbacks import MembershipInferenceAudit
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(80, 4)).astype("float32"), rng.integers(0, 2, 80)
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> audit = MembershipInferenceAudit((x[:40], y[:40]), (x[40:], y[40:]), verbose=0)
        >>> history = model.fit(x[:40], y[:40], epochs=2, callbacks=[audit], verbose=0)
        >>> sorted(k for k in history.history if k.startswith("mia_"))
        ['mia_auc', 'mia_tpr_at_1pct_fpr']
    """

    def __init__(
        self,
        members=None,
        non_members=None,
        every=1,
        attacks=("loss",),
        batch_size=256,
        verbose=1,
    ):
        super().__init__()
        self.every = check_number("every", every, low=1, integer=True)
        chosen = resolve_attacks(attacks)
        training = [attack.name for attack in chosen if attack.trains_models]
        if training:
            fail(
                "attacks",
                training,
                "attacks that train no models (shadow models are too costly to train every epoch)",
                "use attacks such as ('loss', 'confidence') here and run "
                "keras_safe.audit.membership_inference(..., attacks=('lira',)) after training.",
            )
        self.attacks = tuple(attack.name for attack in chosen)
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.verbose = check_number("verbose", verbose, low=0, integer=True)
        self.reports = []
        self.members = None
        self.non_members = None
        if members is not None or non_members is not None:
            self.set_data(members, non_members)

    def set_data(self, members, non_members):
        """Sets the audit data (needed after `from_config`, which carries no data).

        Args:
            members: `(x, y)` training examples.
            non_members: `(x, y)` held-out examples.

        Raises:
            ArgumentError: if either is missing or malformed.
        """
        for name, value in (("members", members), ("non_members", non_members)):
            if value is None:
                fail(
                    name,
                    None,
                    "an (x, y) pair (the callback needs members and non-members)",
                    "pass both members=(x_in, y_in) and non_members=(x_out, y_out).",
                )
        self.members = check_examples("members", members)
        self.non_members = check_examples("non_members", non_members)

    def _keys(self):
        keys = ["mia_auc", f"mia_{_TPR_KEY}"]
        if len(self.attacks) > 1:
            for attack in self.attacks:
                keys += [f"mia_{attack}_auc", f"mia_{attack}_{_TPR_KEY}"]
        return keys

    def on_train_begin(self, logs=None):
        if self.members is None or self.non_members is None:
            fail(
                "members, non_members",
                None,
                "set before fit (a callback rebuilt from its config carries no audit data)",
                "call callback.set_data((x_in, y_in), (x_out, y_out)) before fit.",
            )

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if (epoch + 1) % self.every != 0:
            for key in self._keys():
                logs[key] = math.nan
            return
        report = membership_inference(
            self.model,
            self.members,
            self.non_members,
            attacks=self.attacks,
            batch_size=self.batch_size,
            slices=False,
        )
        self.reports.append((epoch, report))
        summary = report.summary()
        logs["mia_auc"] = max(m["auc"] for m in summary.values())
        logs[f"mia_{_TPR_KEY}"] = max(m["tpr_at_1%_fpr"] for m in summary.values())
        if len(self.attacks) > 1:
            for attack, figures in summary.items():
                logs[f"mia_{attack}_auc"] = figures["auc"]
                logs[f"mia_{attack}_{_TPR_KEY}"] = figures["tpr_at_1%_fpr"]
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: membership inference AUC {logs['mia_auc']:.4f}, "
                f"TPR@1%FPR {logs[f'mia_{_TPR_KEY}']:.4f}"
            )

    def get_config(self):
        """Returns the settings (the audit data is not part of the config).

        Returns:
            A JSON-friendly dict.
        """
        return {
            "every": self.every,
            "attacks": list(self.attacks),
            "batch_size": self.batch_size,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        """Creates a callback without audit data from `get_config()`'s output.

        Args:
            config: the dict returned by `get_config`.

        Returns:
            A new `MembershipInferenceAudit`; call `set_data` before `fit`.
        """
        return cls(**config)
