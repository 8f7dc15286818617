"""Before a private model's first step: verifying it on its first examples, once.

`keras_safe.privacy.per_example.verification.verify` checks, on a few real examples, that
examples do not interact and that variables without a built-in rule (the Jacobian fallback,
user rules) get the per-example gradients a one-example-at-a-time computation gives; it picks
the fallback mode that agrees, or refuses. Private `fit`, `train_on_batch` and an eager
`dp_gradients` call run it once per model and loss; a train step traced for a model that was
never verified refuses. (The check itself is `privacy.per_example.verification`; this module
decides when it runs and remembers that it did, in the model's `SafeState`.)
"""

import gc

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.optimizers.dp import find_dp_optimizer
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.model_checks import check_supported
from keras_safe.privacy.per_example.verification import verify
from keras_safe.training import ownership, state

__all__ = [
    "ensure_verified",
    "first_examples",
    "require_dense",
    "require_verified",
    "verify_model",
]

# Examples the verification runs on.
EXAMPLES = 4
# Batches of a dataset looked at for them (a Poisson batch may be empty).
DATASET_BATCHES = 16


def _key(model):
    first = [tuple(v.shape) for v in model.trainable_variables]
    return (repr(getattr(model, "loss", None)), tuple(first))


def _slice(data, rows):
    if data is None:
        return None
    return keras.tree.map_structure(lambda a: None if a is None else np.asarray(a)[rows], data)


def _examples_of_batch(batch, count):
    if isinstance(batch, (tuple, list)) and len(batch) == 4:
        batch = tuple(batch[:3])  # user-level batches: (x, y, sample_weight, user ids)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
    x, y, sample_weight = keras.tree.map_structure(
        lambda t: None if t is None else np.asarray(t), (x, y, sample_weight)
    )
    if sample_weight is None:
        rows = np.arange(min(count, int(np.shape(keras.tree.flatten(x)[0])[0])))
    else:
        # Rows of weight 0 (Poisson padding) are not examples.
        weights = np.reshape(np.asarray(keras.tree.flatten(sample_weight)[0]), [-1])
        rows = np.flatnonzero(weights > 0)[:count]
    if not len(rows):
        return None
    return _slice(x, rows), _slice(y, rows), _slice(sample_weight, rows)


def first_examples(x, y=None, sample_weight=None, count=EXAMPLES):
    """Up to `count` real examples `(x, y, sample_weight)` from what `fit` gets, or None.

    Arrays are sliced; a `tf.data.Dataset` gives the first of its first `DATASET_BATCHES`
    batches that holds an example (for `poisson_batches`, its rows with a positive weight);
    generators and other inputs give None.
    """
    if isinstance(x, tf.data.Dataset):
        # A Poisson batch may hold no example: the first of a few batches that holds one.
        for batch in x.take(DATASET_BATCHES):
            found = _examples_of_batch(batch, count)
            if found is not None:
                return found
        return None
    leaves = keras.tree.flatten(x) if x is not None else []
    if not leaves or not all(hasattr(a, "shape") and hasattr(a, "__array__") for a in leaves):
        return None
    rows = np.arange(min(count, int(np.shape(leaves[0])[0])))
    return _slice(x, rows), _slice(y, rows), _slice(sample_weight, rows)


def verify_model(model, x, y=None, sample_weight=None):
    """Verifies `model`'s per-example clipping on the examples given (a few are enough).

    Records the fallback mode the train step must use. Called by keras_safe's `fit`; call it
    yourself before a custom, compiled training loop that uses `dp_gradients`.

    Returns:
        The `keras_safe.privacy.per_example.verification.Verification`.

    Raises:
        keras_safe._validation.PrivacyError: if examples interact or a variable's per-example
            gradients cannot be computed correctly.
    """
    check_supported(model)  # what the model checks refuse needs no example to see
    require_dense(model, (x, y, sample_weight))
    _build(model, x)
    dp = find_dp_optimizer(getattr(model, "optimizer", None))
    # Verification runs the model on real examples, unclipped and unnoised: what a layer writes
    # there (running statistics, a seed's state) is undone, so no trace of them stays in the
    # model, whether the train step then refuses the layer or not.
    kept = [(v, v.numpy()) for v in model.variables]
    try:
        result = verify(
            model,
            PerExampleLoss(model),
            x,
            y,
            sample_weight,
            num_microbatches=dp.num_microbatches if dp is not None else None,
        )
    finally:
        for variable, value in kept:
            variable.assign(value)
    state.set_fallback_mode(model, result.fallback)
    state.safe_state(model).verified = _key(model)
    # The verification's traced functions and reference gradients sit in reference cycles
    # (TensorFlow's function graphs): collected now, before the first step is traced, their
    # memory serves the step (35-50 MB less peak memory for the transformer benchmark's fit).
    gc.collect()
    return result


