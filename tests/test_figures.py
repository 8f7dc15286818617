"""Every figure the README quotes agrees with its source: a notebook output or a result file."""

import contextlib
import importlib.util
import io
import json
import math
import pathlib
import re
import shutil

import numpy as np
import pytest

from keras_safe import cli
from tests import dp_reference

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "readme_figures", ROOT / "tools" / "readme_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


figures = _load_tool()


def _sources(readme):
    return sorted(
        {source for source, _ in re.findall(r"figure(?:-block)?: (\S+?)#(\S+?) -->", readme)}
    )


def _copy(tmp_path):
    """The README and every source it names, in a scratch folder."""
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme)
    for source in _sources(readme):
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / source, tmp_path / source)
    return tmp_path


def test_readme_figures_agree_with_their_sources():
    found, problems = figures.check(ROOT)
    assert problems == [], "run python tools/readme_figures.py and update the README"
    names = {name for name, _, _ in found}
    # The figures that disagreed before they had a source stay tied to it.
    for name in (
        "notebooks/02_preprocessing.ipynb#dp_accuracy",
        "notebooks/03_privacy_audit.ipynb#canary_plain",
        "notebooks/05_model_security.ipynb#dp_adversarial_pgd",
        "benchmarks/results/demo/report.json#table",
        "benchmarks/results/rdp_conversion.json#cli_epsilon",
    ):
        assert name in names
    assert len(found) >= 30


def test_every_notebook_key_finds_exactly_one_figure():
    for source, keys in figures.NOTEBOOK_FIGURES.items():
        for key in keys:
            figures.source_value(ROOT, source, key)  # raises on 0 or 2+ matches


def test_untagged_known_stale_figures_are_gone():
    readme = (ROOT / "README.md").read_text()
    for stale in ("0.851", "1.2-1.6", "| 0.61 |", "OWNER"):
        # A figure that has a source may read the same after a new run; an untagged one may not.
        assert not re.search(re.escape(stale) + r"(?!<!-- figure)", readme), stale


@pytest.mark.parametrize(
    "readme, value, agree",
    [("0.921", "0.921", True), ("0.92", "0.921", True), ("0.92", "0.926", False),
     ("2.90", 2.8968, True), ("29", 28.6, True), ("3", "3.0", True), ("0.000", "0.000", True),
     ("0.61", "0.443", False), ("14,718", "14718", True), ("1e-05", 1e-5, True),
     ("0.921", "n/a", False)],
)  # fmt: skip
def test_agreement_at_the_readme_precision(readme, value, agree):
    assert figures.agrees(readme, value) is agree


