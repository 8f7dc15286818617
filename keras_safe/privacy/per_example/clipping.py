"""The clipped gradient sum: rules where a layer has one, the Jacobian fallback elsewhere."""

import dataclasses
import math

import keras
import tensorflow as tf

from keras_safe._validation import check_choice, check_number, fail
from keras_safe.privacy.model_checks import all_layers
from keras_safe.privacy.per_example import install
from keras_safe.privacy.per_example.fallback import FALLBACKS, jacobian
from keras_safe.privacy.per_example.forms import MaterialisedGrad, merge
from keras_safe.privacy.per_example.numerics import Blocks, leading

__all__ = ["PerExampleForms", "clip_factors", "clipped_gradient_sum", "per_example_forms"]


@dataclasses.dataclass
class PerExampleForms:
    """Every variable's per-example gradients for one batch, as gradient forms.

    Attributes:
        forms: one form per variable, aligned with the variables asked for.
        losses: the per-example losses `[B]`.
        outputs: the forward pass's outputs.
        checks: runtime assertions the norms must wait for.
        sources: per variable (same order), the rule whose forms cover it, or None for the
            Jacobian fallback.
        layers: per variable (same order), the layer with a rule that owns it, or None.
    """

    forms: list
    losses: object
    outputs: object
    checks: list
    sources: list
    layers: list


def _microbatch_losses(losses, groups):
    """The loss of each clipping unit: a microbatch's mean loss, or for `Blocks(k)` (the slots
    of a user-level batch) the sum of the k rows' losses (the user's summed loss)."""
    if not groups:
        return losses, []
    blocks = isinstance(groups, Blocks)
    size = groups.size if blocks else groups
    name = "examples_per_user" if blocks else "num_microbatches"
    batch = losses.shape[0]
    if batch is not None and batch % size:
        fail(
            name,
            size,
            f"a divisor of the batch size {batch}",
            "feed user-level batches of whole slots (keras_safe.privacy.poisson_batches with "
            "users=...)"
            if blocks
            else "choose a batch size divisible by num_microbatches (drop the remainder of the "
            "data or pass num_microbatches=None).",
        )
    checks = []
    if batch is None:
        checks.append(
            tf.debugging.assert_equal(
                tf.shape(losses)[0] % size,
                0,
                message=f"{name}={size} must divide the batch size; "
                + (
                    "a user-level batch holds whole slots of examples_per_user rows."
                    if blocks
                    else "choose a batch size divisible by it (the last batch of an epoch too)."
                ),
            )
        )
    with tf.control_dependencies(checks):
        grouped = tf.reshape(losses, leading(groups))
        if blocks:
            return tf.reduce_sum(grouped, axis=1), checks
        return tf.reduce_mean(grouped, axis=1), checks


