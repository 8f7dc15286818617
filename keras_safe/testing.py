"""Public test helpers: check keras_safe's DP-SGD clipping on your own model, layer or rule.

`assert_dp_matches_reference` compares keras_safe's clipped gradient sum with an independent
oracle: each example's gradient computed on a batch holding that example alone, with a plain
`tf.GradientTape` and Keras's own `model.compute_loss`, clipped in float64 numpy and summed. It
also measures the sensitivity: removing any one example may move keras_safe's clipped sum by at
most the clip bound.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError, check_number, fail
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.privacy.per_example import reference
from keras_safe.privacy.per_example.clipping import clip_factors, per_example_forms
from keras_safe.privacy.per_example.install import layers_with_rules
from keras_safe.privacy.per_example.verification import verify

__all__ = ["ReferenceCheck", "assert_dp_matches_reference"]


@dataclasses.dataclass(frozen=True)
class ReferenceCheck:
    """What `assert_dp_matches_reference` measured.

    Attributes:
        l2_norm_clip: the clip bound C used.
        max_error: the largest gap between keras_safe's clipped sum and the reference, per
            variable, relative to the reference's norm (floored at `atol / rtol`, so a variable
            whose exact gradient is 0, such as an attention key bias, is not judged on noise).
        max_sensitivity: the largest move of keras_safe's clipped sum when one example (or
            microbatch) is removed, in units of C.
        fallback: the Jacobian fallback mode used (None when every variable has a rule).
    """

    l2_norm_clip: float
    max_error: float
    max_sensitivity: float
    fallback: str | None


def _reference_loss(model, training):
    """Keras's loss for a batch, without the weight penalties (they are not clipped)."""

    def unit_loss(x, y, sample_weight):
        pred = model(x, training=training)
        loss = model.compute_loss(
            x=x, y=y, y_pred=pred, sample_weight=sample_weight, training=training
        )
        penalties = [tf.cast(tf.reduce_sum(p), loss.dtype) for p in model.losses]
        return loss - tf.add_n(penalties) if penalties else loss

    return unit_loss


class _KerasSafeSum:
    """keras_safe's clipped sum and norm bounds, traced once for every batch size."""

    def __init__(self, model, l2_norm_clip, training, fallback):
        self.model, self.clip = model, l2_norm_clip
        self.training, self.fallback = training, fallback
        self.loss_fn = PerExampleLoss(model)
        self.sources = None
        self._traced = {}

    def _body(self, data, microbatches):
        model = self.model
        variables = model.trainable_variables

        def forward():
            pred = model(data["x"], training=self.training)
            return self.loss_fn(data.get("y"), pred, data.get("sample_weight")), pred

        result = per_example_forms(model, variables, forward, microbatches, True, self.fallback)
        self.sources = result.sources
        factors, norms = clip_factors(result.forms, self.clip, result.checks)
        return [f.clipped_sum(factors) for f in result.forms], norms

    def __call__(self, x, y, sample_weight, microbatches):
        data = {"x": x, "y": y, "sample_weight": sample_weight}
        data = {k: tf.nest.map_structure(np.asarray, v) for k, v in data.items() if v is not None}
        key = (microbatches, tuple(sorted(data)))
        if key not in self._traced:
            # The batch axis is left unknown: one trace serves every batch size.
            specs = tf.nest.map_structure(
                lambda a: tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype)), data
            )
            self._traced[key] = tf.function(
                lambda d: self._body(d, microbatches), input_signature=[specs], autograph=False
            )
        try:
            sums, norms = self._traced[key](data)
        except tf.errors.InvalidArgumentError:
            # A layer sees a batch axis folded with others, which only a trace with a known
            # batch size can tell: trace per batch size from now on.
            self._traced[key] = tf.function(lambda d: self._body(d, microbatches), autograph=False)
            sums, norms = self._traced[key](data)
        return [np.asarray(s, "float64") for s in sums], np.asarray(norms, "float64")


def _uncovered(model):
    """True when some trainable weight belongs to no layer that a rule supports."""
    covered = {id(w) for layer in layers_with_rules(model) for w in layer.trainable_weights}
    return any(id(v) not in covered for v in model.trainable_variables)


def _without(data, part, count):
    keep = np.concatenate([np.arange(part.start), np.arange(part.stop, count)])
    return reference.take(data, keep)


