"""Loading keras_safe's Keras parts: the backend check first, then every part at once.

`keras_safe/__init__.py` imports no Keras and no TensorFlow, so that the command line and the
accounting start in a fraction of a second. Two things must still happen before Keras is used
with keras_safe, and `BackendGuard` (installed by `keras_safe/__init__.py` on `sys.meta_path`)
makes them happen whichever way a Keras-using part is reached (`import keras_safe.optimizers`,
`from keras_safe import privacy`, `keras_safe.privacy`):

- `check_backend()` runs before any module outside `KERAS_FREE` is imported: keras_safe runs on
  the TensorFlow backend of Keras 3 only, and says so with the fix.
- Once the first Keras-using subpackage has been imported, every other one is imported too
  (`load_all`), so that all of keras_safe's serializable classes are registered with Keras and
  `keras.saving.load_model` finds them. `import keras_safe` in a process that has already
  imported Keras does the same at once.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

__all__ = ["KERAS_FREE", "SUBPACKAGES", "BackendGuard", "check_backend", "install_guard"]

KERAS_FREE = frozenset(
    {"__main__", "_backend", "_registry", "_validation", "_version", "accounting", "cli"}
)
"""The modules directly under keras_safe that import neither Keras nor TensorFlow."""

SUBPACKAGES = (
    "accounting",
    "audit",
    "callbacks",
    "layers",
    "optimizers",
    "preprocessing",
    "privacy",
    "security",
    "testing",
    "training",
)
"""The public subpackages (and modules) of keras_safe, loaded on first use."""

_state = {"checked": False, "loading": False, "loaded": False, "depth": 0}


def check_backend():
    """Imports Keras and raises `ImportError` unless it runs on the TensorFlow backend.

    Raises:
        ImportError: Keras runs on another backend; the message names the fix
            (`KERAS_BACKEND=tensorflow`).

    Example:
        >>> check_backend()  # Keras on TensorFlow here: nothing happens
    """
    if _state["checked"]:
        return
    import keras  # noqa: PLC0415 - the first Keras import of keras_safe

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ImportError(
            "keras_safe supports the TensorFlow backend of Keras 3 only, but Keras is running on "
            f"the '{backend}' backend. Fix: set the environment variable KERAS_BACKEND=tensorflow "
            '(or remove it) before importing keras, or set "backend": "tensorflow" in '
            "~/.keras/keras.json."
        )
    _state["checked"] = True


def load_all():
    """Imports every subpackage of keras_safe (once): registers its serializable classes."""
    if _state["loaded"] or _state["loading"]:
        return
    check_backend()
    _state["loading"] = True
    try:
        for name in SUBPACKAGES:
            importlib.import_module(f"keras_safe.{name}")
        _state["loaded"] = True
    finally:
        _state["loading"] = False


class _LoadAllAfter(importlib.abc.Loader):
    """The loader of a Keras-using subpackage: loads it, then (outermost only) all the others."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _state["depth"] += 1
        try:
            self._loader.exec_module(module)
        finally:
            _state["depth"] -= 1
        # Only when no keras_safe subpackage is half-imported any more (one may import another).
        if _state["depth"] == 0:
            load_all()

    def __getattr__(self, name):  # get_source, get_filename, is_package, get_resource_reader
        return getattr(self._loader, name)


class BackendGuard(importlib.abc.MetaPathFinder):
    """Checks the backend before a Keras-using part of keras_safe is imported.

    For a module under `keras_safe` outside `KERAS_FREE` it runs `check_backend()`; for a
    top-level subpackage, it also returns its usual spec with a loader that imports the other
    subpackages afterwards (`load_all`). Everything else is left to the usual finders.
    """

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != "keras_safe" or parts[1] in KERAS_FREE:
            return None
        check_backend()
        if len(parts) > 2 or _state["loaded"] or _state["loading"]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoadAllAfter(spec.loader)
        return spec


def install_guard():
    """Puts one `BackendGuard` first on `sys.meta_path` (once per process)."""
    if not any(type(finder).__name__ == "BackendGuard" for finder in sys.meta_path):
        sys.meta_path.insert(0, BackendGuard())
