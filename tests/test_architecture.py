"""The layering ARCHITECTURE.md describes, enforced on the source (read with `ast`, nothing
imported): no import cycles, imports that go down the layers drawn in its "Layers" section,
package imports at module level (`cli.py` alone defers one), never `keras.src` or
`tensorflow.python`; every public name documented and exported by one public package (or listed
as an alias in ARCHITECTURE.md); every path ARCHITECTURE.md names exists.

Each check is a function of a source tree, run on the repository and, to show it can fail, on a
small tree written to a temporary folder with the fault it must find.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "keras_safe"

# Modules that may import a keras_safe module inside a function: the command line defers the
# demo (it needs TensorFlow and the `audit` extra; `--help` and `epsilon` must start without it).
FUNCTION_LOCAL_IMPORTS = {"keras_safe/cli.py"}
# Modules that may import keras_safe modules by name at run time (`importlib.import_module`):
# the lazy package (PEP 562), the loader of every subpackage, and the entry points that
# `keras_safe.privacy` exports from the layer above it (ARCHITECTURE.md, "Layers").
DYNAMIC_IMPORTS = {
    "keras_safe/__init__.py",
    "keras_safe/_backend.py",
    "keras_safe/privacy/__init__.py",
}
# The public packages: keras_safe's subpackages (`_backend.SUBPACKAGES`, `keras_safe.__all__`)
# and the one nested package users write with (the forms of a per-example rule).
NESTED_PUBLIC = ("keras_safe.privacy.per_example",)
PRIVATE_PREFIXES = ("keras.src", "tensorflow.python")
SOURCE_FOLDERS = (PACKAGE, "tests", "benchmarks", "tools", "examples", "notebooks")


# -- reading a source tree ---------------------------------------------------------------------


def modules(root):
    """`{dotted name: path}` of every module of the package under `root`."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _function_local(tree):
    """The ids of the nodes that sit inside a function (or lambda) of `tree`."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def imports(name, path, known):
    """`(target module, line, function_local)` for each keras_safe import in module `name`.

    `from a.b import c` imports `a.b.c` when that is a module, else `a.b`; relative imports are
    resolved against `name`.
    """
    tree = ast.parse(path.read_text())
    local = _function_local(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in known:
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno, id(node) in local))
    return found


def import_graph(root):
    known = modules(root)
    return {
        name: sorted({t for t, _, _ in imports(name, path, known) if t != name})
        for name, path in known.items()
    }


def unit(module):
    """The part of the package a module belongs to: `keras_safe.privacy.ledger` -> `privacy`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def layer_rows(root):
    """The rows of the diagram in ARCHITECTURE.md's "Layers" section, top first: each a list of
    units (`callbacks/` -> `callbacks`, `cli.py` -> `cli`)."""
    text = (root / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    diagram = section.split("```", 2)[1]
    rows = []
    for line in diagram.splitlines():
        names = []
        for token in re.split(r"\s{2,}", line.strip()):
            match = re.fullmatch(r"(\w+)(/|\.py)", token)
            if not match:
                break
            names.append(match.group(1))
        if names:
            rows.append(names)
    return rows


def ranks(root):
    """`{unit: rank}`, the bottom row 0; the package's `__init__` above every row (it imports
    only `_backend` and `_version`, see `test_package_init_imports_no_subpackage`)."""
    rows = layer_rows(root)
    found = {name: len(rows) - 1 - i for i, row in enumerate(rows) for name in row}
    found[PACKAGE] = len(rows)
    return found


# -- checks: each returns a list of problems ---------------------------------------------------


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def unplaced_units(root):
    """Units of the package missing from the diagram, and names in it that are no unit."""
    units = {unit(m) for m in modules(root)} - {PACKAGE}
    rows = layer_rows(root)
    drawn = [name for row in rows for name in row]
    problems = [f"{u} is in no row of the Layers diagram" for u in sorted(units - set(drawn))]
    problems += [f"{n} is drawn but is no module or package" for n in sorted(set(drawn) - units)]
    problems += [f"{n} is drawn twice" for n in sorted({n for n in drawn if drawn.count(n) > 1})]
    return problems


def upward_imports(root):
    """Imports of a unit on the same row or a row above (the package `__init__` counts as the
    top)."""
    rank = ranks(root)
    known = modules(root)
    problems = []
    for name, path in known.items():
        source = unit(name)
        for target, line, _ in imports(name, path, known):
            goal = unit(target)
            if goal == source or source not in rank or goal not in rank:
                continue
            if rank[goal] >= rank[source]:
                where = "the same row as" if rank[goal] == rank[source] else "a row above"
                problems.append(
                    f"{path.relative_to(root)}:{line} imports {target}, on {where} {source}"
                )
    return problems


def local_imports(root):
    """keras_safe imports inside functions, and `importlib.import_module` / `__import__` calls,
    outside the modules allowed them."""
    known = modules(root)
    problems = []
    for name, path in known.items():
        rel = path.relative_to(root).as_posix()
        if rel not in FUNCTION_LOCAL_IMPORTS:
            for target, line, local in imports(name, path, known):
                if local:
                    problems.append(f"{rel}:{line} imports {target} inside a function")
        if rel not in DYNAMIC_IMPORTS:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                    "importlib.import_module",
                    "import_module",
                    "__import__",
                ):
                    problems.append(f"{rel}:{node.lineno} imports a module by name at run time")
    return problems


