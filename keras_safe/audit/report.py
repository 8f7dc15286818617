"""`AuditReport`: a membership inference audit as a table, DataFrame, JSON or plots."""

import json
import math

import numpy as np

from keras_safe._validation import check_choice
from keras_safe.audit.metrics import METRIC_NAMES, roc_points

__all__ = ["SUMMARY_METRICS", "AuditReport"]

#: Figures returned per attack by `AuditReport.summary()`.
SUMMARY_METRICS = (
    "auc",
    "advantage",
    "tpr_at_0.1%_fpr",
    "tpr_at_1%_fpr",
    "epsilon_lower_bound",
)

_COLUMNS = ("attack", "slice", "n_members", "n_non_members") + METRIC_NAMES
_HEADERS = {
    "attack": "attack",
    "slice": "slice",
    "n_members": "n_in",
    "n_non_members": "n_out",
    "auc": "AUC",
    "advantage": "adv",
    "tpr_at_0.1%_fpr": "TPR@0.1%",
    "tpr_at_1%_fpr": "TPR@1%",
    "epsilon_lower_bound": "eps_lb",
    "epsilon_estimate": "eps_est",
    "epsilon_ci_high": "eps_hi",
}


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _from_json_number(value):
    if value in ("inf", "-inf"):
        return float(value)
    return value


