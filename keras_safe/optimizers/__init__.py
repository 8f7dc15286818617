"""keras_safe.optimizers."""
