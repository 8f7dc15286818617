"""Every figure the README quotes names its source; this checks that they agree.

    python tools/readme_figures.py        # one line per figure: README value, source value

A figure in README.md is followed by an HTML comment (invisible on GitHub and on the package
index) that names its source:

    0.921<!-- figure: notebooks/02_preprocessing.ipynb#dp_accuracy -->
    0.46<!-- figure: benchmarks/results/demo.json#rows.1.test_accuracy -->

- `notebooks/<name>.ipynb#<key>`: the stored outputs of a notebook (what `notebooks/run_all.py`
  wrote). `NOTEBOOK_FIGURES` below maps each key to a regular expression whose first group is
  the figure; it must match the notebook's outputs exactly once.
- `<path>.json#<key.path>`: a result file (benchmark scripts write `benchmarks/results/*.json`);
  the key is a dotted path, list indices as numbers.

A fenced block of printed output is tagged on the line before it, with a source whose value is
a list of lines:

    <!-- figure-block: benchmarks/results/demo.json#table -->

The README gives a figure at the precision it wants: it agrees with its source when the source,
rounded to the README's number of decimals, reads the same. After a notebook is executed again
or a benchmark writes new results, run this script and update the README where it disagrees.
"""

import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Figures in the stored outputs of the notebooks: key -> pattern (group 1 is the figure).
NOTEBOOK_FIGURES = {
    "notebooks/01_quickstart.ipynb": {
        "plain_accuracy": r"^plain test accuracy: (\S+)$",
        "dp_accuracy": r"^DP-SGD test accuracy: (\S+) \(plain",
        "dp_epsilon": r"^privacy ledger: epsilon (\S+) at delta",
        "lira_plain_auc": r"^ *plain, lira_online attack: AUC (\S+),",
        "lira_plain_tpr": r"^ *plain, lira_online attack: AUC \S+, TPR at 1% FPR (\S+)$",
        "lira_dp_auc": r"^DP-SGD, lira_online attack: AUC (\S+),",
        "lira_dp_tpr": r"^DP-SGD, lira_online attack: AUC \S+, TPR at 1% FPR (\S+)$",
    },
    "notebooks/02_preprocessing.ipynb": {
        "plain_accuracy": r"plain Normalization: test accuracy (\S+)",
        "nan_to_zero_accuracy": r"NaN->0 \+ Normalization: test accuracy (\S+)",
        "stack_accuracy": r"keras_safe stack: test accuracy (\S+)",
        "dp_epsilon": r"DP stack: epsilon spent (\S+),",
        "dp_accuracy": r"DP stack: epsilon spent \S+, test accuracy (\S+)",
    },
    "notebooks/03_privacy_audit.ipynb": {
        "lira_plain_tpr": r"^ *plain, lira_online *: AUC \S+, TPR at 1% FPR (\S+),",
        "lira_dp_tpr": r"^DP-SGD, lira_online *: AUC \S+, TPR at 1% FPR (\S+),",
        "loss_plain_tpr": r"^ *plain, loss attack: AUC \S+, TPR at 1% FPR (\S+)$",
        "canaries": r"^plain:\nCanary audit: (\d+) canaries",
        "canary_plain": r"^plain:\nCanary audit: .*\n +empirical epsilon >= (\S+)",
        "canary_dp_eps1": r"^DP-SGD, eps=1:\nCanary audit: .*\n +empirical epsilon >= (\S+)",
        "canary_dp_eps3": r"^DP-SGD, eps=3:\nCanary audit: .*\n +empirical epsilon >= (\S+)",
        "canary_dp_eps8": r"^DP-SGD, eps=8:\nCanary audit: .*\n +empirical epsilon >= (\S+)",
    },
    "notebooks/04_existing_script.ipynb": {
        "lira_plain_tpr": r"^ *plain, lira_online attack: AUC \S+, TPR at 1% FPR (\S+)$",
        "lira_dp_tpr": r"^DP-SGD, lira_online attack: AUC \S+, TPR at 1% FPR (\S+)$",
    },
    "notebooks/05_model_security.ipynb": {
        "plain_clean": r"^ +plain: clean accuracy (\S+), under PGD",
        "plain_pgd": r"^ +plain: clean accuracy \S+, under PGD-20 at eps=0\.1 (\S+)",
        "adversarial_clean": r"^ +adversarially trained: clean accuracy (\S+), under PGD",
        "adversarial_pgd": (
            r"^ +adversarially trained: clean accuracy \S+, under PGD-20 at eps=0\.1 (\S+)"
        ),
        "dp_adversarial_epsilon": r"^ +DP \(eps=(\S+)\) \+ adversarial: clean accuracy",
        "dp_adversarial_clean": r"^ +DP \(eps=\S+\) \+ adversarial: clean accuracy (\S+), under",
        "dp_adversarial_pgd": (
            r"^ +DP \(eps=\S+\) \+ adversarial: clean accuracy \S+, under PGD-20 at eps=0\.1 (\S+)"
        ),
    },
    "notebooks/06_migrating_from_tf_privacy.ipynb": {
        "epsilon_poisson": r"^ +epsilon assuming Poisson sampling \(\*\): +(\S+)",
        "dp_speed_ratio": r"^keras_safe: plain Keras .* DP-SGD [\d,]+ examples/s, (\S+) of plain",
        "tf_privacy_best_ratio": r"^TF Privacy DPSequential\+registry +[\d,]+ examples/s +(\S+) of",
    },
    "notebooks/07_user_level_privacy.ipynb": {
        "users": r"^training rows: \d+, users: (\d+),",
        "plain_accuracy": r"^plain: test accuracy (\S+)$",
        "example_accuracy": r"^example-level DP-SGD: test accuracy (\S+)$",
        "example_epsilon": (
            r"^example-level DP-SGD: test accuracy \S+\nprivacy ledger: epsilon (\S+) at delta"
        ),
        "group_epsilon": (
            r"^user-level epsilon by group privacy \(users with up to \d+ examples\): (\S+)$"
        ),
        "user_accuracy": r"^user-level DP-SGD: test accuracy (\S+)$",
        "user_epsilon": (
            r"^user-level DP-SGD: test accuracy \S+\nprivacy ledger: epsilon (\S+) at delta"
        ),
        "canary_users": r"^plain:\nCanary audit: (\d+) canary users",
        "canary_plain": r"^user-level canary audit, plain: empirical epsilon >= (\S+),",
        "canary_user": r"^user-level canary audit, user-level DP-SGD: empirical epsilon >= (\S+),",
    },
}

NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?"
FIGURE_TAG = re.compile(rf"({NUMBER})<!-- figure: (\S+?)#(\S+?) -->")
BLOCK_TAG = re.compile(r"<!-- figure-block: (\S+?)#(\S+?) -->\n```[^\n]*\n(.*?)```", re.S)
ANY_TAG = re.compile(r"<!-- figure(?:-block)?: ")


class FigureError(ValueError):
    """A tag whose source is missing, or whose key finds no figure or more than one."""


def notebook_outputs(path):
    """The text a reader sees below the code cells: streams and plain-text results, in order."""
    notebook = json.loads(pathlib.Path(path).read_text())
    texts = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                texts.append("".join(output.get("text", "")))
            elif "text/plain" in output.get("data", {}):
                texts.append("".join(output["data"]["text/plain"]))
    return "\n".join(texts)


def source_value(root, source, key):
    """The figure `key` of `source` (a string, a number or a list of lines)."""
    path = pathlib.Path(root) / source
    if not path.is_file():
        raise FigureError(f"{source}: no such file")
    if source.endswith(".ipynb"):
        patterns = NOTEBOOK_FIGURES.get(source, {})
        if key not in patterns:
            raise FigureError(f"{source}#{key}: no such key in NOTEBOOK_FIGURES")
        matches = re.findall(patterns[key], notebook_outputs(path), re.M)
        if len(matches) != 1:
            raise FigureError(f"{source}#{key}: {len(matches)} matches in the stored outputs")
        return matches[0]
    if source.endswith(".json"):
        value = json.loads(path.read_text())
        for part in key.split("."):
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise FigureError(f"{source}#{key}: no {part!r} there") from None
        return value
    raise FigureError(f"{source}: a figure comes from a notebook (.ipynb) or a result (.json)")


def agrees(readme_text, value):
    """True when `value`, at the README's precision, reads as the README's figure."""
    text = readme_text.replace(",", "")
    try:
        number = float(str(value).replace(",", ""))
    except ValueError:
        return False
    if "e" in text.lower():
        return float(text) == float(f"{number:.{len(text.split('e')[0].split('.')[-1])}e}")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{number:.{decimals}f}" == text


def check(root=pathlib.Path(ROOT)):
    """Every tagged figure of `root`/README.md against its source.

    Returns:
        `(figures, problems)`: figures as `(source#key, README text, source value)` and the
        problems as lines (an empty list when everything agrees).
    """
    readme = (pathlib.Path(root) / "README.md").read_text()
    figures, problems = [], []
    tagged = FIGURE_TAG.findall(readme) + BLOCK_TAG.findall(readme)
    if len(ANY_TAG.findall(readme)) != len(tagged):
        problems.append("a figure tag is malformed: NUMBER<!-- figure: SOURCE#KEY --> expected")
    for match in FIGURE_TAG.finditer(readme):
        text, source, key = match.groups()
        try:
            value = source_value(root, source, key)
        except FigureError as error:
            problems.append(str(error))
            continue
        figures.append((f"{source}#{key}", text, value))
        if not agrees(text, value):
            problems.append(f"{source}#{key}: README says {text}, the source says {value}")
    for match in BLOCK_TAG.finditer(readme):
        source, key, block = match.groups()
        try:
            value = source_value(root, source, key)
        except FigureError as error:
            problems.append(str(error))
            continue
        expected = "".join(f"{line}\n" for line in value)
        figures.append((f"{source}#{key}", f"{block.count(chr(10))} lines", f"{len(value)} lines"))
        if block != expected:
            problems.append(f"{source}#{key}: the README's block differs from the source")
    return figures, problems


def main():
    figures, problems = check()
    for name, text, value in figures:
        shown = value if not isinstance(value, list) else f"{len(value)} lines"
        print(f"{name:<70} README {text:<10} source {shown}")
    for problem in problems:
        print(f"DISAGREES: {problem}")
    print(f"{len(figures)} figures, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
