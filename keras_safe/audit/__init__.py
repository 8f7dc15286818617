"""keras_safe.audit."""
