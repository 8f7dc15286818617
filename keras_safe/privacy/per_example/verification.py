"""Verifying, on real examples, what the layer rules and the fallback compute.

Run before training (keras_safe's train step does it at the start of `fit`): on a handful of
examples it checks that examples do not interact, then compares keras_safe's per-example norms
and clipped sum with the one-example-at-a-time reference wherever a variable relies on
something keras_safe's tests did not cover: the Jacobian fallback, or a rule registered with
`register_rule`.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from keras_safe._validation import PrivacyError
from keras_safe.privacy.per_example import reference
from keras_safe.privacy.per_example.clipping import clip_factors, per_example_forms
from keras_safe.privacy.per_example.registry import is_builtin
from keras_safe.privacy.per_example.rules.base import rule_name

__all__ = ["Verification", "verify"]


@dataclasses.dataclass(frozen=True)
class Verification:
    """What `verify` found.

    Attributes:
        fallback: the fallback to train with ("vectorized" or "loop"), or None when every
            variable has a rule.
        fallback_variables: the paths of the variables that use the fallback.
        checked_rules: the names of the registered (non-built-in) rules that were checked.
        max_error: the largest disagreement with the reference, relative to the clip bound
            (0 when nothing needed the comparison).
    """

    fallback: str | None
    fallback_variables: tuple = ()
    checked_rules: tuple = ()
    max_error: float = 0.0

    def __str__(self):
        if self.fallback is None and not self.checked_rules:
            return "every variable has a built-in rule"
        parts = []
        if self.fallback is not None:
            parts.append(
                f"{len(self.fallback_variables)} variable(s) use the {self.fallback} fallback"
            )
        if self.checked_rules:
            parts.append("registered rules checked: " + ", ".join(self.checked_rules))
        return "; ".join(parts) + f" (largest disagreement {self.max_error:.1e} C)"


def _unit_loss(model, loss_fn, training):
    def unit_loss(x, y, sample_weight):
        return tf.reduce_mean(loss_fn(y, model(x, training=training), sample_weight))

    return unit_loss


def _check_independent(model, loss_fn, x, y, sample_weight, training):
    """Each example's loss in the batch equals its loss alone, else PrivacyError."""
    batch = np.asarray(loss_fn(y, model(x, training=training), sample_weight), "float64")
    count = reference.example_count(x)
    if batch.shape != (count,):
        raise PrivacyError(
            f"The per-example loss returned shape {batch.shape} for {count} examples; DP-SGD "
            "needs one value per example. Fix: use a Keras loss, or a function that returns "
            "one value per example (no reduction over the batch)."
        )
    alone = np.array(
        [_loss_alone(model, loss_fn, x, y, sample_weight, i, training) for i in range(count)]
    )
    finite = np.isfinite(batch) & np.isfinite(alone)
    scale = max(float(np.max(np.abs(alone[finite]), initial=0.0)), 1e-6)
    # A loss that is not finite both ways (a NaN in the example's data) is the example's own:
    # the train step drops it. Finite one way only, or different, means the examples interact.
    gap = np.where(finite, np.abs(batch - alone), 0.0)
    gap = np.where(np.isfinite(batch) == np.isfinite(alone), gap, np.inf)
    worst = int(np.argmax(gap))
    if gap[worst] > 1e-4 * scale:
        raise PrivacyError(
            f"Examples interact: example {worst}'s loss is {batch[worst]:.6g} in a batch of "
            f"{count} but {alone[worst]:.6g} alone. A layer or the loss mixes the examples of "
            "a batch (batch statistics, a loss averaged over the batch, state carried across "
            "calls), so no example has a gradient of its own and clipping bounds nothing. "
            "Fix: replace BatchNormalization with GroupNormalization "
            "(keras_safe.privacy.validate(model, fix=True)), use a loss with one value per "
            "example, and keep layers stateless."
        )
    return alone


def _loss_alone(model, loss_fn, x, y, sample_weight, i, training):
    part = slice(i, i + 1)
    pred = model(reference.take(x, part), training=training)
    values = loss_fn(reference.take(y, part), pred, reference.take(sample_weight, part))
    return float(np.reshape(np.asarray(values, "float64"), [-1])[0])