def private_imports(root, folders=SOURCE_FOLDERS):
    """Imports of `keras.src` or `tensorflow.python`, in any spelling ast can see."""
    problems = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if ".venv" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Call) and node.args:
                    first = node.args[0]
                    if isinstance(first, ast.Constant) and isinstance(first.value, str):
                        if ast.unparse(node.func).endswith(("import_module", "__import__")):
                            names = [first.value]
                for n in names:
                    if any(n == p or n.startswith(p + ".") for p in PRIVATE_PREFIXES):
                        problems.append(f"{path.relative_to(root)}:{node.lineno} imports {n}")
    return problems


# -- public names ------------------------------------------------------------------------------


def _module_path(root, module):
    base = root.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _tree(root, module):
    return ast.parse(_module_path(root, module).read_text())


def _literal(tree, name):
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return ast.literal_eval(node.value)
    return None


def public_packages(root):
    subpackages = _literal(_tree(root, "keras_safe._backend"), "SUBPACKAGES")
    nested = [p for p in NESTED_PUBLIC if _module_path(root, p).exists()]
    return [f"{PACKAGE}.{name}" for name in subpackages] + nested


def definition(root, module, name):
    """`(defining module, docstring)` of `module.name`, following re-exports (`from x import`),
    submodules and the lazy `ENTRY_POINTS` of a package; `(None, None)` where it is not found.

    A constant's docstring is the string literal right after its assignment (as Sphinx reads
    it)."""
    tree = _tree(root, module)
    for i, node in enumerate(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == name:
                return module, ast.get_docstring(node)
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            after = tree.body[i + 1] if i + 1 < len(tree.body) else None
            doc = None
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                doc = after.value.value if isinstance(after.value.value, str) else None
            return module, doc
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    sub = f"{node.module}.{alias.name}"
                    if _module_path(root, sub).exists():
                        return sub, ast.get_docstring(_tree(root, sub))
                    return definition(root, node.module, alias.name)
    lazy = _literal(tree, "ENTRY_POINTS") or {}
    if name in lazy:
        return definition(root, lazy[name], name)
    sub = f"{module}.{name}"
    if _module_path(root, sub).exists():
        return sub, ast.get_docstring(_tree(root, sub))
    return None, None


def undocumented(root):
    problems = []
    for package in public_packages(root):
        for name in _literal(_tree(root, package), "__all__") or []:
            where, doc = definition(root, package, name)
            if where is None:
                problems.append(f"{package}.{name} is in __all__ but defined nowhere")
            elif not (doc or "").strip():
                problems.append(f"{package}.{name} (defined in {where}) has no docstring")
    return problems


def documented_aliases(root):
    """`{(package, name)}` listed in ARCHITECTURE.md's table of aliases (rows starting
    "| `keras_safe.x.Name` |")."""
    text = (root / "ARCHITECTURE.md").read_text()
    section = text.split("\n### Public names exported twice", 1)
    if len(section) < 2:
        return set()
    rows = re.findall(r"^\| `(keras_safe[\w.]*)\.(\w+)` \|", section[1].split("\n## ")[0], re.M)
    return set(rows)


def exported_twice(root):
    aliases = documented_aliases(root)
    exporters = {}
    for package in public_packages(root):
        for name in _literal(_tree(root, package), "__all__") or []:
            exporters.setdefault(name, []).append(package)
    problems = []
    for name, packages in sorted(exporters.items()):
        if len(packages) > 1:
            unlisted = [p for p in packages if (p, name) not in aliases]
            if len(unlisted) > 1:
                problems.append(f"{name} is exported by {', '.join(packages)}")
    return problems


def missing_paths(root):
    """Paths that ARCHITECTURE.md names in backticks (`x/y.py`, `dir/`, `name.py`) and the tree
    lacks. A path with a slash is looked up from the repository, `keras_safe/` and `tests/`; a
    bare file name anywhere in the repository's source folders."""
    text = (root / "ARCHITECTURE.md").read_text()
    folders = [root / f for f in SOURCE_FOLDERS if (root / f).is_dir()]
    problems = []
    for token in sorted(set(re.findall(r"`([\w./-]+(?:\.py|/|\.md|\.json|\.toml))`", text))):
        name = token.rstrip("/")
        if "/" in name:
            found = any((base / token).exists() for base in (root, root / PACKAGE, root / "tests"))
        else:
            found = (root / name).exists() or any(
                p.is_dir() == token.endswith("/") for f in folders for p in f.rglob(name)
            )
        if not found:
            problems.append(token)
    return problems


# -- the checks on this repository --------------------------------------------------------------


def test_every_unit_is_drawn_once_in_the_layers_diagram():
    assert len(layer_rows(ROOT)) >= 8
    assert unplaced_units(ROOT) == []


def test_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_imports_go_down_the_layers():
    assert upward_imports(ROOT) == []


def test_package_imports_are_module_level():
    assert local_imports(ROOT) == []


def test_package_init_imports_no_subpackage():
    known = modules(ROOT)
    found = {t for t, _, _ in imports(PACKAGE, known[PACKAGE], known)}
    assert found == {"keras_safe._backend", "keras_safe._version"}


def test_no_private_keras_or_tensorflow_imports():
    assert private_imports(ROOT) == []


def test_entry_points_are_imported_from_training():
    # keras_safe.privacy exports make_private and dp_gradients from the layer above it; the
    # package's own modules import them where they are defined.
    entry_points = _literal(_tree(ROOT, "keras_safe.privacy"), "ENTRY_POINTS")
    assert set(entry_points) == {"make_private", "dp_gradients"}
    offenders = []
    for name, path in modules(ROOT).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "keras_safe.privacy":
                offenders += [f"{name}: {a.name}" for a in node.names if a.name in entry_points]
    assert offenders == []


def test_public_names_are_documented():
    assert len(public_packages(ROOT)) == 11
    assert undocumented(ROOT) == []


def test_public_names_are_exported_once():
    assert exported_twice(ROOT) == []


def test_architecture_md_counts_the_public_names():
    names = [
        name
        for package in public_packages(ROOT)
        for name in _literal(_tree(ROOT, package), "__all__") or []
    ]
    text = (ROOT / "ARCHITECTURE.md").read_text()
    stated = re.search(r"(\d+) public names in all\s+\((\d+) exports", text)
    assert stated and (int(stated.group(1)), int(stated.group(2))) == (len(set(names)), len(names))


def test_documented_aliases_exist():
    for package, name in documented_aliases(ROOT):
        assert name in _literal(_tree(ROOT, package), "__all__"), (package, name)


def test_paths_named_in_architecture_md_exist():
    assert missing_paths(ROOT) == []


def test_test_folders_mirror_the_package():
    # ARCHITECTURE.md, "Tests": tests/<package>/ holds the tests of keras_safe/<package>/.
    folders = {p.parent.relative_to(ROOT / "tests") for p in (ROOT / "tests").rglob("test_*.py")}
    strays = [f for f in folders if f.parts and not (ROOT / PACKAGE / f / "__init__.py").exists()]
    assert strays == []


def test_every_rule_file_has_its_test_module():
    # One test module per rule file, flat in tests/privacy/per_example/ (conv_kernel.py is
    # conv's form, tested in test_conv.py; base.py is the contract every rule test exercises).
    rules = ROOT / PACKAGE / "privacy" / "per_example" / "rules"
    tests = ROOT / "tests" / "privacy" / "per_example"
    lacking = [
        path.name
        for path in sorted(rules.glob("*.py"))
        if path.stem not in ("__init__", "base", "conv_kernel")
        and not (tests / f"test_{path.stem}.py").exists()
    ]
    assert len(list(rules.glob("*.py"))) >= 10 and lacking == []


# -- the checks fail where they must: a small tree with each fault ------------------------------

ARCHITECTURE = """# x

## Layers

```
  cli.py                  entry
        |
  top/                    the top
        |
  side/                   re-exports a name of mid
        |
  mid/   other/           two packages on one row
        |
  _base.py                helpers
```

### Public names exported twice (aliases)

| alias | of |
|---|---|
| `keras_safe.side.shared` | `keras_safe.mid.shared` |

## Where a new piece goes

- `mid/a.py` and `missing.py`.
"""

CLEAN = {
    "__init__.py": '"""p"""\nfrom keras_safe import _backend\n',
    "_backend.py": 'SUBPACKAGES = ("top", "mid", "side")\n',
    "_base.py": "X = 1\n",
    "cli.py": "def main():\n    from keras_safe import top  # noqa\n",
    "top/__init__.py": '__all__ = ["run"]\nfrom keras_safe.top.a import run\n',
    "top/a.py": 'import keras_safe.mid.a\n\n\ndef run():\n    """Runs."""\n',
    "mid/__init__.py": '__all__ = ["shared"]\nfrom keras_safe.mid.a import shared\n',
    "mid/a.py": 'from keras_safe import _base\n\n\ndef shared():\n    """Shared."""\n',
    "side/__init__.py": '__all__ = ["shared"]\nfrom keras_safe.mid.a import shared\n',
    "other/__init__.py": "",
}


def _tree_with(tmp_path, changes=(), architecture=ARCHITECTURE):
    files = dict(CLEAN)
    files.update(changes)
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "ARCHITECTURE.md").write_text(architecture)
    return tmp_path


