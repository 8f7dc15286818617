"""Which models DP-SGD can train: per-example gradients need examples that do not interact."""

from __future__ import annotations

import dataclasses

import keras


@dataclasses.dataclass(frozen=True)
class UnsupportedLayer:
    """A layer DP-SGD cannot train, why, and how to fix it."""

    name: str
    class_name: str
    reason: str
    fix: str

    def __str__(self):
        return f"{self.name} ({self.class_name}): {self.reason} Fix: {self.fix}"


def _walk(layer, seen):
    for child in getattr(layer, "layers", None) or _children(layer):
        if id(child) in seen:
            continue
        seen.add(id(child))
        yield child
        yield from _walk(child, seen)


def _children(layer):
    found = []
    for value in vars(layer).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, keras.layers.Layer):
                found.append(item)
    return found


def _problems(model):
    problems = []
    for layer in _walk(model, {id(model)}):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            problems.append(
                UnsupportedLayer(
                    layer.name,
                    type(layer).__name__,
                    "batch normalization mixes the examples of a batch, so no example has a "
                    "gradient of its own.",
                    "replace it with GroupNormalization or LayerNormalization "
                    "(keras_safe.privacy.validate(model, fix=True) does it), or freeze it "
                    "(layer.trainable = False) after pre-training.",
                )
            )
        elif getattr(layer, "activity_regularizer", None) is not None:
            problems.append(
                UnsupportedLayer(
                    layer.name,
                    type(layer).__name__,
                    "an activity regularizer adds a data-dependent loss outside the per-example "
                    "losses, so its gradient would escape clipping.",
                    "remove `activity_regularizer` (weight regularizers are fine).",
                )
            )
    return problems


def check_supported(model):
    """Raises a ValueError listing the layers DP-SGD cannot train, if any."""
    problems = _problems(model)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"This model cannot be trained with DP-SGD:\n{listing}")


def _groups_for(channels):
    for groups in range(min(32, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def validate(model, fix=False):
    """Lists the layers DP-SGD cannot train, or returns a model with them fixed.

    DP-SGD needs each example's gradient on its own. BatchNormalization (when trainable)
    normalises with statistics of the whole batch, so examples interact; activity
    regularizers add data-dependent losses outside the per-example losses.

    Args:
        model: a Keras model.
        fix: if True, return a new model in which every trainable BatchNormalization is
            replaced by a GroupNormalization over the same axis (groups: the largest divisor
            of the channel count up to 32). Other layers are shared with `model` (same
            weights). Works for Sequential and functional models.

    Returns:
        With `fix=False`, a list of `UnsupportedLayer` (empty when the model is fine). With
        `fix=True`, the fixed model.

    Raises:
        ValueError: with `fix=True`, if the model is subclassed (it cannot be rebuilt) or a
            problem has no automatic fix.

    Example:

    >>> import keras, keras_safe
    >>> model = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(8, 3),
    ...                           keras.layers.BatchNormalization(), keras.layers.Flatten(),
    ...                           keras.layers.Dense(2)])
    >>> [p.class_name for p in keras_safe.privacy.validate(model)]
    ['BatchNormalization']
    >>> fixed = keras_safe.privacy.validate(model, fix=True)
    >>> keras_safe.privacy.validate(fixed)
    []
    """
    problems = _problems(model)
    if not fix:
        return problems
    if not problems:
        return model
    unfixable = [p for p in problems if p.class_name != "BatchNormalization"]
    if unfixable:
        raise ValueError("No automatic fix for: " + "; ".join(str(p) for p in unfixable))
    functional = (
        isinstance(getattr(model, "inputs", None), list)
        and isinstance(getattr(model, "outputs", None), (list, tuple))
        if not isinstance(model, keras.Sequential)
        else True
    )
    if not functional:
        raise ValueError(
            "validate(fix=True) rebuilds Sequential and functional models only; in a "
            "subclassed model replace BatchNormalization with keras.layers.GroupNormalization."
        )

    def replace(layer):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
            channels = layer.input.shape[axis] if hasattr(layer, "input") else None
            if channels is None:
                raise ValueError(f"Cannot infer the channel count of {layer.name}.")
            return keras.layers.GroupNormalization(
                groups=_groups_for(int(channels)),
                axis=axis,
                epsilon=layer.epsilon,
                center=layer.center,
                scale=layer.scale,
                name=f"{layer.name}_group_norm",
            )
        return layer

    return keras.models.clone_model(model, clone_function=replace)
