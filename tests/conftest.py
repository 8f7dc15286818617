import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("MPLBACKEND", "Agg")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Each test starts from a clean Keras session and a fixed seed.

    Without a forced garbage collection (`free_memory=False`): Python collects as usual, and
    the forced collection cost about 0.4 s per test.
    """
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    if "keras_safe.training.ownership" in sys.modules:
        # Models of earlier tests (not yet collected) are no source of copied weights.
        sys.modules["keras_safe.training.ownership"].forget_registrations()
    yield
