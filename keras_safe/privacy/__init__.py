"""keras_safe.privacy."""