def assert_dp_matches_reference(
    model,
    x,
    y=None,
    sample_weight=None,
    l2_norm_clip=None,
    num_microbatches=None,
    rtol=1e-4,
    atol=None,
    training=True,
    fallback="auto",
    sensitivity_rtol=1e-5,
):
    """Asserts that keras_safe clips this model's gradients like a one-example-at-a-time loop.

    The reference computes each example's (or microbatch's) gradient on a batch holding that
    example alone, with a plain `tf.GradientTape` and Keras's `model.compute_loss` (weight
    penalties left out: DP-SGD adds their gradient after the noise), clips it in float64 numpy
    and sums. keras_safe computes the same sum with its layer rules and fallback in one pass
    over the batch. The check asserts that

    1. the two sums agree, variable by variable, within `rtol` relative (plus `atol`);
    2. keras_safe's per-example norms are never below the reference's by more than a relative
       `sensitivity_rtol`;
    3. removing any one example (microbatch) moves keras_safe's clipped sum by at most
       `l2_norm_clip * (1 + sensitivity_rtol)`: the sensitivity DP-SGD's noise is calibrated to.

    Args:
        model: a model compiled with a loss (`model.compile(loss=...)`; the optimizer does not
            matter).
        x, y, sample_weight: a small batch (arrays or nested structures of arrays), 4 to 16
            examples.
        l2_norm_clip: the clip bound C; default: the median reference norm, so some examples
            are clipped and some are not.
        num_microbatches: clip microbatches instead of examples (must divide the batch).
        rtol: relative tolerance of the sums.
        atol: absolute tolerance of each variable's sum (default: `1e-6 * C * units`).
        training: the `training` flag of every forward pass (pass False for a model with
            dropout or other random layers: the comparison needs deterministic passes).
        fallback: the Jacobian fallback mode for variables without a rule: "auto" (what the
            verification before training picks, as `fit` does), "vectorized" or "loop".
        sensitivity_rtol: the relative tolerance of checks 2 and 3.

    Returns:
        A `ReferenceCheck` with the figures measured.

    Raises:
        AssertionError: if a check fails (the message names the variable and the figures).
        ArgumentError: if the model has no loss, or `num_microbatches` does not divide the
            batch.

    Example: a custom layer, its rule, and the check.

    >>> import keras, numpy as np, keras_safe
    >>> from keras_safe.privacy import PerExampleRule
    >>> from keras_safe.privacy.per_example import summed_form
    >>> class Scale(keras.layers.Layer):  # y = x * w: one weight per feature
    ...     def build(self, input_shape):
    ...         self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")
    ...     def call(self, x):
    ...         return x * self.w
    >>> class ScaleRule(PerExampleRule):
    ...     @staticmethod
    ...     def supports(layer):
    ...         return type(layer) is Scale
    ...     @staticmethod
    ...     def forward(layer, record, x):
    ...         z = x * layer.w  # the weight acts through z alone
    ...         record(x, z)
    ...         return z
    ...     @staticmethod
    ...     def forms(layer, x, dz):
    ...         # Example i's gradient: sum of x * dz over every axis but the feature axis.
    ...         return [summed_form(layer.w, x * dz, list(range(1, len(x.shape) - 1)))]
    >>> _ = keras_safe.privacy.register_rule(ScaleRule)
    >>> model = keras.Sequential([keras.Input((5, 3)), Scale(), keras.layers.Flatten(),
    ...                           keras.layers.Dense(2)])
    >>> model.compile(loss="mse")
    >>> rng = np.random.default_rng(0)
    >>> check = keras_safe.testing.assert_dp_matches_reference(
    ...     model, rng.normal(size=(6, 5, 3)), rng.normal(size=(6, 2)))
    >>> bool(check.max_error < 1e-4 and check.max_sensitivity <= 1 + 1e-5)
    True
    >>> keras_safe.privacy.unregister_rule("ScaleRule")

    A wrong rule (say, `forms` forgetting the sum over positions) fails the check, and `fit`
    refuses to train with it (`PrivacyError`).
    """
    count = _check_arguments(model, x, num_microbatches)
    variables = model.trainable_variables
    units = reference.unit_slices(count, num_microbatches)
    grads, _ = reference.gradients_alone(
        model, variables, _reference_loss(model, training), x, y, sample_weight, units
    )
    ref_norms = np.array([np.sqrt(sum(float(np.sum(g**2)) for g in unit)) for unit in grads])
    clip = float(np.median(ref_norms)) if l2_norm_clip is None else float(l2_norm_clip)
    clip = clip if clip > 0 else 1.0
    expected, _ = reference.clip_and_sum(grads, clip)
    atol = 1e-6 * clip * len(units) if atol is None else atol
    data = (x, y, sample_weight)
    ours, sums, norms, mode = _keras_safe_sums(
        model, data, num_microbatches, clip, training, fallback
    )
    worst = _compare_sums(variables, sums, expected, rtol, atol, clip, mode)
    _check_norms(norms, ref_norms, sensitivity_rtol)
    sensitivity = _sensitivity(ours, sums, data, units, num_microbatches, clip, sensitivity_rtol)
    used = mode if any(source is None for source in ours.sources) else None
    return ReferenceCheck(clip, worst, sensitivity, used)