def _other(figure):
    """A figure of the same precision that reads differently."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return f"{float(figure) + 0.07:.{decimals}f}"


def test_a_changed_readme_figure_is_caught(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    tag = "<!-- figure: notebooks/02_preprocessing.ipynb#dp_accuracy -->"
    text = readme.read_text()
    stored = figures.source_value(root, "notebooks/02_preprocessing.ipynb", "dp_accuracy")
    assert text.count(f"{stored}{tag}") == 2
    readme.write_text(text.replace(f"{stored}{tag}", f"{_other(stored)}{tag}", 1))
    _, problems = figures.check(root)
    assert problems == [
        f"notebooks/02_preprocessing.ipynb#dp_accuracy: README says {_other(stored)}, "
        f"the source says {stored}"
    ]


def test_a_changed_notebook_output_is_caught(tmp_path):
    root = _copy(tmp_path)
    path = root / "notebooks" / "05_model_security.ipynb"
    text = path.read_text()
    stored = figures.source_value(root, "notebooks/05_model_security.ipynb", "dp_adversarial_pgd")
    printed = f"under PGD-20 at eps=0.1 {stored}"
    assert text.count(printed) == 1
    path.write_text(text.replace(printed, f"under PGD-20 at eps=0.1 {_other(stored)}"))
    _, problems = figures.check(root)
    assert problems == [
        f"notebooks/05_model_security.ipynb#dp_adversarial_pgd: README says {stored}, "
        f"the source says {_other(stored)}"
    ]


def test_a_changed_result_file_is_caught(tmp_path):
    root = _copy(tmp_path)
    path = root / "benchmarks" / "results" / "demo" / "report.json"
    report = json.loads(path.read_text())
    quoted = f"{report['rows'][1]['mia_epsilon_lower_bound']:.2f}"  # as the README prints it
    report["table"][3] = report["table"][3].replace("0.", "0.9", 1)
    report["rows"][1]["mia_epsilon_lower_bound"] = 0.5
    path.write_text(json.dumps(report))
    _, problems = figures.check(root)
    assert sorted(problems) == [
        f"benchmarks/results/demo/report.json#rows.1.mia_epsilon_lower_bound: README says "
        f"{quoted}, the source says 0.5",
        "benchmarks/results/demo/report.json#table: the README's block differs from the source",
    ]


def test_missing_sources_ambiguous_keys_and_malformed_tags_are_caught(tmp_path):
    root = _copy(tmp_path)
    readme = root / "README.md"
    readme.write_text(
        readme.read_text()
        + "\n1.0<!-- figure: notebooks/02_preprocessing.ipynb#no_such_key -->"
        + "\n1.0<!-- figure: benchmarks/results/missing.json#x -->"
        + "\n1.0<!-- figure: benchmarks/results/demo/report.json#rows.9.epsilon -->"
        + "\nabout 3<!-- figure: notebooks/02_preprocessing.ipynb -->\n"
    )
    figures.NOTEBOOK_FIGURES["notebooks/02_preprocessing.ipynb"]["ambiguous"] = r"accuracy (\S+)"
    try:
        readme.write_text(
            readme.read_text() + "0.9<!-- figure: notebooks/02_preprocessing.ipynb#ambiguous -->\n"
        )
        _, problems = figures.check(root)
    finally:
        del figures.NOTEBOOK_FIGURES["notebooks/02_preprocessing.ipynb"]["ambiguous"]
    assert len(problems) == 5, problems
    assert any("no such key" in p for p in problems)
    assert any("missing.json: no such file" in p for p in problems)
    assert any("no '9' there" in p for p in problems)
    assert any("malformed" in p for p in problems)
    assert any("ambiguous: 4 matches" in p for p in problems)


# -- the RDP conversion figures: an independent computation ----------------------------------


def _integer_order_rdp(q, sigma, orders):
    """RDP of one Poisson-subsampled Gaussian step at integer orders, in closed form.

    A_alpha = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)), and the
    RDP is log(A_alpha) / (alpha - 1) (Mironov, Talwar and Zhang 2019, Section 3.3).
    """
    values = []
    for alpha in orders:
        terms = [
            math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
            + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
            for k in range(alpha + 1)
        ]  # fmt: skip
        top = max(terms)
        values.append((top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1))
    return np.asarray(values)


def test_rdp_conversion_results_match_an_independent_computation():
    results = json.loads((ROOT / "benchmarks" / "results" / "rdp_conversion.json").read_text())
    setting = results["setting"]
    steps, delta = setting["steps"], setting["delta"]
    q = setting["batch_size"] / setting["num_examples"]
    orders = np.arange(2, 65)
    rdp = steps * _integer_order_rdp(q, setting["noise_multiplier"], orders)
    old = rdp + math.log(1 / delta) / (orders - 1)
    # Canonne, Kamath and Steinke 2020: RDP + log(1 - 1/alpha) - (log delta + log alpha)/(alpha-1).
    new = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    integer = results["integer"]
    assert integer["old_conversion"]["epsilon"] == pytest.approx(old.min(), rel=1e-6)
    assert integer["old_conversion"]["order"] == orders[old.argmin()]
    assert integer["new_conversion"]["epsilon"] == pytest.approx(new.min(), rel=1e-6)
    assert results["keras_safe"]["new_conversion"]["epsilon"] == pytest.approx(
        dp_reference.epsilon(setting["noise_multiplier"], q, steps, delta), rel=1e-9
    )
    # The older conversion is what makes "about 3".
    assert 2.95 < old.min() < 3.05 and new.min() < 2.65


def test_rdp_conversion_results_are_what_the_cli_prints_now():
    """At the README's precision (two decimals), the stored figure is the CLI's figure."""
    results = json.loads((ROOT / "benchmarks" / "results" / "rdp_conversion.json").read_text())
    setting = results["setting"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = cli.main(
            ["epsilon", "--num-examples", str(setting["num_examples"]),
             "--batch-size", str(setting["batch_size"]), "--epochs", str(setting["epochs"]),
             "--noise-multiplier", str(setting["noise_multiplier"]),
             "--delta", str(setting["delta"])]
        )  # fmt: skip
    assert status == 0
    epsilon = float(re.match(r"epsilon = (\S+)", printed.getvalue()).group(1))
    assert f"{epsilon:.2f}" == f"{results['cli_epsilon']:.2f}"