def require_dense(model, data):
    """Refuses sparse and ragged tensors in a private step's data: the proof that examples
    stay apart, the batch checks and the per-example gradients follow dense rows.

    Raises:
        keras_safe._validation.PrivacyError: naming the fix.
    """
    composite = (tf.SparseTensor, tf.RaggedTensor, tf.SparseTensorSpec, tf.RaggedTensorSpec)
    if any(isinstance(t, composite) for t in tf.nest.flatten(data)):
        raise PrivacyError(
            f"The data of a private step of {model.name} holds a sparse or ragged tensor: "
            "keras_safe proves that examples stay apart, counts them and clips their gradients "
            "on dense rows only, so it cannot vouch for this step. Nothing was trained. Fix: "
            "make the inputs dense before the model (tf.sparse.to_dense, or RaggedTensor."
            "to_tensor() with padding and a mask, in the data pipeline)."
        )


def _build(model, x):
    """Builds a model that has not created its weights yet (a subclassed model before its first
    call) by calling it on the examples, as `fit` would; refuses a model with nothing to train.
    """
    if not model.trainable_variables:
        # On zeros of the examples' shapes: what a layer writes while it builds holds no data.
        model(
            keras.tree.map_structure(lambda t: None if t is None else tf.zeros_like(t), x),
            training=False,
        )
    if not model.trainable_variables:
        raise PrivacyError(
            f"{model.name} has no trainable variables (it was called on the examples and "
            "created none), so there is nothing for DP-SGD to train. Fix: check that its layers "
            "are trainable (layer.trainable = True) and are used in call()."
        )


def is_verified(model):
    return state.safe_state(model, create=False).verified == _key(model)


def ensure_verified(model, x, y=None, sample_weight=None):
    """Verifies the model on the first examples of `x` unless it was verified already.

    Raises:
        keras_safe._validation.PrivacyError: when the model needs verifying and the input
            gives no examples to verify on (a generator), or the verification fails.
    """
    require_dense(model, (x, y, sample_weight))
    ownership.settle_ledger(model)
    if not is_verified(model):
        if isinstance(x, tf.data.Dataset):
            require_dense(model, x.element_spec)
        examples = first_examples(x, y, sample_weight)
        if examples is None:
            require_verified(model)  # refuses: nothing to verify on
        verify_model(model, *examples)
    _build_optimizer(model)


def _build_optimizer(model):
    """Builds the optimizer of a built model before its first step is traced.

    Keras builds it while tracing the train function when no distribution strategy is set; a
    variable created there (the DP optimizer's draw counter, Adam's moments) makes TensorFlow
    trace the whole step a second time, which costs the DP step's tracing time and the memory of
    a second graph.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or getattr(optimizer, "built", True) or not model.trainable_variables:
        return
    with model.distribute_strategy.scope():
        optimizer.build(model.trainable_variables)


def require_verified(model):
    """Raises unless the model was verified (the train step calls it while tracing)."""
    if not is_verified(model):
        raise PrivacyError(
            f"{model.name} was not verified on real examples, so keras_safe cannot show that "
            "its per-example clipping is right (examples must not interact, and layers without "
            "a built-in rule must match a one-example-at-a-time computation). Fix: train with "
            "`fit` on arrays or a tf.data.Dataset, call `keras_safe.privacy.dp_gradients` "
            "eagerly once, or call keras_safe.training.verify_model(model, x, y) on a few "
            "examples before a compiled custom loop."
        )
