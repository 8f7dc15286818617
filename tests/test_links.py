"""The repository's URL lives in pyproject.toml only; the README and the notebooks agree with it."""

import importlib.util
import pathlib
import re
import shutil
import subprocess

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _load_tool():
    spec = importlib.util.spec_from_file_location("sync_links", ROOT / "tools" / "sync_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sync_links = _load_tool()
REPOSITORY = sync_links.repository_url(ROOT)


def _copy(tmp_path):
    """README, pyproject.toml and the notebooks in a scratch folder."""
    (tmp_path / "notebooks").mkdir()
    for name in ("README.md", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    for path in NOTEBOOKS:
        shutil.copy2(path, tmp_path / "notebooks" / path.name)
    return tmp_path


def test_readme_and_notebooks_agree_with_the_repository_url():
    assert sync_links.sync(ROOT, check=True) == [], "run: python tools/sync_links.py"


def test_every_notebook_has_a_readme_badge_and_its_own():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        link = f"https://colab.research.google.com/github/{REPOSITORY[19:]}/blob/main/notebooks/"
        assert f"]({link}{path.name})" in readme
        notebook = nbformat.read(path, as_version=4)
        assert f"]({link}{path.name})" in notebook.cells[0].source
    # Every Colab link in the README is a notebook's badge, and every one names the repository.
    links = sync_links.COLAB_LINK.findall(readme)
    assert sorted(links) == [p.name for p in NOTEBOOKS]
    assert "OWNER" not in readme


def test_the_url_is_written_in_pyproject_only():
    """No other tracked text file names the repository: everything else is generated from it."""
    owner_and_name = REPOSITORY.removeprefix("https://github.com/")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    generated = {"README.md", *(f"notebooks/{p.name}" for p in NOTEBOOKS), "pyproject.toml"}
    naming = [
        name
        for name in tracked
        if name not in generated
        and pathlib.Path(ROOT, name).is_file()
        and pathlib.Path(ROOT, name).suffix in (".py", ".md", ".toml", ".cfg", ".yml", ".ipynb")
        and owner_and_name in pathlib.Path(ROOT, name).read_text(errors="replace")
    ]
    assert naming == []


def test_changing_the_url_in_pyproject_is_caught_and_synced(tmp_path):
    root = _copy(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(REPOSITORY, "https://github.com/a-b/c_d"))
    expected = ["README.md", *(f"notebooks/{p.name}" for p in NOTEBOOKS)]
    assert sync_links.sync(root, check=True) == expected
    assert sync_links.sync(root) == expected  # rewrites them
    assert sync_links.sync(root, check=True) == []
    readme = (root / "README.md").read_text()
    assert readme.count("colab.research.google.com/github/a-b/c_d/blob/main/notebooks/") == len(
        NOTEBOOKS
    )
    for path in NOTEBOOKS:
        notebook = nbformat.read(root / "notebooks" / path.name, as_version=4)
        install = next(cell for cell in notebook.cells if cell.cell_type == "code")
        assert 'REPOSITORY = "https://github.com/a-b/c_d"' in install.source
        stored = nbformat.read(path, as_version=4)
        # Only the two generated cells change; the outputs stay.
        assert [c.get("outputs") for c in notebook.cells] == [
            c.get("outputs") for c in stored.cells
        ]


@pytest.mark.parametrize(
    "edit",
    ["readme_badge", "notebook_badge", "install_cell"],
)
def test_an_edited_link_is_caught(tmp_path, edit):
    root = _copy(tmp_path)
    if edit == "readme_badge":
        readme = root / "README.md"
        readme.write_text(readme.read_text().replace(REPOSITORY[19:], "someone/fork", 1))
        assert sync_links.sync(root, check=True) == ["README.md"]
        return
    path = root / "notebooks" / NOTEBOOKS[2].name
    notebook = nbformat.read(path, as_version=4)
    if edit == "notebook_badge":
        notebook.cells[0].source = notebook.cells[0].source.replace(REPOSITORY[19:], "x/y")
    else:
        install = next(cell for cell in notebook.cells if cell.cell_type == "code")
        install.source = install.source.replace("git+{REPOSITORY}", "git+https://elsewhere")
    nbformat.write(notebook, path)
    assert sync_links.sync(root, check=True) == [f"notebooks/{path.name}"]


def test_install_cell_extras_follow_the_notebook():
    sources = {
        path.name: next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for path in NOTEBOOKS
    }
    for name, cell in sources.items():
        extras = "audit,tensorboard" if name.startswith("04") else "audit"
        assert cell.source == sync_links.install_cell(REPOSITORY, extras)


class _Pip:
    """Stands in for pip: which requirements it was asked for, and which of them succeed."""

    def __init__(self, succeeds):
        self.succeeds, self.asked = succeeds, []

    def __call__(self, command, **kwargs):
        requirement = command[-1]
        self.asked.append(requirement)
        return subprocess.CompletedProcess(command, 0 if self.succeeds(requirement) else 1)


@pytest.mark.parametrize(
    "installed, index, repository, printed",
    [
        (True, True, True, "keras_safe is already installed: nothing to install"),
        (False, True, True, "installed keras-safe[audit] from the package index"),
        (False, False, True, "installed keras-safe[audit] from {url} (not on the package index)"),
        (False, False, False, None),
    ],
)
def test_install_cell_uses_the_index_then_the_repository(
    monkeypatch, capsys, installed, index, repository, printed
):
    """The install cell run as Colab would, with pip and the installed packages simulated."""
    pip = _Pip(lambda requirement: repository if "git+" in requirement else index)
    monkeypatch.setattr(subprocess, "run", pip)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (real_find_spec(name) if installed else None)
            if name == "keras_safe"
            else real_find_spec(name, *a)
        ),
    )
    source = sync_links.install_cell(REPOSITORY)
    if printed is None:
        with pytest.raises(RuntimeError, match=re.escape("could not install keras-safe[audit]")):
            exec(source, {"__name__": "__cell__"})
    else:
        exec(source, {"__name__": "__cell__"})
        assert capsys.readouterr().out.strip() == printed.format(url=REPOSITORY)
    expected = [] if installed else ["keras-safe[audit]"]
    if not installed and not index:
        expected.append(f"keras-safe[audit] @ git+{REPOSITORY}")
    assert pip.asked == expected
