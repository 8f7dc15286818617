"""keras_safe.preprocessing."""
