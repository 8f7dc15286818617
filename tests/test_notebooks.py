"""The demo notebooks: stored with the outputs of a full run, and runnable with small settings.

The stored notebooks are what a reader sees on GitHub: every code cell must hold the outputs of
one run of `notebooks/run_all.py` with the full settings (plots included, no errors). The test
suite runs each notebook again with the small settings (`KERAS_SAFE_FAST=1`) into a temporary
copy, through the same function `run_all.py` uses, and checks that the stored file is untouched.
"""

import ast
import copy
import importlib.util
import os
import pathlib
import re
import time

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = [
    "01_quickstart.ipynb",
    "02_preprocessing.ipynb",
    "03_privacy_audit.ipynb",
    "04_existing_script.ipynb",
    "05_model_security.ipynb",
    "06_migrating_from_tf_privacy.ipynb",
    "07_user_level_privacy.ipynb",
]
FAST_LIMIT_S = 180  # each notebook, small settings, 2 CPU cores
MAX_NOTEBOOK_BYTES = 1_000_000
MAX_TOTAL_BYTES = 4_000_000
# Calls that must never get a `seed=` in a notebook: a known seed voids the DP guarantee.
DP_CALLS = {"DPSGD", "DPAdam", "DPOptimizer", "poisson_batches"}


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_all", NOTEBOOK_DIR / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _stream_text(cell, name="stdout"):
    return "".join(
        output.get("text", "")
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream" and output.get("name") == name
    )


def _images(notebook):
    return [
        output
        for cell in _code_cells(notebook)
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]


