"""The backend check: keras_safe runs on the TensorFlow backend of Keras 3 only.

`keras_safe/__init__.py` imports no Keras and no TensorFlow, so that the command line and the
accounting start in a fraction of a second. The check therefore runs where Keras is first needed:
`BackendGuard`, installed by `keras_safe/__init__.py`, runs `check_backend()` before any
subpackage other than the Keras-free ones (`KERAS_FREE`) is imported, whichever way it is reached
(`import keras_safe.optimizers`, `from keras_safe import privacy`, `keras_safe.privacy`).
"""

import importlib.abc
import sys

__all__ = ["KERAS_FREE", "BackendGuard", "check_backend", "install_guard"]

KERAS_FREE = frozenset({"__main__", "_backend", "_validation", "_version", "accounting", "cli"})
"""The modules directly under keras_safe that import neither Keras nor TensorFlow."""

_checked = False


def check_backend():
    """Imports Keras and raises `ImportError` unless it runs on the TensorFlow backend.

    Raises:
        ImportError: Keras runs on another backend; the message names the fix
            (`KERAS_BACKEND=tensorflow`).

    Example:
        >>> check_backend()  # Keras on TensorFlow here: nothing happens
    """
    global _checked
    if _checked:
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
    _checked = True


class BackendGuard(importlib.abc.MetaPathFinder):
    """Runs `check_backend()` before a Keras-using part of keras_safe is imported.

    It finds nothing itself (`find_spec` returns None, so the usual finders load the module): it
    only makes sure that the backend check ran first.
    """

    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if len(parts) > 1 and parts[0] == "keras_safe" and parts[1] not in KERAS_FREE:
            check_backend()
        return None


def install_guard():
    """Puts one `BackendGuard` first on `sys.meta_path` (once per process)."""
    if not any(isinstance(finder, BackendGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, BackendGuard())
