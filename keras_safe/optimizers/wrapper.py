"""The base of keras_safe's optimizer wrappers (DP optimizers, gradient clipping), and the one
helper that walks a chain of wrapped optimizers."""

import keras

__all__ = ["OptimizerWrapper", "innermost", "optimizer_chain"]


def optimizer_chain(optimizer):
    """Lists an optimizer and every optimizer it wraps (following `.inner_optimizer`).

    Args:
        optimizer: a Keras optimizer, or None.

    Returns:
        A list, outermost optimizer first; empty for None.

    Example:

    >>> import keras
    >>> from keras_safe.optimizers import GradientClip
    >>> [type(o).__name__ for o in optimizer_chain(GradientClip(keras.optimizers.SGD()))]
    ['GradientClip', 'SGD']
    """
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        chain.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return chain


def innermost(optimizer):
    """The optimizer at the end of a chain of wrappers (the one that updates the weights).

    Example:

    >>> import keras
    >>> from keras_safe.optimizers import GradientClip
    >>> type(innermost(GradientClip(keras.optimizers.Adam()))).__name__
    'Adam'
    """
    chain = optimizer_chain(optimizer)
    return chain[-1] if chain else None


class OptimizerWrapper(keras.optimizers.Optimizer):
    """A Keras optimizer that transforms gradients and hands them to `inner_optimizer`.

    The wrapped optimizer owns the update rule, the learning rate and the step counter; the
    wrapper delegates them, so learning-rate callbacks, `iterations` and saving see the inner
    optimizer's state. `variables` lists the wrapper's own variables, then the inner ones
    (the order used when a saved model is loaded). Subclasses create their variables in
    `build` before calling `super().build(var_list)`, and implement `apply`.

    Args:
        inner_optimizer: the Keras optimizer to wrap.
        name: the wrapper's name.
    """

    def __init__(self, inner_optimizer, name=None):
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return list(super().variables) + list(self.inner_optimizer.variables)

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the wrapper from `get_config()` (its `"inner_optimizer"` is the inner
        optimizer; configs of keras_safe 0.2.0 and before call it `"optimizer"`).

        Args:
            config: the dict returned by `get_config` (not modified).
            custom_objects: optional dict of custom classes for the inner optimizer.

        Returns:
            A new wrapper.
        """
        config = dict(config)
        saved = config.pop("inner_optimizer") if "inner_optimizer" in config else None
        if saved is None:
            saved = config.pop("optimizer")
        inner = keras.saving.deserialize_keras_object(saved, custom_objects=custom_objects)
        return cls(inner, **config)