def test_checks_pass_on_a_clean_tree(tmp_path):
    root = _tree_with(tmp_path)
    assert layer_rows(root) == [["cli"], ["top"], ["side"], ["mid", "other"], ["_base"]]
    assert unplaced_units(root) == ["_backend is in no row of the Layers diagram"]
    assert cycles(import_graph(root)) == []
    assert upward_imports(root) == []
    assert local_imports(root) == []
    assert undocumented(root) == []
    assert exported_twice(root) == []
    assert missing_paths(root) == ["missing.py"]


def test_a_cycle_is_found(tmp_path):
    root = _tree_with(tmp_path, {"mid/b.py": "import keras_safe.mid.a\n"})
    (root / PACKAGE / "mid" / "a.py").write_text("from keras_safe.mid import b\n")
    assert cycles(import_graph(root)) == [["keras_safe.mid.a", "keras_safe.mid.b"]]


def test_upward_and_sideways_imports_are_found(tmp_path):
    root = _tree_with(
        tmp_path,
        {"_base.py": "from keras_safe.mid import a\n", "other/b.py": "import keras_safe.mid\n"},
    )
    assert upward_imports(root) == [
        "keras_safe/_base.py:1 imports keras_safe.mid.a, on a row above _base",
        "keras_safe/other/b.py:1 imports keras_safe.mid, on the same row as other",
    ]


