"""The examples in docstrings and in the README run as written."""

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import keras_safe

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(keras_safe.__path__, "keras_safe.")
    if name not in ("keras_safe.__main__",)
)
README_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_module_is_found():
    assert "keras_safe.privacy.per_example" in MODULES and len(MODULES) > 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(README_BLOCKS)))
def test_readme_examples(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = README_BLOCKS[index]
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
