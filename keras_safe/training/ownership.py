"""One privacy ledger for everything a model's training released.

What a model spent is charged to its ledger, but the privacy loss belongs to what training
released: the weights it changed, and the statistics of the training data the model holds.

Statistics: a keras_safe preprocessing layer adapted with `dp_epsilon` inside a private model
has its epsilon recorded in the model's ledger (once per `adapt`, so the ledger states one
total); one adapted on the training data without DP is refused (its exact statistics would be
released with the model), unless `adapt(..., public=True)` declared the data public. So are
Keras's `Normalization` adapted on data, `Discretization` with boundaries from `adapt`, and
lookup layers whose vocabulary came from `adapt` (their exact statistics, quantiles and
vocabularies are the training data's); pass them values from public data instead.

Weights: two private models sharing a layer, or a model trained from weights copied out of
another private model (`keras.models.clone_model` + `set_weights`), train the same weights
further. `settle_ledger` runs before a private step (and when one is traced) and makes such a
model charge the ledger its weights already answer to:

- a variable trained under another model's ledger (the same variable object, shared layers):
  the model takes that ledger, if its own has spent nothing; two ledgers that both spent
  something on the same variables are refused;
- a model whose variables hold exactly the values of variables trained under another ledger
  (copied weights): it takes that ledger if its own has spent nothing, and is refused if it
  has (weights copied into a model that trained already). The one exception is a snapshot
  of the model's own ledger: a ledger of the same lineage (`PrivacyLedger.lineage`, drawn when
  a ledger is created and saved with it) with the same history, as a model saved and loaded in
  this process holds.

It runs at the start of every `fit`, `train_on_batch` and eager `dp_gradients` call, so weights
copied in after a step was traced are seen too. The second rule sees copies made in this
process while the source's weights have not moved since; a copy made through a file carries
the file's ledger instead (`load_model`), and copies made any other way are an assumption the
README states.
"""

import hashlib
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.preprocessing._base import AdaptableFeatureLayer
from keras_safe.privacy.ledger import get_ledger, set_ledger
from keras_safe.privacy.model_checks import all_layers

__all__ = ["forget_registrations", "settle_ledger"]

_LOOKUPS = (
    keras.layers.StringLookup,
    keras.layers.IntegerLookup,
    keras.layers.TextVectorization,
)

# id(variable) -> (weak reference to the variable, its ledger, digest of its first value). The
# ledger is held for as long as the variable lives: a model dropped (and collected) after
# training still answers, through its layers' variables, for what they spent.
_OWNERS = {}


def forget_registrations():
    """Forgets which variables trained under which ledger in this process (a fresh start, as
    `keras.backend.clear_session` gives Keras: the test suite calls it between tests, whose
    models share initial weights through one seed)."""
    _OWNERS.clear()


def _owner(variable):
    entry = _OWNERS.get(id(variable))
    if entry is None:
        return None
    var, ledger = entry[0](), entry[1]
    if var is not variable:
        _OWNERS.pop(id(variable), None)
        return None
    return ledger


def _register(variables, ledger):
    for variable in variables:
        key = id(variable)
        if _owner(variable) is ledger:
            continue  # registered already, with the value it first trained from

        def forget(ref, key=key):
            # Only this variable's entry: its id may already name a newer variable.
            entry = _OWNERS.get(key)
            if entry is not None and entry[0] is ref:
                del _OWNERS[key]

        _OWNERS[key] = (weakref.ref(variable, forget), ledger, _digest(_value(variable)))


def _value(variable):
    with tf.init_scope():
        return np.asarray(variable.numpy())


def _digest(value):
    return hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=16).digest()


def _copied_from(variables, own):
    """Ledgers (other than `own`, with steps) whose trained variables hold exactly the values
    of some of `variables`.

    Only variables whose value moved since they were registered count: a model that charged
    steps but applied none (or two fresh models initialised from one seed) shows no copy.
    """
    by_shape = {}
    for var_ref, ledger, first in list(_OWNERS.values()):
        var = var_ref()
        if var is None or ledger is own or ledger.steps == 0:
            continue
        by_shape.setdefault((tuple(var.shape), str(var.dtype)), []).append((var, ledger, first))
    found = set()
    for variable in variables:
        candidates = by_shape.get((tuple(variable.shape), str(variable.dtype)))
        if not candidates:
            continue
        value = _value(variable)
        if value.size < 2 or np.all(value == value.flat[0]):
            continue  # constants (zeros, ones) are no evidence of a copy
        digest = _digest(value)
        for var, ledger, first in candidates:
            if digest != first and np.array_equal(value, _value(var)):
                found.add(ledger)
    # A ledger of `own`'s lineage with its very history is `own`'s snapshot (a model saved
    # and loaded in the same process): the copy's ledger already states what those weights
    # spent. Two ledgers created apart are never snapshots of each other, whatever they spent.
    return {ledger for ledger in found if not _snapshot(ledger, own)}