class _KerasSafeSide:
    """keras_safe's per-variable norm bounds and clipped sums, traced once per fallback mode."""

    def __init__(self, model, loss_fn, variables, data, microbatches, training, fallback):
        self.info = {}
        x, y, sample_weight = data

        @tf.function(autograph=False)
        def run(clip, reference_factors):
            def forward():
                pred = model(x, training=training)
                return loss_fn(y, pred, sample_weight), pred

            result = per_example_forms(model, variables, forward, microbatches, True, fallback)
            self.info.update(sources=result.sources, layers=result.layers)
            variable_norms = [tf.sqrt(f.norm_bounds()[0]) for f in result.forms]
            factors, norms = clip_factors(result.forms, clip, result.checks)
            own = [f.clipped_sum(factors) for f in result.forms]
            # With the reference's factors, each variable's sum depends on its own per-example
            # gradients alone: a wrong variable cannot make the others look wrong.
            alike = [f.clipped_sum(reference_factors) for f in result.forms]
            return variable_norms, norms, own, alike

        self._run = run

    def trace(self):
        spec = tf.TensorSpec([None], "float32")
        self._run.get_concrete_function(tf.TensorSpec([], "float64"), spec)
        return self.info

    def __call__(self, clip, reference_factors):
        """float64 numpy `(variable_norms, norms, sums, sums_with_reference_factors)`, or None
        if the run fails."""
        try:
            outputs = self._run(
                tf.constant(clip, "float64"), tf.constant(reference_factors, "float32")
            )
        except (tf.errors.OpError, ValueError, NotImplementedError, TypeError):
            return None
        variable_norms, norms, own, alike = outputs
        as64 = lambda ts: [np.asarray(t, "float64") for t in ts]  # noqa: E731
        return as64(variable_norms), np.asarray(norms, "float64"), as64(own), as64(alike)


def _disagreements(ours, ref_norms, ref_variable_norms, ref_sums, clip, rtol):
    """Indices of the variables whose norms or clipped sums differ, and the largest gap / C.

    Each variable is judged on its own per-example norms and on its clipped sum with the
    reference's clip factors; the total (keras_safe's own factors) must agree too.
    """
    variable_norms, _, own, alike = ours
    valid = np.isfinite(ref_norms)  # units whose gradient is not finite are dropped by both
    scale = np.where(valid, np.maximum(ref_norms, 1e-12), np.inf)
    bad, worst = set(), 0.0

    def note(k, gap, limit):
        nonlocal worst
        if not np.isfinite(gap) or gap > limit:
            bad.add(k)
        worst = max(worst, gap if np.isfinite(gap) else np.inf)

    for k, (mine, theirs) in enumerate(zip(variable_norms, ref_variable_norms)):
        gaps = np.abs(np.where(valid, mine, 0.0) - np.where(valid, theirs, 0.0)) / scale
        note(k, float(np.max(gaps)), rtol)
    units = len(ref_norms)
    for k, (mine, theirs) in enumerate(zip(alike, ref_sums)):
        note(k, float(np.linalg.norm(mine - theirs)) / clip, rtol * units)
    total = np.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(own, ref_sums))) / clip
    if not bad and not total <= rtol * units:
        bad.update(range(len(own)))
    worst = max(worst, total if np.isfinite(total) else np.inf)
    return bad, worst


def _describe(variables, indices, layers):
    listed = []
    for k in sorted(indices):
        owner = layers[k]
        where = f" (layer {owner.name})" if owner is not None else ""
        listed.append(f"{variables[k].path}{where}")
    return ", ".join(listed)