def per_example_forms(
    model,
    variables,
    forward_and_losses,
    num_microbatches=None,
    use_rules=True,
    fallback="vectorized",
    examples_per_user=None,
):
    """Runs the forward pass with the rules installed and returns `PerExampleForms`.

    The arguments are those of `clipped_gradient_sum`.
    """
    check_choice("fallback", fallback, FALLBACKS)
    num_microbatches = _units(num_microbatches, examples_per_user)
    rules = install.layers_with_rules(model) if use_rules else {}
    records, excluded = [], set()
    rnns = [
        layer
        for layer in all_layers(model)
        if isinstance(layer, keras.layers.RNN) and getattr(layer, "cell", None) in rules
    ]
    with tf.GradientTape(persistent=True) as tape:
        with (
            tf.GradientTape() as sentinel,
            install.installed_rules(rules, records, excluded, sentinel),
            install.unrolled(rnns),
        ):
            losses, outputs = forward_and_losses()
        unit_losses, checks = _microbatch_losses(losses, num_microbatches)
        total = tf.reduce_sum(unit_losses)

    checks = checks + install.exclude_unusable_layers(rules, records, excluded, sentinel, losses)
    records = [r for r in records if r[0] not in excluded]
    by_variable, owners, sources = {}, {}, {}
    if records:
        zs = [z for _, _, record_zs in records for z in record_zs]
        dzs = tape.gradient(total, zs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        position = 0
        for layer, saved, record_zs in records:
            record_dzs = dzs[position : position + len(record_zs)]
            position += len(record_zs)
            for form in rules[layer].forms(layer, saved, *record_dzs):
                key = id(form.variable)
                by_variable.setdefault(key, []).append(form)
                owners[key], sources[key] = layer, rules[layer]

    forms = {}
    for key, var_forms in by_variable.items():
        form = merge(var_forms)
        forms[key] = form.group(num_microbatches) if num_microbatches else form
    rest = [v for v in variables if id(v) not in forms]
    if rest:
        for v, j in zip(rest, jacobian(tape, unit_losses, rest, fallback)):
            forms[id(v)] = MaterialisedGrad(v, j)
    del tape
    return PerExampleForms(
        forms=[forms[id(v)] for v in variables],
        losses=losses,
        outputs=outputs,
        checks=checks,
        sources=[sources.get(id(v)) for v in variables],
        layers=[owners.get(id(v)) for v in variables],
    )


def _units(num_microbatches, examples_per_user):
    """The grouping of the clipping units: None (examples), a microbatch count, or Blocks."""
    if examples_per_user is None:
        return num_microbatches
    size = check_number("examples_per_user", examples_per_user, low=1, integer=True)
    if num_microbatches:
        fail(
            "num_microbatches",
            num_microbatches,
            "None with examples_per_user (a user's slot is the clipping unit)",
            "leave num_microbatches out for user-level clipping.",
        )
    return Blocks(int(size))


def clip_factors(forms, l2_norm_clip, checks=()):
    """Per-example clip factors and the norm bounds they come from.

    The norm bound of example i is `sqrt(sum_v norms_sq_v) + sum_v slack_v` over the variables'
    forms (float64; a slack given as a Python float is that fraction of the form's own norm
    bound): at least the exact norm of its gradient and at least the norm of what it adds to
    the computed clipped sum, before scaling (see `forms`). The factor is
    `C / max(bound, C)`, and 0 where the bound is not finite.

    Returns:
        `(factors, norms)`: float32 `[B]` each.
    """
    # One variable's norms at a time, from the last layer back (the order its output gradients
    # arrive in): the temporaries of the per-example gradients (a convolution's folded copies of
    # its inputs and output gradients) do not pile up. ResNet-20-GN's norm pass at batch 256
    # grew by 869 instead of 1107 MB (plain step: 458), at the same speed.
    # The runtime checks come first: a batch they refuse must fail on their message, not on
    # shapes that disagree further on.
    bounds, previous = [], list(checks)
    for form in reversed(forms):
        with tf.control_dependencies(previous):
            bound = form.norm_bounds()
        bounds.append(bound)
        previous = [bound[0]]
    bounds.reverse()
    norms_sq = tf.add_n([b[0] for b in bounds])
    # A slack given as a Python float is relative to its form's own norm bound; summed over
    # the forms, sum_v r ||v|| <= r sqrt(V) sqrt(sum_v ||v||^2).
    relative = max([s for _, s in bounds if isinstance(s, float)], default=0.0)
    absolute = [s for _, s in bounds if not isinstance(s, float)]
    with tf.control_dependencies(list(checks)):
        norms = tf.sqrt(norms_sq) * (1.0 + 1e-12 + relative * math.sqrt(len(bounds)))
        if absolute:
            norms = norms + tf.add_n(absolute)
    clip = tf.cast(l2_norm_clip, "float64")
    # Examples with a non-finite norm (NaN or inf in their data or loss) get factor 0 and are
    # dropped from the sum: otherwise one such example would turn the whole step into NaN.
    factors = tf.where(tf.math.is_finite(norms), clip / tf.maximum(norms, clip), 0.0)
    return tf.cast(factors, "float32"), tf.cast(norms, "float32")


def clipped_gradient_sum(
    model,
    variables,
    forward_and_losses,
    l2_norm_clip,
    num_microbatches=None,
    use_rules=True,
    fallback="vectorized",
    examples_per_user=None,
):
    """Sum over examples (or microbatches, or users) of gradients clipped to `l2_norm_clip`.

    Per-example norms are upper bounds: the norm used to clip example i is never below the
    exact norm of its gradient by more than a relative 1e-6 (the float64 rounding of the bound
    itself), even where float32 sums cancel, and it also bounds the norm of what the example
    adds to the computed float sum. So no example moves the clipped sum by more than
    `l2_norm_clip`, beyond the float32 rounding of the sum across examples (relative error of
    order `2^-24 sqrt(B T)` of the sum). Tested at 1e-5.

    Args:
        model: the Keras model whose layers the rules record.
        variables: the trainable variables to differentiate.
        forward_and_losses: a zero-argument callable that runs the model's forward pass and
            returns `(per_example_losses, outputs)`; `per_example_losses` has shape `[B]`.
        l2_norm_clip: the clipping bound C on each example's global gradient L2 norm.
        num_microbatches: None for per-example clipping, else the number of microbatches M (the
            batch size must be divisible by M); each microbatch's mean-loss gradient is clipped.
        use_rules: use the layer rules where a layer has one; False computes every per-example
            gradient with the Jacobian fallback (a reference path).
        fallback: how variables without a rule get their per-example gradients: "vectorized"
            (`pfor`) or "loop" (one example after another). `verify` says which agrees with
            the one-example-at-a-time reference.
        examples_per_user: None, or k for user-level clipping: the batch is laid out in slots
            of k consecutive rows, one user's examples per slot (padding rows of weight 0, as
            `keras_safe.privacy.poisson_batches(..., users=...)` lays them out), and the
            gradient of each slot's summed loss (the sum of the user's per-example gradients)
            is clipped as one vector. Factored forms stay factored: a Dense layer's slot norm
            is the Gram form over the slot's rows, `sum_ij (a_i . a_j)(g_i . g_j)`. Not with
            `num_microbatches`.

    Returns:
        `(clipped_sums, losses, outputs, norms)`: a list of gradient sums aligned with
        `variables`, the per-example losses, the forward outputs and the per-example (or
        per-microbatch) norm bounds before clipping (float32; not finite for an example whose
        gradient is not finite: it gets factor 0 and is left out of the sums).

    Example:
        >>> import keras, numpy as np, tensorflow as tf
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.eye(3, dtype="float32") * 10, np.zeros((3, 1), "float32")
        >>> def forward():
        ...     pred = model(x, training=True)
        ...     return tf.reduce_sum((pred - y) ** 2, axis=1), pred
        >>> sums, losses, _, norms = clipped_gradient_sum(
        ...     model, model.trainable_variables, forward, l2_norm_clip=1.0)
        >>> bool(np.linalg.norm(sums[1]) <= 3.0 + 1e-6)  # bias: at most C per example
        True
    """
    if isinstance(l2_norm_clip, (int, float)):
        check_number("l2_norm_clip", l2_norm_clip, low=0.0, low_inclusive=False)
    result = per_example_forms(
        model, variables, forward_and_losses, num_microbatches, use_rules, fallback,
        examples_per_user,
    )  # fmt: skip
    factors, norms = clip_factors(result.forms, l2_norm_clip, result.checks)
    clipped = [tf.cast(f.clipped_sum(factors), v.dtype) for f, v in zip(result.forms, variables)]
    return clipped, result.losses, result.outputs, norms