def _check_arguments(model, x, num_microbatches):
    """The number of examples in `x`, once the model and `num_microbatches` are checked."""
    if getattr(model, "loss", None) is None:
        fail(
            "model",
            model.name,
            "a model compiled with a loss",
            "call model.compile(loss=...) first (the optimizer does not matter).",
        )
    count = reference.example_count(x)
    if num_microbatches is not None:
        check_number("num_microbatches", num_microbatches, low=1, integer=True)
        if count % num_microbatches:
            fail(
                "num_microbatches",
                num_microbatches,
                f"a divisor of the number of examples ({count})",
                "pass a batch whose size it divides.",
            )
    return count


def _keras_safe_sums(model, data, num_microbatches, clip, training, fallback):
    """keras_safe's clipped sums and per-example norms, with the fallback mode `fit` would use:
    `(summer, sums, norms, mode)`."""
    x, y, sample_weight = data

    def verified_mode():
        try:
            found = verify(
                model,
                PerExampleLoss(model),
                x,
                y,
                sample_weight,
                num_microbatches,
                training=training,
                l2_norm_clip=clip,
            )
        except PrivacyError as error:
            raise AssertionError(f"keras_safe refuses this model: {error}") from error
        return found.fallback or "vectorized"

    mode = fallback
    if fallback == "auto":
        # Verify first where some weight has no rule (as `fit` does), then sum with its choice.
        mode = verified_mode() if _uncovered(model) else "vectorized"
    ours = _KerasSafeSum(model, clip, training, mode)
    sums, norms = ours(x, y, sample_weight, num_microbatches)
    if fallback == "auto" and not _uncovered(model) and None in ours.sources:
        # The forward pass sent a weight to the fallback (tied weights, a folded batch axis).
        mode = verified_mode()
        if mode != "vectorized":
            ours = _KerasSafeSum(model, clip, training, mode)
            sums, norms = ours(x, y, sample_weight, num_microbatches)
    return ours, sums, norms, mode


def _compare_sums(variables, sums, expected, rtol, atol, clip, mode):
    """Check 1: each variable's sum against the reference's; returns the largest relative gap."""
    worst = 0.0
    for v, got, want in zip(variables, sums, expected):
        gap = float(np.linalg.norm(got - want))
        scale = float(np.linalg.norm(want))
        if not gap <= rtol * scale + atol:
            raise AssertionError(
                f"{v.path}: keras_safe's clipped sum is {gap:.3g} away from the "
                f"one-example-at-a-time reference (norm {scale:.3g}, allowed "
                f"{rtol * scale + atol:.3g}; clip {clip:.3g}, fallback {mode})."
            )
        worst = max(worst, gap / max(scale, atol / rtol if rtol > 0 else 1e-30))
    return worst


def _check_norms(norms, ref_norms, sensitivity_rtol):
    """Check 2: no per-example norm below the reference's."""
    low = norms < ref_norms * (1 - sensitivity_rtol)
    if np.any(low):
        i = int(np.argmax(low))
        raise AssertionError(
            f"keras_safe's norm of unit {i} is {norms[i]:.8g}, below the reference's "
            f"{ref_norms[i]:.8g}: an underestimated norm lets the example move the sum by more "
            "than the clip bound."
        )


def _sensitivity(ours, full, data, units, num_microbatches, clip, sensitivity_rtol):
    """Check 3: removing each unit moves the clipped sum by at most the clip bound; returns
    the largest move, in units of the clip bound."""
    count = reference.example_count(data[0])
    sensitivity = 0.0
    for j, part in enumerate(units):
        rest = [_without(d, part, count) for d in data]
        smaller = None if num_microbatches is None else num_microbatches - 1
        if smaller == 0:
            break
        without, _ = ours(*rest, smaller)
        moved = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(full, without)))
        if not moved <= clip * (1 + sensitivity_rtol):
            raise AssertionError(
                f"Removing unit {j} moves keras_safe's clipped sum by {moved:.8g}, more than the "
                f"clip bound {clip:.8g} (x {moved / clip:.6f})."
            )
        sensitivity = max(sensitivity, float(moved / clip))
    return sensitivity
