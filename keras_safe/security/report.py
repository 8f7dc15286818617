"""`RobustnessReport`: accuracy under attack per epsilon, and the gradient-masking checks."""

import json
import math

__all__ = ["RobustnessReport", "WORST"]

#: Name of the row that counts an example as robust only if every attack failed on it.
WORST = "worst"

_COLUMNS = (
    "attack",
    "epsilon",
    "accuracy",
    "success_rate",
    "mean_perturbation",
    "max_perturbation",
    "n",
    "seconds",
)
_HEADERS = {
    "attack": "attack",
    "epsilon": "epsilon",
    "accuracy": "accuracy",
    "success_rate": "success",
    "mean_perturbation": "mean_norm",
    "max_perturbation": "max_norm",
    "n": "n",
    "seconds": "seconds",
}


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


class RobustnessReport:
    """Result of `evaluate_robustness`: one row per attack and epsilon, plus masking checks.

    An example counts as robust under an attack when the model classifies it correctly both
    clean and on the attack's output, so no accuracy exceeds the clean accuracy. The `worst`
    rows count an example as robust only if it survived every attack at that epsilon.

    Args:
        rows: list of dicts with `attack`, `epsilon`, `accuracy`, `success_rate` (fraction of
            the correctly classified examples that the attack fooled), `mean_perturbation`,
            `max_perturbation` (norm of `x_adv - x`), `n`, `seconds` (wall time of the attack;
            an attack's first epsilon includes compiling its graph) and `uses_gradients`.
        clean_accuracy: accuracy on the unperturbed inputs.
        checks: list of dicts `{"check", "fired", "detail"}` (the gradient-masking signs).
        metadata: dict of settings (`norm`, `clip_min`, `clip_max`, `tolerance`, ...).

    Example:
        >>> from keras_safe.security import RobustnessReport
        >>> rows = [{"attack": "pgd", "epsilon": 0.1, "accuracy": 0.4, "success_rate": 0.6,
        ...          "mean_perturbation": 0.1, "max_perturbation": 0.1, "n": 10,
        ...          "seconds": 0.1, "uses_gradients": True}]
        >>> report = RobustnessReport(rows, clean_accuracy=1.0)
        >>> report.accuracy("pgd", 0.1), report.masking_suspected
        (0.4, False)
    """

    def __init__(self, rows, clean_accuracy, checks=(), metadata=None):
        self.rows = [dict(row) for row in rows]
        self.clean_accuracy = float(clean_accuracy)
        self.checks = [dict(check) for check in checks]
        self.metadata = dict(metadata or {})

    @property
    def attacks(self):
        """Names of the attacks in the order they were run (`worst` last, when present)."""
        return list(dict.fromkeys(row["attack"] for row in self.rows))

    @property
    def epsilons(self):
        """The epsilons evaluated, ascending."""
        return sorted({row["epsilon"] for row in self.rows})

    def accuracy(self, attack, epsilon):
        """Accuracy under `attack` at `epsilon` (`attack="worst"`: under all attacks)."""
        for row in self.rows:
            if row["attack"] == attack and math.isclose(row["epsilon"], epsilon, rel_tol=1e-9):
                return row["accuracy"]
        raise KeyError(
            f"No result for attack={attack!r}, epsilon={epsilon!r}. Attacks: {self.attacks}; "
            f"epsilons: {self.epsilons}."
        )

    def robust_accuracy(self, epsilon):
        """Accuracy when every attack is tried on every example, at `epsilon`."""
        names = self.attacks
        if WORST in names:
            return self.accuracy(WORST, epsilon)
        return min(self.accuracy(a, epsilon) for a in names)

    @property
    def masking_suspected(self):
        """Whether any gradient-masking check fired."""
        return any(check["fired"] for check in self.checks)

    def fired_checks(self):
        """The names of the checks that fired."""
        return [check["check"] for check in self.checks if check["fired"]]

    def to_dataframe(self):
        """All rows as a pandas DataFrame (needs pandas)."""
        import pandas as pd

        columns = list(_COLUMNS) + ["uses_gradients"]
        return pd.DataFrame(self.rows, columns=columns)

    def to_string(self):
        """The report as a text table followed by the masking checks."""
        cells = [[_HEADERS[c] for c in _COLUMNS]]
        cells.append(["clean", "0", f"{self.clean_accuracy:.3f}", "", "", "", "", ""])
        for row in self.rows:
            line = []
            for column in _COLUMNS:
                value = row.get(column)
                if value is None:
                    line.append("")
                elif column == "epsilon":
                    line.append(f"{value:g}")
                elif isinstance(value, float):
                    line.append(f"{value:.3f}")
                else:
                    line.append(str(value))
            cells.append(line)
        widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
        text = [
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(line, widths))
            )
            for line in cells
        ]
        text.insert(1, "-" * len(text[0]))
        norm = self.metadata.get("norm", "linf")
        head = [f"Robustness evaluation ({norm} perturbations)"]
        if self.checks:
            verdict = "SUSPECTED" if self.masking_suspected else "no sign"
            tail = [f"Gradient masking: {verdict}"]
            for check in self.checks:
                mark = "FIRED" if check["fired"] else "ok   "
                tail.append(f"  [{mark}] {check['check']}: {check['detail']}")
        else:
            tail = []
        return "\n".join(head + text + tail)

    def __str__(self):
        return self.to_string()

    def __repr__(self):
        masking = ", masking suspected" if self.masking_suspected else ""
        return (
            f"<RobustnessReport clean={self.clean_accuracy:.3f}, attacks={self.attacks}, "
            f"epsilons={self.epsilons}{masking}>"
        )

    def to_dict(self):
        """A JSON-friendly dict (`rows`, `clean_accuracy`, `checks`, `metadata`)."""
        return {
            "rows": [{k: _json_number(v) for k, v in row.items()} for row in self.rows],
            "clean_accuracy": self.clean_accuracy,
            "checks": self.checks,
            "metadata": {k: _json_number(v) for k, v in self.metadata.items()},
        }

    @classmethod
    def from_dict(cls, data):
        """Rebuilds a report from `to_dict()` output."""
        return cls(data["rows"], data["clean_accuracy"], data.get("checks", ()), data["metadata"])

    def to_json(self, path=None):
        """Writes the report as JSON to `path`, or returns the text when `path` is None."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is None:
            return text
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    @classmethod
    def from_json(cls, path_or_text):
        """Reads a report written by `to_json` (a file path or the JSON text)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(text, encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))

    def plot(self, ax=None, attacks=None):
        """Plots accuracy against epsilon, one line per attack (needs matplotlib).

        Args:
            ax: a matplotlib Axes; a new figure is made when None.
            attacks: names of the attacks to draw (default: all, `worst` included).

        Returns:
            The matplotlib Axes.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        for name in attacks if attacks is not None else self.attacks:
            points = sorted((r["epsilon"], r["accuracy"]) for r in self.rows if r["attack"] == name)
            xs = [0.0] + [p[0] for p in points]
            ys = [self.clean_accuracy] + [p[1] for p in points]
            style = "k--" if name == WORST else "o-"
            ax.plot(xs, ys, style, label=name, markersize=3)
        ax.set_xlabel(f"epsilon ({self.metadata.get('norm', 'linf')})")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        title = "Accuracy under attack"
        if self.masking_suspected:
            title += " (gradient masking suspected)"
        ax.set_title(title)
        ax.legend(fontsize="small")
        return ax