def _snapshot(ledger, other):
    return (
        ledger.lineage == other.lineage
        and ledger.steps == other.steps
        and ledger.segments() == other.segments()
        and ledger.statistics_epsilon == other.statistics_epsilon
    )


@tf.autograph.experimental.do_not_convert
def settle_ledger(model):
    """The ledger that must charge `model`'s steps (see the module); registers its variables.

    Raises:
        keras_safe._validation.PrivacyError: when the model's variables were trained under
            another ledger and its own has spent something too.
    """
    own = get_ledger(model, create=True)
    variables = list(model.trainable_variables)
    others = {ledger for ledger in (_owner(v) for v in variables) if ledger is not own}
    others.discard(None)
    if not others:  # weights copied in, before or after this model trained
        others = _copied_from(variables, own)
    if others:
        if len(others) > 1 or own.steps > 0:
            raise PrivacyError(
                f"Some trainable variables of {model.name} were also trained by another "
                "private model, with its own privacy ledger, and both ledgers have spent "
                "privacy on them: neither ledger would state what those weights spent. Nothing "
                "was trained. Fix: train shared layers through one model, or copy the weights "
                "into a new model before either trains further (the copy then continues the "
                "original's ledger)."
            )
        (ledger,) = others
        # The model now charges the ledger its weights answer to (and saves it).
        set_ledger(model, ledger)
        own = ledger
    _register(variables, own)
    with tf.init_scope():  # reads the layers' values, also while a step is being traced
        _charge_statistics(model, own)
    return own


def _adapted_bins(layer):
    """True when a Keras `Discretization` took its boundaries from `adapt` (its quantile
    summary holds data; it is None when `bin_boundaries` were given)."""
    summary = getattr(layer, "summary", None)
    return summary is not None and np.size(summary) > 0


def _charge_statistics(model, ledger):
    """Records the DP statistics of the model's preprocessing layers in `ledger`; refuses
    exact statistics of data not declared public."""
    refused = []
    for layer in all_layers(model):
        if isinstance(layer, AdaptableFeatureLayer):
            if not layer.is_adapted or not layer.uses_data:
                continue
            release = int(layer.statistics_release.numpy())
            if release:
                ledger.record_statistics(release, layer.dp_epsilon_spent)
            elif not int(layer.adapted_on_public_data.numpy()):
                refused.append(
                    f"{layer.name} ({type(layer).__name__}) holds exact statistics of the data "
                    "it was adapted on; fix: adapt it with dp_epsilon=... and dp_bounds=... (its "
                    "epsilon joins the model's ledger), or, if that data is public, "
                    "adapt(data, public=True)"
                )
        elif isinstance(layer, keras.layers.Normalization) and layer.built:
            if getattr(layer, "input_mean", None) is None:
                refused.append(
                    f"{layer.name} (keras Normalization) holds the exact mean and variance of "
                    "the data it was adapted on; fix: pass mean= and variance= computed from "
                    "public data, or use keras_safe.preprocessing.RobustNormalization("
                    "dp_epsilon=..., dp_bounds=...)"
                )
        elif isinstance(layer, keras.layers.Discretization) and _adapted_bins(layer):
            refused.append(
                f"{layer.name} (keras Discretization) holds bin boundaries adapted on data "
                "(quantiles of the training data); fix: pass bin_boundaries= chosen from public "
                "data or domain knowledge"
            )
        elif isinstance(layer, _LOOKUPS) and getattr(layer, "input_vocabulary", True) is None:
            refused.append(
                f"{layer.name} ({type(layer).__name__}) holds a vocabulary adapted on data (the "
                "words of the training data); fix: pass vocabulary= built from public data"
            )
    if refused:
        raise PrivacyError(
            f"{model.name} holds statistics of data that no privacy mechanism protects, and "
            "training would release them with the model: " + "; ".join(refused) + ". Nothing "
            "was trained."
        )