class AuditReport:
    """Result of `membership_inference`: metrics per attack and slice, and the raw scores.

    Scores are "larger = more likely a member". Slices are `all` (the whole audit set),
    `class=k` (examples whose true label is k) and `correct` / `incorrect` (examples the
    model classifies correctly or not).

    Args:
        results: list of dicts, one per (attack, slice), with `attack`, `slice`, `n_members`,
            `n_non_members` and the metrics of `keras_safe.audit.metrics.attack_metrics`.
        scores: dict attack -> `(member_scores, non_member_scores)` over the whole audit set.
        features: dict feature name -> `(member_values, non_member_values)`, e.g. `loss`.
        metadata: dict of settings (delta, confidence level, shadow models, ...).

    Example:
        >>> import numpy as np
        >>> from keras_safe.audit import AuditReport, attack_metrics
        >>> s_in, s_out = np.array([3.0, 2.0, 1.5]), np.array([1.0, 0.5, 1.6])
        >>> row = {"attack": "loss", "slice": "all", **attack_metrics(s_in, s_out)}
        >>> report = AuditReport([row], scores={"loss": (s_in, s_out)})
        >>> round(report.summary()["loss"]["auc"], 3)
        0.889
    """

    def __init__(self, results, scores=None, features=None, metadata=None):
        self.results = [dict(row) for row in results]
        self.scores = {
            k: (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
            for k, (a, b) in (scores or {}).items()
        }
        self.features = {
            k: (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
            for k, (a, b) in (features or {}).items()
        }
        self.metadata = dict(metadata or {})

    @property
    def attacks(self):
        """Names of the attacks, in the order they were run."""
        seen = []
        for row in self.results:
            if row["attack"] not in seen:
                seen.append(row["attack"])
        return seen

    def get(self, attack, slice="all"):
        """Metrics of one attack on one slice.

        Args:
            attack: attack name, e.g. `"loss"`.
            slice: slice name, e.g. `"all"`, `"class=3"`, `"correct"`.

        Returns:
            The dict of that row.

        Raises:
            KeyError: if the report has no such row.
        """
        for row in self.results:
            if row["attack"] == attack and row["slice"] == slice:
                return row
        raise KeyError(
            f"No result for attack={attack!r}, slice={slice!r}. Attacks: {self.attacks}; "
            f"slices: {sorted({r['slice'] for r in self.results})}."
        )

    def summary(self):
        """Headline figures of every attack on the whole audit set.

        Returns:
            A dict attack -> dict with `auc`, `advantage`, `tpr_at_0.1%_fpr`, `tpr_at_1%_fpr`
            and `epsilon_lower_bound` (floats).
        """
        return {
            row["attack"]: {name: float(row[name]) for name in SUMMARY_METRICS}
            for row in self.results
            if row["slice"] == "all"
        }

    def most_vulnerable(self, metric="auc"):
        """The row (attack, slice) with the largest value of `metric`."""
        return max(self.results, key=lambda row: row[metric])

    def to_dataframe(self):
        """All rows as a pandas DataFrame (one row per attack and slice)."""
        import pandas as pd

        extra = [c for r in self.results for c in r if c not in _COLUMNS]
        columns = list(_COLUMNS) + list(dict.fromkeys(extra))
        return pd.DataFrame(self.results, columns=columns)

    def to_string(self, slices="vulnerable"):
        """The report as a text table.

        Args:
            slices: `"all"`: only the whole-set row of each attack; `"vulnerable"`: also the
                slice with the highest AUC per attack; `"every"`: every slice.

        Returns:
            The table as a string.
        """
        check_choice("slices", slices, ("all", "vulnerable", "every"))
        rows = [r for r in self.results if r["slice"] == "all"]
        if slices == "every":
            rows = list(self.results)
        elif slices == "vulnerable":
            for attack in self.attacks:
                others = [r for r in self.results if r["attack"] == attack and r["slice"] != "all"]
                if others:
                    rows.append(max(others, key=lambda r: r["auc"]))
            order = {a: i for i, a in enumerate(self.attacks)}
            rows.sort(key=lambda r: (order[r["attack"]], r["slice"] != "all"))
        cells = [[_HEADERS[c] for c in _COLUMNS]]
        for row in rows:
            line = []
            for column in _COLUMNS:
                value = row.get(column)
                if isinstance(value, float):
                    line.append("inf" if math.isinf(value) else f"{value:.3f}")
                else:
                    line.append(str(value))
            cells.append(line)
        widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
        text = [
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
            for line in cells
        ]
        text.insert(1, "-" * len(text[0]))
        head = "Membership inference audit"
        if "delta" in self.metadata:
            head += (
                f" (eps bounds at delta={self.metadata['delta']:g}, "
                f"{100 * self.metadata.get('confidence_level', 0.95):g}% Clopper-Pearson)"
            )
        return "\n".join([head] + text)

    def __str__(self):
        return self.to_string()

    def __repr__(self):
        summary = ", ".join(f"{a}: auc={m['auc']:.3f}" for a, m in self.summary().items())
        return f"<AuditReport {summary}>"

    def to_dict(self, include_scores=True):
        """A JSON-friendly dict of the report (infinite values are written as "inf").

        Args:
            include_scores: whether to include the raw scores and features (needed to plot
                a report read back with `from_dict` / `from_json`).

        Returns:
            A dict with `results`, `metadata` and optionally `scores` and `features`.
        """
        out = {
            "results": [{k: _json_number(v) for k, v in row.items()} for row in self.results],
            "metadata": {k: _json_number(v) for k, v in self.metadata.items()},
        }
        if include_scores:
            out["scores"] = {
                k: {"members": a.tolist(), "non_members": b.tolist()}
                for k, (a, b) in self.scores.items()
            }
            out["features"] = {
                k: {"members": a.tolist(), "non_members": b.tolist()}
                for k, (a, b) in self.features.items()
            }
        return out

    @classmethod
    def from_dict(cls, data):
        """Rebuilds a report from `to_dict()` output."""
        results = [{k: _from_json_number(v) for k, v in row.items()} for row in data["results"]]
        scores = {k: (v["members"], v["non_members"]) for k, v in data.get("scores", {}).items()}
        features = {
            k: (v["members"], v["non_members"]) for k, v in data.get("features", {}).items()
        }
        return cls(results, scores, features, data.get("metadata"))

    def to_json(self, path=None, include_scores=True):
        """Writes the report as JSON.

        Args:
            path: file to write; when None the JSON text is returned instead.
            include_scores: whether to include the raw scores and features.

        Returns:
            The JSON text when `path` is None, else `path`.
        """
        text = json.dumps(self.to_dict(include_scores=include_scores), indent=1)
        if path is None:
            return text
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    @classmethod
    def from_json(cls, path_or_text):
        """Reads a report written by `to_json` (a file path or the JSON text itself)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))

    def roc_curve(self, attack):
        """`(fpr, tpr)` arrays of one attack on the whole audit set."""
        if attack not in self.scores:
            raise KeyError(f"No scores for attack {attack!r}; attacks: {list(self.scores)}.")
        fpr, tpr, _ = roc_points(*self.scores[attack])
        return fpr, tpr

    def plot_roc(self, ax=None, log=True, attacks=None):
        """Plots the ROC curve of every attack (log-log axes by default, as in LiRA).

        Args:
            ax: a matplotlib Axes; a new figure is made when None.
            log: log-scaled axes, which show the low-FPR region where attacks matter.
            attacks: names of the attacks to plot (default: all with scores).

        Returns:
            The matplotlib Axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(4.5, 4.5))
        names = list(attacks) if attacks is not None else list(self.scores)
        floor = 1.0
        for name in names:
            fpr, tpr = self.roc_curve(name)
            auc = self.get(name)["auc"] if any(r["attack"] == name for r in self.results) else None
            label = f"{name} (AUC {auc:.3f})" if auc is not None else name
            ax.plot(fpr, tpr, label=label)
            floor = min(floor, 1.0 / max(len(self.scores[name][1]), 1))
        ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(floor, 1)
            ax.set_ylim(floor, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("Membership inference ROC")
        ax.legend(loc="lower right", fontsize="small")
        return ax

    def plot_histograms(self, feature="loss", ax=None, bins=40, log_scale=None):
        """Histograms of a per-example feature (default: the loss) for members and non-members.

        Args:
            feature: a feature name (`loss`, `confidence`, `entropy`, ...) or an attack name.
            ax: a matplotlib Axes; a new figure is made when None.
            bins: number of histogram bins.
            log_scale: log-scaled x axis (default: True for the loss).

        Returns:
            The matplotlib Axes.
        """
        import matplotlib.pyplot as plt

        source = self.features if feature in self.features else self.scores
        if feature not in source:
            raise KeyError(
                f"Unknown feature {feature!r}. Features: {list(self.features)}; "
                f"attack scores: {list(self.scores)}."
            )
        members, non_members = source[feature]
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        if log_scale is None:
            log_scale = feature == "loss"
        values = np.concatenate([members, non_members])
        if log_scale:
            low = max(np.min(values[values > 0]) if np.any(values > 0) else 1e-8, 1e-8)
            edges = np.geomspace(low, max(np.max(values), low * 10), bins + 1)
            members = np.maximum(members, low)
            non_members = np.maximum(non_members, low)
            ax.set_xscale("log")
        else:
            edges = np.linspace(np.min(values), np.max(values) + 1e-12, bins + 1)
        ax.hist(members, bins=edges, alpha=0.6, density=True, label="members")
        ax.hist(non_members, bins=edges, alpha=0.6, density=True, label="non-members")
        ax.set_xlabel(feature)
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
        return ax
