"""keras_safe.security."""