def _errors(notebook):
    return [
        f"{output.get('ename')}: {output.get('evalue')}"
        for cell in _code_cells(notebook)
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


def _python_source(source):
    """The cell as plain Python (IPython magics turned into calls), for `ast`."""
    return TransformerManager().transform_cell(source)


def test_the_seven_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_holds_a_full_run(path):
    """Outputs of one top-to-bottom run with the full settings, plots included, no errors."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = _code_cells(notebook)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), "not one run, top to bottom"
    assert _errors(notebook) == []
    for cell in cells:
        assert "Traceback" not in _stream_text(cell, "stderr")
    settings = [re.search(r"settings: (\w+)", _stream_text(cell)) for cell in cells]
    settings = [match.group(1) for match in settings if match]
    assert settings == ["full"], "stored outputs must come from the full settings"
    assert len(_images(notebook)) >= 1, "no plot in the stored outputs"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES


def test_stored_notebooks_stay_small():
    assert sum(p.stat().st_size for p in NOTEBOOKS) < MAX_TOTAL_BYTES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_colab_link_and_install_cell(path):
    notebook = nbformat.read(path, as_version=4)
    title = notebook.cells[0]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert f"/blob/main/notebooks/{path.name})" in title.source
    install = _code_cells(notebook)[0]
    # The badge and the install cell are written from pyproject.toml (tests/test_links.py).
    assert "tools/sync_links.py" in install.source
    assert 'REQUIREMENT = "keras-safe[' in install.source
    # Here keras_safe is importable: the stored run installed nothing.
    assert "already installed: nothing to install" in _stream_text(install)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_seed_in_the_dp_path(path):
    """DP optimizers and Poisson batches take their seeds from the OS in every notebook."""
    notebook = nbformat.read(path, as_version=4)
    seeded = []
    for cell in _code_cells(notebook):
        for node in ast.walk(ast.parse(_python_source(cell.source))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in DP_CALLS and any(k.arg == "seed" for k in node.keywords):
                seeded.append(ast.unparse(node)[:80])
    assert seeded == []


# -- what the stored outputs must show -----------------------------------------------------------

# Every DP model with a budget prints its ledger in this form (notebooks 1, 3, 4 and 5).
LEDGER_LINE = re.compile(
    r"^privacy ledger: epsilon (\S+) at delta (\S+) after (\d+) steps \(budget (\S+)\)$", re.M
)
# A ledger's statement (`ledger.statement()`) quotes its steps and epsilon in this line.
STATEMENT_LINE = re.compile(r"^ +epsilon spent after (\d+) steps: (\S+)$", re.M)
# The membership attacks of notebooks 1, 3 and 4, per model.
ATTACK_LINE = re.compile(
    r"^ *(plain|DP-SGD), (\w+)(?: attack)? *: AUC (\S+), TPR at 1% FPR ([\d.]+)", re.M
)
LEDGER_NOTEBOOKS = ["01", "03", "04", "05", "07"]
MEMBERSHIP_NOTEBOOKS = ["01", "03", "04"]


def _printed(notebook):
    return "\n".join(_stream_text(cell) for cell in _code_cells(notebook))


def ledger_problems(notebook):
    """Ledger lines over their budget, and ledger statements whose steps or epsilon differ
    from the ledger line printed beside them (to the last printed digit)."""
    printed = _printed(notebook)
    lines = LEDGER_LINE.findall(printed)
    problems = [] if lines else ["no ledger line printed"]
    for epsilon, _, steps, budget in lines:
        if float(epsilon) > float(budget):
            problems.append(f"epsilon {epsilon} after {steps} steps is over the budget {budget}")
    for steps, epsilon in STATEMENT_LINE.findall(printed):
        digits = len(epsilon.split(".")[-1])
        if not any(s == steps and f"{float(e):.{digits}f}" == epsilon for e, _, s, _ in lines):
            problems.append(f"statement: epsilon {epsilon} after {steps} steps, not the ledger's")
    return problems


def membership_problems(notebook):
    """LiRA must find the plain model's training examples clearly more often than the DP
    model's: a TPR at 1% FPR at least 3% and 2.5 times the DP model's (or guessing, 1%), and
    an AUC at least 0.05 higher."""
    figures = {
        (model, attack): (float(auc), float(tpr))
        for model, attack, auc, tpr in ATTACK_LINE.findall(_printed(notebook))
    }
    plain, dp = figures.get(("plain", "lira_online")), figures.get(("DP-SGD", "lira_online"))
    if plain is None or dp is None:
        return ["no LiRA figures for both models"]
    problems = []
    if plain[1] < 0.03 or plain[1] < 2.5 * max(dp[1], 0.01):
        problems.append(f"TPR at 1% FPR: plain {plain[1]}, DP-SGD {dp[1]}")
    if plain[0] < dp[0] + 0.05:
        problems.append(f"AUC: plain {plain[0]}, DP-SGD {dp[0]}")
    return problems


def inf_legend_problems(notebook):
    """A printed audit table with `inf` in it is followed by a markdown cell explaining `inf`."""
    problems = []
    for index, cell in enumerate(notebook.cells):
        text = _stream_text(cell) if cell.cell_type == "code" else ""
        if "eps_est" in text and re.search(r"\binf\b", text):
            following = notebook.cells[index + 1] if index + 1 < len(notebook.cells) else None
            if (
                following is None
                or following.cell_type != "markdown"
                or "`inf`" not in (following.source)
            ):
                problems.append(f"cell {index}: an audit table with inf and no legend after it")
    return problems


def _stored(prefix):
    return nbformat.read(next(p for p in NOTEBOOKS if p.name.startswith(prefix)), as_version=4)


@pytest.mark.parametrize("prefix", LEDGER_NOTEBOOKS)
def test_stored_ledgers_stay_within_budget_and_statements_agree(prefix):
    assert ledger_problems(_stored(prefix)) == []


@pytest.mark.parametrize("prefix", MEMBERSHIP_NOTEBOOKS)
def test_stored_membership_attack_shows_what_dp_changes(prefix):
    assert membership_problems(_stored(prefix)) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_audit_tables_with_inf_have_a_legend(path):
    assert inf_legend_problems(nbformat.read(path, as_version=4)) == []


def _replace_output(notebook, old, new):
    """A copy of `notebook` with `old` replaced by `new` in its printed outputs."""
    notebook = copy.deepcopy(notebook)
    found = 0
    for cell in _code_cells(notebook):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and old in output.get("text", ""):
                output["text"] = output["text"].replace(old, new)
                found += 1
    assert found, f"{old!r} is not in the outputs"
    return notebook


def test_output_checks_catch_a_changed_figure():
    quickstart = _stored("01")
    printed = _printed(quickstart)
    epsilon, _, steps, budget = LEDGER_LINE.findall(printed)[0]
    over = f"{float(budget) + 0.01:.4f}"
    assert (
        len(
            ledger_problems(
                _replace_output(quickstart, f"epsilon {epsilon} at", f"epsilon {over} at")
            )
        )
        == 2
    )
    statement = f"epsilon spent after {steps} steps: {epsilon}"
    assert ledger_problems(_replace_output(quickstart, statement, statement[:-1] + "9")) == [
        f"statement: epsilon {epsilon[:-1]}9 after {steps} steps, not the ledger's"
    ]
    (line,) = [
        m.group(0)
        for m in ATTACK_LINE.finditer(printed)
        if m.group(1, 2) == ("DP-SGD", "lira_online")
    ]
    auc, tpr = ATTACK_LINE.match(line).group(3, 4)
    leaky = line.replace(f"AUC {auc}", "AUC 0.700").replace(f"FPR {tpr}", "FPR 0.500")
    assert len(membership_problems(_replace_output(quickstart, line, leaky))) == 2
    audit = _stored("03")
    table = next(i for i, c in enumerate(audit.cells) if "eps_est" in _stream_text(c))
    assert "`inf`" in audit.cells[table + 1].source
    audit.cells[table + 1].source = audit.cells[table + 1].source.replace("`inf`", "infinity")
    assert len(inf_legend_problems(audit)) == 1


def test_seed_check_finds_a_seeded_call():
    source = "b = keras_safe.privacy.poisson_batches(x, y, batch_size=8, seed=0)\n%pip list"
    calls = [
        node
        for node in ast.walk(ast.parse(_python_source(source)))
        if isinstance(node, ast.Call) and any(k.arg == "seed" for k in node.keywords)
    ]
    assert len(calls) == 1 and calls[0].func.attr in DP_CALLS


def test_tensorboard_extra():
    """Notebook 4's TensorBoard callback: TensorFlow 2.21 no longer installs TensorBoard."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["tensorboard"] == ["tensorboard"]
    assert (
        "keras-safe[audit,tensorboard]" in (NOTEBOOK_DIR / "04_existing_script.ipynb").read_text()
    )


def test_runner_refuses_small_settings_in_place(capsys):
    runner = _load_runner()
    with pytest.raises(SystemExit):
        runner.main(["--fast"])
    assert "--fast needs --output" in capsys.readouterr().err


def test_runner_kernel_environment():
    runner = _load_runner()
    fast, full = runner.kernel_environment(True), runner.kernel_environment(False)
    assert fast["KERAS_SAFE_FAST"] == "1" and "KERAS_SAFE_FAST" not in full
    assert "MPLBACKEND" not in fast  # figures reach the outputs through the inline backend
    assert fast["KERAS_SAFE_HEADLESS"] == "1"
    assert str(ROOT) in fast["PYTHONPATH"].split(os.pathsep)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_with_small_settings(path, tmp_path):
    """Runs top to bottom, offline, with the small settings, in time, leaving the stored one."""
    runner = _load_runner()
    stored = path.read_bytes()
    start = time.perf_counter()
    executed, _ = runner.execute_notebook(path, fast=True, output=tmp_path / path.name)
    seconds = time.perf_counter() - start
    assert path.read_bytes() == stored
    assert _errors(executed) == []
    printed = "".join(_stream_text(cell) for cell in _code_cells(executed))
    assert "settings: fast" in printed
    assert "already installed: nothing to install" in printed
    assert all(cell.execution_count for cell in _code_cells(executed))
    assert seconds < FAST_LIMIT_S, f"{path.name} took {seconds:.0f} s with the small settings"


def test_runner_lists_readme_figures_that_changed(tmp_path, monkeypatch, capsys):
    """After a run in place, run_all.py reports README figures the new outputs no longer match."""
    runner = _load_runner()
    assert runner.report_readme_figures() == []
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "tools").mkdir()
    readme = (ROOT / "README.md").read_text()
    figure = re.search(r"(\d\.\d+)<!-- figure: notebooks/", readme)
    changed = f"{float(figure.group(1)) + 0.07:.{len(figure.group(1)) - 2}f}"
    (tmp_path / "README.md").write_text(
        readme[: figure.start()] + changed + readme[figure.end(1) :]
    )
    for source in set(re.findall(r"figure(?:-block)?: (\S+?)#", readme)):
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / source).write_bytes((ROOT / source).read_bytes())
    (tmp_path / "tools" / "readme_figures.py").write_bytes(
        (ROOT / "tools" / "readme_figures.py").read_bytes()
    )
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    assert len(runner.report_readme_figures()) == 1
    assert "README figure to update: " in capsys.readouterr().out
