"""keras_safe.callbacks."""
