"""keras_safe.callbacks."""

from keras_safe.callbacks.gradient_monitor import GradientMonitor  # noqa: F401
