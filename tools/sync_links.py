"""Writes the repository's URL, from `pyproject.toml` only, into the README and the notebooks.

    python tools/sync_links.py           # rewrite what disagrees with [project.urls] Repository
    python tools/sync_links.py --check   # list what disagrees; exit status 1 if anything does

The URL is written once, as `Repository` in `[project.urls]` of `pyproject.toml`. From it come:
- the README's "Open In Colab" badges, one per notebook;
- each notebook's Colab badge (in its first markdown cell);
- each notebook's first code cell, the install cell: it installs `keras-safe` (with the extras the
  notebook needs) from the package index, falls back to `pip install "keras-safe[...] @
  git+<repository>"`, and prints which it used; where keras_safe is importable it does nothing.

Only the sources of those cells change: stored outputs are kept (the install cell prints the
same line where keras_safe is installed, as in every stored run).
"""

import argparse
import pathlib
import re
import sys

import nbformat

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BRANCH = "main"
COLAB = "https://colab.research.google.com/github"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
# A Colab link to one of the notebooks, whatever repository it names now.
COLAB_LINK = re.compile(
    r"https://colab\.research\.google\.com/github/[^/\s)]+/[^/\s)]+/blob/[^/\s)]+/notebooks/"
    r"(?P<name>[\w.-]+\.ipynb)"
)
OWNER_NOTE = re.compile(r"\n?<!-- OWNER:[^>]*-->")
EXTRAS = re.compile(r"keras[-_]safe\[(?P<extras>[\w,]+)\]")
DEFAULT_EXTRAS = "audit"

INSTALL_CELL = """\
# Colab: install keras-safe from the package index, or from its repository where the index has
# none; nothing happens where keras_safe is already importable. Written by tools/sync_links.py.
import importlib.util
import subprocess
import sys

REQUIREMENT = "keras-safe[{extras}]"
REPOSITORY = "{repository}"


def pip_install(requirement):
    command = [sys.executable, "-m", "pip", "install", "-q", requirement]
    return subprocess.run(command).returncode == 0


if importlib.util.find_spec("keras_safe") is not None:
    print("keras_safe is already installed: nothing to install")
elif pip_install(REQUIREMENT):
    print(f"installed {{REQUIREMENT}} from the package index")
elif pip_install(f"{{REQUIREMENT}} @ git+{{REPOSITORY}}"):
    print(f"installed {{REQUIREMENT}} from {{REPOSITORY}} (not on the package index)")
else:
    raise RuntimeError(f"could not install {{REQUIREMENT}}: see pip's messages above")"""


def repository_url(root=ROOT):
    """The `Repository` URL of `[project.urls]` in `pyproject.toml`, without a trailing slash."""
    pyproject = tomllib.loads((pathlib.Path(root) / "pyproject.toml").read_text())
    url = pyproject["project"]["urls"]["Repository"].rstrip("/")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"[project.urls] Repository must be https://github.com/OWNER/NAME: {url}")
    return url


def colab_link(repository, notebook_name):
    """The Colab URL that opens `notebooks/<notebook_name>` of `repository`."""
    path = repository.removeprefix("https://github.com/")
    return f"{COLAB}/{path}/blob/{BRANCH}/notebooks/{notebook_name}"


def colab_badge(repository, notebook_name):
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_link(repository, notebook_name)})"


def install_cell(repository, extras=DEFAULT_EXTRAS):
    """The source of a notebook's first code cell."""
    return INSTALL_CELL.format(repository=repository, extras=extras)


def readme_text(text, repository):
    """The README with every notebook's Colab link pointing at `repository`."""
    return COLAB_LINK.sub(lambda m: colab_link(repository, m.group("name")), text)


def notebook_cells(notebook, name, repository):
    """Sets the Colab badge of the first markdown cell and the install cell, in place."""
    title = notebook.cells[0]
    if title.cell_type != "markdown":
        raise ValueError(f"{name}: the first cell must be the title (markdown)")
    source = OWNER_NOTE.sub("", title.source)
    if COLAB_LINK.search(source):
        source = COLAB_LINK.sub(lambda m: colab_link(repository, name), source)
    else:  # no badge yet: one under the title
        heading, _, rest = source.partition("\n")
        source = f"{heading}\n\n{colab_badge(repository, name)}\n{rest}"
    title.source = source
    install = next(cell for cell in notebook.cells if cell.cell_type == "code")
    found = EXTRAS.search(install.source)
    install.source = install_cell(repository, found.group("extras") if found else DEFAULT_EXTRAS)
    return notebook


def notebooks(root=ROOT):
    return sorted((pathlib.Path(root) / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def sync(root=ROOT, check=False):
    """Brings the README and the notebooks in line with the repository URL.

    Args:
        root: the repository's root folder.
        check: only report; write nothing.

    Returns:
        The paths (relative to `root`) that disagreed with the URL (and, unless `check`, were
        rewritten).
    """
    root = pathlib.Path(root)
    repository = repository_url(root)
    changed = []
    readme = root / "README.md"
    text = readme.read_text()
    if readme_text(text, repository) != text:
        changed.append("README.md")
        if not check:
            readme.write_text(readme_text(text, repository))
    for path in notebooks(root):
        stored = path.read_text()
        notebook = nbformat.reads(stored, as_version=4)
        notebook_cells(notebook, path.name, repository)
        updated = nbformat.writes(notebook) + "\n"
        if updated != stored:
            changed.append(str(path.relative_to(root)))
            if not check:
                path.write_text(updated)
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report only, exit 1 on changes")
    parser.add_argument("--root", default=str(ROOT), help="repository root (default: this one)")
    args = parser.parse_args(argv)
    changed = sync(args.root, check=args.check)
    verb = "disagree with" if args.check else "rewritten from"
    for path in changed:
        print(f"{path}: {verb} {repository_url(args.root)}")
    if not changed:
        print(f"README.md and notebooks agree with {repository_url(args.root)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
