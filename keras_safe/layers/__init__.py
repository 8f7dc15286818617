"""keras_safe.layers."""