def verify(
    model,
    loss_fn,
    x,
    y=None,
    sample_weight=None,
    num_microbatches=None,
    training=False,
    l2_norm_clip=None,
    rtol=1e-3,
    variables=None,
    check_builtin_rules=False,
):
    """Checks, on a few real examples, that keras_safe's per-example clipping is right here.

    1. Examples do not interact: each example's loss in the batch equals its loss computed on
       a batch holding it alone (within 1e-4 relative). Otherwise a layer or the loss mixes
       examples and no per-example clipping bounds anything: `PrivacyError`.
    2. Wherever a variable relies on what keras_safe's own tests do not cover (the Jacobian
       fallback, or a rule registered with `register_rule`), the per-example norms and the
       clipped sum are compared, variable by variable, with the one-example-at-a-time
       reference (`reference.gradients_alone`). When only fallback variables disagree with
       the vectorized (`pfor`) Jacobian, the loop Jacobian is tried. If nothing agrees:
       `PrivacyError` listing the variables and layers.

    Cheap: one trace of keras_safe's side (two if the loop is tried), one forward pass per
    example, and one backward pass per example only when step 2 is needed. Pass 4 to 8
    examples. Layers must be deterministic for the comparison: `training=False` by default
    (dropout off).

    Args:
        model: the model.
        loss_fn: `loss_fn(y, y_pred, sample_weight)` returning per-example losses `[B]`
            (for a compiled model, `keras_safe.privacy.losses.PerExampleLoss(model)`).
        x, y, sample_weight: a few examples (arrays or nested structures of arrays).
        num_microbatches: verify with this many microbatches when it divides the number of
            examples; otherwise per example.
        training: the `training` flag of the forward passes.
        l2_norm_clip: the clip bound for the comparison (default: the median reference norm,
            so some examples are clipped and some are not).
        rtol: tolerance, relative to each example's norm (norms) and to the clip bound times
            the number of examples (clipped sums).
        variables: the variables (default: `model.trainable_variables`).
        check_builtin_rules: also compare variables covered by built-in rules.

    Returns:
        A `Verification`; its `fallback` is the mode to pass to `clipped_gradient_sum`.

    Raises:
        PrivacyError: if examples interact, or keras_safe's clipping disagrees with the
            reference for some variable whatever the fallback.

    Example:
        >>> import keras, numpy as np
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
        ...                           keras.layers.PReLU(), keras.layers.Dense(1)])
        >>> def loss_fn(y, y_pred, sample_weight=None):
        ...     return keras.ops.sum((y_pred - y) ** 2, axis=-1)
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 1))
        >>> print(verify(model, loss_fn, x, y))
        every variable has a built-in rule
    """
    variables = list(model.trainable_variables if variables is None else variables)
    losses = _check_independent(model, loss_fn, x, y, sample_weight, training)
    # An example whose loss is not finite is dropped by the train step; left in, it would turn
    # every example's Jacobian rows into NaN (0 * NaN), so the comparison leaves it out too.
    keep = np.flatnonzero(np.isfinite(losses))
    if not len(keep):
        raise PrivacyError(
            f"None of the {len(losses)} examples given to verify has a finite loss, so the "
            "per-example clipping of this model cannot be checked. Fix: verify (start `fit`) on "
            "examples without NaN or infinite values."
        )
    if len(keep) < len(losses):
        x, y, sample_weight = (reference.take(d, keep) for d in (x, y, sample_weight))
    count = len(keep)
    microbatches = num_microbatches if num_microbatches and count % num_microbatches == 0 else None
    data = (x, y, sample_weight)
    sides = {
        mode: _KerasSafeSide(model, loss_fn, variables, data, microbatches, training, mode)
        for mode in ("vectorized", "loop")
    }
    info = sides["vectorized"].trace()
    sources, layers = info["sources"], info["layers"]
    fallback_ids = {k for k, rule in enumerate(sources) if rule is None}
    user = [k for k, rule in enumerate(sources) if rule is not None and not is_builtin(rule)]
    checked_rules = tuple(sorted({rule_name(sources[k]) for k in user}))
    fallback_paths = tuple(variables[k].path for k in sorted(fallback_ids))
    if not fallback_ids and not user and not check_builtin_rules:
        return Verification(None)

    units = reference.unit_slices(count, microbatches)
    unit_loss = _unit_loss(model, loss_fn, training)
    grads, _ = reference.gradients_alone(model, variables, unit_loss, x, y, sample_weight, units)
    ref_variable_norms = [
        np.array([np.linalg.norm(g[k]) for g in grads]) for k in range(len(variables))
    ]
    ref_norms = np.sqrt(sum(n**2 for n in ref_variable_norms))
    valid = np.isfinite(ref_norms)
    finite = [unit for unit, ok in zip(grads, valid) if ok]
    clip = float(np.median(ref_norms[valid])) if l2_norm_clip is None else float(l2_norm_clip)
    clip = clip if clip > 0 else 1.0
    ref = (ref_norms, ref_variable_norms, reference.clip_and_sum(finite, clip)[0], clip, rtol)
    ref_factors = np.where(valid, np.minimum(1.0, clip / np.maximum(ref_norms, 1e-300)), 0.0)

    fallback = "vectorized" if fallback_ids else None
    ours = sides["vectorized"](clip, ref_factors)
    if ours is None:  # the run failed: blame the fallback if there is one, else everything
        bad, worst = (fallback_ids or set(range(len(variables)))), np.inf
    else:
        bad, worst = _disagreements(ours, *ref)
    if bad and bad <= fallback_ids:
        looped = sides["loop"](clip, ref_factors)
        if looped is not None:
            bad, worst = _disagreements(looped, *ref)
            fallback = "loop"
    if bad:
        raise PrivacyError(_failure(variables, bad, sources, layers, count, worst))
    return Verification(fallback, fallback_paths, checked_rules, worst)


def _failure(variables, bad, sources, layers, count, worst):
    ruled = {k for k in bad if sources[k] is not None}
    problems = []
    if ruled:
        names = sorted({rule_name(sources[k]) for k in ruled})
        problems.append(
            f"the layer rule(s) {', '.join(names)} give wrong per-example gradients for "
            f"{_describe(variables, ruled, layers)}"
        )
    if bad - ruled:
        problems.append(
            "neither the vectorized nor the loop Jacobian gives the per-example gradients "
            f"of {_describe(variables, bad - ruled, layers)}"
        )
    return (
        "keras_safe cannot clip this model's gradients per example: "
        + "; ".join(problems)
        + f" (compared with the one-example-at-a-time reference on {count} examples; largest "
        f"gap {worst:.2g} of the clip bound). Fix: give the layer a correct rule "
        "(keras_safe.privacy.register_rule), unregister a wrong one, or replace the layer."
    )
