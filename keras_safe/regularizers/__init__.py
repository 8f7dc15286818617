"""keras_safe.regularizers."""
