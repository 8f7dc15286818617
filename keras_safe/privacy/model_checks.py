"""Which models DP-SGD can train: per-example gradients need examples that do not interact.

The checks are a table: one `LayerCheck` per kind of layer DP-SGD refuses, with the reason, the
advice and, where one exists, the automatic fix `validate(model, fix=True)` applies. The same
module walks a model's layers (`all_layers`) for every part of `keras_safe.privacy` that needs
them.
"""

import dataclasses
from collections.abc import Callable

import keras

from keras_safe._validation import PrivacyError

__all__ = [
    "CHECKS",
    "LayerCheck",
    "UnsupportedLayer",
    "all_layers",
    "check_supported",
    "validate",
]


@dataclasses.dataclass(frozen=True)
class UnsupportedLayer:
    """A layer DP-SGD cannot train, why, and how to fix it."""

    name: str
    class_name: str
    reason: str
    fix: str

    def __str__(self):
        return f"{self.name} ({self.class_name}): {self.reason} Fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class LayerCheck:
    """One row of the table of layers DP-SGD refuses.

    Attributes:
        applies: `applies(layer)` is True when the layer cannot be trained with DP-SGD.
        reason: why, completing "<layer>: ...".
        advice: how to fix it by hand.
        fix: `fix(layer)` returns a replacement layer for `validate(model, fix=True)`, or
            None when there is no automatic fix.
    """

    applies: Callable
    reason: str
    advice: str
    fix: Callable | None = None

    def problem(self, layer):
        return UnsupportedLayer(layer.name, type(layer).__name__, self.reason, self.advice)


def all_layers(model):
    """Every layer reachable from `model` (depth first, each once), through public APIs.

    Follows `layer.layers` where a layer has it (models, wrappers listing their layers) and
    otherwise the layers held in the attributes of a layer (`Bidirectional`'s two recurrent
    layers, an `RNN`'s cell, the sublayers of a subclassed layer), lists and tuples included.

    Example:
        >>> import keras
        >>> inner = keras.layers.Bidirectional(keras.layers.LSTM(2))
        >>> model = keras.Sequential([keras.Input((3, 4)), inner, keras.layers.Dense(1)])
        >>> [type(layer).__name__ for layer in all_layers(model)][:4]
        ['Bidirectional', 'LSTM', 'LSTMCell', 'LSTM']
    """
    seen, order = {id(model)}, []

    def visit(layer):
        for child in getattr(layer, "layers", None) or _attribute_layers(layer):
            if id(child) not in seen:
                seen.add(id(child))
                order.append(child)
                visit(child)

    visit(model)
    return order


def _attribute_layers(layer):
    found = []
    for value in vars(layer).values():  # keras-internal: layer-attributes
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, keras.layers.Layer):
                found.append(item)
    return found


def _trainable_batch_norm(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def _has_activity_regularizer(layer):
    return getattr(layer, "activity_regularizer", None) is not None


def _stateful_recurrent(layer):
    return isinstance(layer, keras.layers.RNN) and bool(getattr(layer, "stateful", False))


def _groups_for(channels):
    for groups in range(min(32, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _group_norm_for(layer):
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


CHECKS = (
    LayerCheck(
        _trainable_batch_norm,
        "batch normalization mixes the examples of a batch, so no example has a gradient of "
        "its own.",
        "replace it with GroupNormalization or LayerNormalization "
        "(keras_safe.privacy.validate(model, fix=True) does it), or freeze it "
        "(layer.trainable = False) after pre-training.",
        fix=_group_norm_for,
    ),
    LayerCheck(
        _has_activity_regularizer,
        "an activity regularizer adds a data-dependent loss outside the per-example losses, "
        "so its gradient would escape clipping.",
        "remove `activity_regularizer` (weight regularizers are fine).",
    ),
    LayerCheck(
        _stateful_recurrent,
        "a stateful recurrent layer carries its state from one batch to the next, so an "
        "example's gradient depends on the examples trained before it.",
        "build the layer with stateful=False (each sequence then starts from the initial "
        "state; feed longer sequences instead of carrying state across batches).",
    ),
)
"""The layers DP-SGD refuses, in the order `validate` reports them."""


def _problems(model):
    problems = []
    for layer in all_layers(model):
        for check in CHECKS:
            if check.applies(layer):
                problems.append((layer, check))
                break
    return problems


def check_supported(model):
    """Raises a `PrivacyError` listing the layers DP-SGD cannot train, if any.

    Example:
        >>> import keras
        >>> model = keras.Sequential([keras.Input((3, 2), batch_size=4),
        ...                           keras.layers.GRU(2, stateful=True)])
        >>> try:
        ...     check_supported(model)
        ... except PrivacyError as error:
        ...     print(str(error).splitlines()[1][:41])
          - gru (GRU): a stateful recurrent layer
    """
    problems = _problems(model)
    if problems:
        listing = "\n".join(f"  - {check.problem(layer)}" for layer, check in problems)
        raise PrivacyError(f"This model cannot be trained with DP-SGD:\n{listing}")


def validate(model, fix=False):
    """Lists the layers DP-SGD cannot train, or returns a model with them fixed.

    DP-SGD needs each example's gradient on its own. The table `CHECKS` lists what it refuses:
    BatchNormalization while trainable (it normalises with statistics of the whole batch, so
    examples interact), activity regularizers (data-dependent losses outside the per-example
    losses) and stateful recurrent layers (state carried across batches).

    Args:
        model: a Keras model.
        fix: if True, return a new model in which every layer with an automatic fix is
            replaced: a trainable BatchNormalization becomes a GroupNormalization over the same
            axis (groups: the largest divisor of the channel count up to 32). Other layers are
            shared with `model` (same weights). Works for Sequential and functional models.

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
        return [check.problem(layer) for layer, check in problems]
    if not problems:
        return model
    unfixable = [check.problem(layer) for layer, check in problems if check.fix is None]
    if unfixable:
        raise ValueError("No automatic fix for: " + "; ".join(str(p) for p in unfixable))
    functional = isinstance(model, keras.Sequential) or (
        isinstance(getattr(model, "inputs", None), list)
        and isinstance(getattr(model, "outputs", None), (list, tuple))
    )
    if not functional:
        raise ValueError(
            "validate(fix=True) rebuilds Sequential and functional models only; in a "
            "subclassed model replace BatchNormalization with keras.layers.GroupNormalization."
        )
    fixes = {id(layer): check.fix for layer, check in problems}

    def replace(layer):
        fixer = fixes.get(id(layer))
        return layer if fixer is None else fixer(layer)

    return keras.models.clone_model(model, clone_function=replace)