def test_an_undrawn_unit_is_found(tmp_path):
    root = _tree_with(tmp_path, {"extra.py": "Y = 2\n"})
    assert "extra is in no row of the Layers diagram" in unplaced_units(root)


def test_function_local_and_dynamic_imports_are_found(tmp_path):
    root = _tree_with(
        tmp_path,
        {
            "mid/b.py": "def f():\n    import keras_safe._base\n",
            "top/b.py": "import importlib\nimportlib.import_module('keras_safe.mid')\n",
        },
    )
    assert local_imports(root) == [
        "keras_safe/mid/b.py:2 imports keras_safe._base inside a function",
        "keras_safe/top/b.py:2 imports a module by name at run time",
    ]


def test_private_imports_are_found(tmp_path):
    root = _tree_with(
        tmp_path,
        {
            "mid/b.py": "from keras import src\n",
            "mid/c.py": "import tensorflow.python.ops as ops\n",
            "mid/d.py": "import importlib\nimportlib.import_module('keras.src.layers')\n",
        },
    )
    assert private_imports(root, folders=(PACKAGE,)) == [
        "keras_safe/mid/b.py:1 imports keras.src",
        "keras_safe/mid/c.py:1 imports tensorflow.python.ops",
        "keras_safe/mid/d.py:2 imports keras.src.layers",
    ]


def test_an_undocumented_public_name_is_found(tmp_path):
    root = _tree_with(
        tmp_path,
        {
            "top/__init__.py": '__all__ = ["run", "GONE", "LIMIT"]\n'
            "from keras_safe.top.a import run\nLIMIT = 3\n",
            "top/a.py": "def run():\n    return 1\n",
        },
    )
    assert undocumented(root) == [
        "keras_safe.top.run (defined in keras_safe.top.a) has no docstring",
        "keras_safe.top.GONE is in __all__ but defined nowhere",
        "keras_safe.top.LIMIT (defined in keras_safe.top) has no docstring",
    ]


def test_a_second_export_is_found_unless_listed_as_an_alias(tmp_path):
    root = _tree_with(tmp_path, architecture=ARCHITECTURE.replace("keras_safe.side.shared", "x.y"))
    assert exported_twice(root) == ["shared is exported by keras_safe.mid, keras_safe.side"]


@pytest.mark.parametrize("missing", ["`mid/gone.py`", "`gone/`", "`gone.py`"])
def test_a_missing_path_is_found(tmp_path, missing):
    root = _tree_with(tmp_path, architecture=ARCHITECTURE + f"\n{missing}\n")
    assert missing.strip("`") in missing_paths(root)
