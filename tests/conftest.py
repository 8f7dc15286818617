import gc
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

    The garbage of earlier tests is collected here, and what survives is frozen
    (`gc.freeze()`): a collection then walks only the objects made since the last test, a
    few hundredths of a second, instead of the whole heap of the session (TensorFlow's modules
    and every object kept so far). Without the freeze a forced collection cost about 0.4 s
    per test, and without any, Python's own full collections stopped random tests for 5 to
    20 s late in a session.
    """
    keras.backend.clear_session(free_memory=False)
    gc.collect()
    gc.freeze()
    keras.utils.set_random_seed(1234)
    if "keras_safe.training.ownership" in sys.modules:
        # Models of earlier tests (not yet collected) are no source of copied weights.
        sys.modules["keras_safe.training.ownership"].forget_registrations()
    yield
