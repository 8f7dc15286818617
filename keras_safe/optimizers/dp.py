"""Differentially private optimizers: the optimizer side of DP-SGD.

The model side (keras_safe's train step, installed by `keras_safe.privacy.make_private`) computes
the sum of per-example gradients clipped to `l2_norm_clip`. The optimizer then adds Gaussian
noise, divides by the batch size and applies the result with the wrapped optimizer:

    g = (sum_i clip(grad_i, C) + N(0, (noise_multiplier * C)^2 I)) / B

where B is the expected batch size (`batch_size`, for Poisson sampling), else the number of
examples in the batch, or the number of microbatches when `num_microbatches` is set (then each
microbatch's mean gradient is clipped instead of each example's). This is the Gaussian
mechanism of Abadi et al. 2016, "Deep Learning with Differential Privacy".
"""

from __future__ import annotations

import math
import random

import keras
import tensorflow as tf

from keras_safe.optimizers import provenance
from keras_safe.optimizers.wrapper import OptimizerWrapper, optimizer_chain

NON_PRIVATE_GRADIENTS = (
    "{name} received gradients that did not go through per-example clipping, so training "
    "would not be differentially private. This happens when the model uses Keras's default "
    "train step (or its own `train_step`). Fix: call `model = keras_safe.privacy.make_private("
    "model)` before `fit` (or pass `keras_safe.callbacks.PrivacyBudget()` to `fit`, which does "
    "it for you). In a custom training loop, compute gradients with "
    "`keras_safe.privacy.dp_gradients(model, x, y)` instead of `tape.gradient`."
)


def _check_number(name, value, low, low_inclusive, integer=False, allow_none=True):
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"`{name}` is required.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if integer and int(value) != value:
        raise ValueError(f"`{name}` must be a whole number, got {value!r}.")
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"`{name}` must be finite and {bound}, got {value!r}.")
    return int(value) if integer else float(value)


DP_ARGUMENTS = (
    "l2_norm_clip",
    "noise_multiplier",
    "num_microbatches",
    "target_epsilon",
    "num_examples",
    "batch_size",
    "epochs",
    "delta",
    "accountant",
    "seed",
)


def gaussian_noise(size, seed):
    """`size` independent standard normal draws (float32) from a counter-based seed `[2]`.

    Box-Muller transform (Box & Muller 1958) of Philox uniforms. The radius comes from a
    float64 uniform, so the tail is cut only beyond 8.5 standard deviations (a float32
    uniform would cut it at 5.6, a bounded noise); about twice as fast on CPU as
    `tf.random.stateless_normal` for the millions of values a step needs.
    """
    half = (size + 1) // 2
    # 1 - u in (0, 1] from a 53-bit uniform; the angle needs no more than float32. The angle's
    # stream sits 2^40 draws ahead on the counter, out of reach of the per-step counter.
    u = tf.random.stateless_uniform([half], seed=seed, dtype=tf.float64)
    v = tf.random.stateless_uniform(
        [half], seed=seed + tf.constant([0, 1 << 40], tf.int64), dtype=tf.float32
    )
    radius = tf.sqrt(-2.0 * tf.math.log(tf.cast(1.0 - u, tf.float32)))
    angle = (2.0 * math.pi) * v
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)[:size]


def _innermost(optimizer):
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


@keras.saving.register_keras_serializable(package="keras_safe")
class DPOptimizer(OptimizerWrapper):
    """Makes any Keras optimizer differentially private (DP-SGD's noisy, clipped update).

    Each example's gradient (or each microbatch's mean gradient) is clipped to `l2_norm_clip`
    in global L2 norm over all trainable variables, the clipped gradients are summed, Gaussian
    noise with standard deviation `l2_norm_clip * noise_multiplier` is added once per update,
    and the result is divided by the batch size: the expected batch size `batch_size` when
    given (Poisson sampling), else the number of examples in the batch, or the number of
    microbatches. The wrapped optimizer then applies it as usual (momentum, Adam moments,
    weight decay and learning-rate schedules act on the noisy gradient: post-processing, the
    guarantee is unchanged).

    With `gradient_accumulation_steps=k` on the wrapped optimizer, one update averages `k`
    batches: noise of total standard deviation `l2_norm_clip * noise_multiplier` is spread
    over the `k` steps (each adds `1/sqrt(k)` of it), so the update is the clipped sum over the
    `k * B` examples plus one draw of the calibrated noise, divided by `k * B`.

    Noise is fresh at every step: it comes from a counter-based generator (Philox) keyed by a
    62-bit seed and a draw counter. The counter is an optimizer variable saved with the model,
    so a reloaded model continues it instead of repeating earlier draws; the seed is not saved
    (unless given as `seed`), so a saved model does not reveal its noise. The seed is drawn
    from Python's `random`, so `keras.utils.set_random_seed` makes runs reproducible; for a
    release, do not fix the seed: whoever knows it can regenerate the noise.

    Training needs keras_safe's train step: `keras_safe.privacy.make_private(model)` (or the
    `keras_safe.callbacks.PrivacyBudget` callback). If this optimizer ever receives gradients
    that did not go through per-example clipping it raises, rather than train non-privately.

    Args:
        optimizer: the Keras optimizer to wrap (instance or name, e.g. `"sgd"`).
        l2_norm_clip: clipping bound C on each example's gradient L2 norm (> 0).
        noise_multiplier: noise standard deviation as a multiple of C (>= 0). Give this or
            `target_epsilon`.
        num_microbatches: if set, the batch is split into this many microbatches of
            consecutive examples whose mean gradients are clipped (TF Privacy's semantics); the
            batch size must be divisible by it. One example can move its microbatch's clipped
            gradient by twice `l2_norm_clip`, so the accounting halves the noise multiplier;
            that analysis assumes an example's microbatch does not depend on the others in the
            batch (fixed positions), which Poisson batches do not give: use per-example
            clipping (None, the default) with `poisson_batches`.
        target_epsilon: calibrate `noise_multiplier` to reach this epsilon after `epochs`
            epochs over `num_examples` examples at `batch_size` (needs all three).
        num_examples: number of training examples (for calibration and accounting).
        batch_size: expected batch size; the divisor of the noisy sum, and the sampling rate
            `batch_size / num_examples` of the accountant.
        epochs: planned number of epochs (for calibration).
        delta: the delta of (epsilon, delta)-DP; defaults to
            `keras_safe.privacy.default_delta(num_examples)` when calibrating.
        accountant: `"rdp"` or `"pld"`, the accountant used for calibration.
        seed: seed of the noise stream; None draws one from Python's `random` (seeded by
            `keras.utils.set_random_seed`).
        name: optimizer name.

    Raises:
        ValueError: on a non-positive clip, a negative noise multiplier, a bad microbatch
            count, both or neither of `noise_multiplier` and `target_epsilon`, or calibration
            settings that are missing or inconsistent.

    Example:

    >>> import keras, numpy as np, keras_safe
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(
    ...     optimizer=keras_safe.optimizers.DPOptimizer(
    ...         keras.optimizers.RMSprop(0.01), l2_norm_clip=1.0, noise_multiplier=1.1),
    ...     loss="sparse_categorical_crossentropy")
    >>> model = keras_safe.privacy.make_private(model)
    >>> x, y = np.random.rand(64, 4), np.random.randint(0, 2, 64)
    >>> _ = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    """

    def __init__(
        self,
        optimizer,
        l2_norm_clip=1.0,
        noise_multiplier=None,
        num_microbatches=None,
        target_epsilon=None,
        num_examples=None,
        batch_size=None,
        epochs=None,
        delta=None,
        accountant="rdp",
        seed=None,
        name=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"DPOptimizer got unexpected arguments {sorted(kwargs)}; set optimizer "
                "options (learning rate, weight decay, gradient accumulation...) on the wrapped "
                "optimizer instead."
            )
        inner = keras.optimizers.get(optimizer)
        if isinstance(inner, DPOptimizer) or not isinstance(inner, keras.optimizers.Optimizer):
            raise ValueError(
                f"`optimizer` must be a (non-DP) Keras optimizer or its name, got {optimizer!r}."
            )
        super().__init__(inner, name=name or f"DP{type(inner).__name__}")
        self.l2_norm_clip = _check_number("l2_norm_clip", l2_norm_clip, 0, False, allow_none=False)
        self.num_microbatches = _check_number(
            "num_microbatches", num_microbatches, 1, True, integer=True
        )
        self.num_examples = _check_number("num_examples", num_examples, 1, True, integer=True)
        self.batch_size = _check_number("batch_size", batch_size, 1, True, integer=True)
        self.epochs = _check_number("epochs", epochs, 0, False)
        self.target_epsilon = _check_number("target_epsilon", target_epsilon, 0, False)
        self.delta = _check_number("delta", delta, 0, False)
        if self.delta is not None and self.delta >= 1:
            raise ValueError(
                f"`delta` must be in (0, 1), got {delta!r}; a typical value is "
                "below 1/num_examples."
            )
        if accountant not in ("rdp", "pld"):
            raise ValueError(f"`accountant` must be 'rdp' or 'pld', got {accountant!r}.")
        self.accountant = accountant
        if (
            self.num_examples is not None
            and self.batch_size is not None
            and self.batch_size > self.num_examples
        ):
            raise ValueError(
                f"`batch_size` ({self.batch_size}) is larger than `num_examples` "
                f"({self.num_examples})."
            )
        self.seed = seed
        self._base_seed = int(seed) if seed is not None else random.getrandbits(62)
        noise_multiplier = _check_number("noise_multiplier", noise_multiplier, 0, True)
        if noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "Give `noise_multiplier` (for example 1.1) or `target_epsilon` (with "
                "`num_examples`, `batch_size` and `epochs`) so the noise can be set."
            )
        if self.target_epsilon is not None:
            self.noise_multiplier = self._calibrate(noise_multiplier)
        else:
            self.noise_multiplier = noise_multiplier

    def _accounted_noise(self, noise_multiplier):
        """The noise multiplier the accountant sees for one accounted step.

        - Microbatches of several examples: a microbatch changes entirely when one example
          joins or leaves it, so its clipped gradient can move by 2 * l2_norm_clip: half the
          noise (as TF Privacy accounts microbatching).
        - Gradient accumulation over k batches: each batch is Poisson sampled on its own and
          adds 1/sqrt(k) of the noise, so an update is accounted as k steps at noise / sqrt(k).
        """
        factor = 1.0
        if self.num_microbatches and (
            self.batch_size is None or self.num_microbatches < self.batch_size
        ):
            factor = 2.0
        return noise_multiplier / (factor * math.sqrt(self.accumulation_steps))

    def _calibrate(self, given):
        missing = [n for n in ("num_examples", "batch_size", "epochs") if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"`target_epsilon` needs {', '.join('`' + m + '`' for m in missing)} to "
                "calibrate the noise multiplier."
            )
        from keras_safe.privacy import accounting

        if self.delta is None:
            self.delta = accounting.default_delta(self.num_examples)
        if given is not None:
            spent = accounting.compute_epsilon(
                num_examples=self.num_examples,
                batch_size=self.batch_size,
                epochs=self.epochs,
                noise_multiplier=self._accounted_noise(given),
                delta=self.delta,
                accountant=self.accountant,
            )
            if spent > self.target_epsilon * (1 + 1e-6):
                raise ValueError(
                    f"`noise_multiplier`={given} gives epsilon={spent:.4f}, above "
                    f"`target_epsilon`={self.target_epsilon}. Give only one of the two."
                )
            return float(given)
        accounted = accounting.noise_multiplier_for_epsilon(
            self.target_epsilon,
            num_examples=self.num_examples,
            batch_size=self.batch_size,
            epochs=self.epochs,
            delta=self.delta,
            accountant=self.accountant,
        )
        return float(accounted) / self._accounted_noise(1.0)

    @property
    def accumulation_steps(self):
        """Batches averaged into one update (the wrapped optimizer's gradient accumulation)."""
        return getattr(_innermost(self.inner_optimizer), "gradient_accumulation_steps", None) or 1

    def build(self, var_list):
        if self.built:
            return
        # Only the draw counter is an optimizer variable (saved with the model): the seed is
        # not, so a saved model does not reveal the noise, and a reloaded one continues the
        # counter, so it never repeats a draw of its earlier steps.
        self._noise_draws = self.add_variable(
            shape=(), dtype="int64", initializer="zeros", name="noise_draws"
        )
        super().build(var_list)

    # -- the DP part ---------------------------------------------------------------------------

    def privatize(self, clipped_sums, denominator, variables):
        """Adds the calibrated Gaussian noise to clipped gradient sums and averages them.

        The returned tensors are recorded as this step's DP release
        (`keras_safe.optimizers.provenance`); `apply` accepts no other gradient tensors.

        Args:
            clipped_sums: list of tensors, the sums of per-example (or per-microbatch)
                gradients clipped to `l2_norm_clip`, aligned with `variables`.
            denominator: the divisor (expected batch size, batch size or microbatch count).
            variables: the trainable variables the sums belong to.

        Returns:
            The list of noisy averaged gradients.
        """
        if not self.built:
            self.build(variables)
        stddev = self.l2_norm_clip * self.noise_multiplier / math.sqrt(self.accumulation_steps)
        denominator = tf.cast(denominator, tf.float32)
        sums = [tf.cast(total, tf.float32) for total in clipped_sums]
        if stddev > 0:
            seed = tf.stack(
                [tf.constant(self._base_seed, tf.int64), tf.convert_to_tensor(self._noise_draws)]
            )
            sizes = [int(v.shape.num_elements()) for v in variables]
            noise = tf.split(gaussian_noise(sum(sizes), seed) * stddev, sizes)
            sums = [total + tf.reshape(n, tf.shape(total)) for total, n in zip(sums, noise)]
        noisy = [tf.cast(total / denominator, v.dtype) for total, v in zip(sums, variables)]
        self._noise_draws.assign_add(1)
        return provenance.mark_released(noisy)

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if provenance.unreleased(grads):
            raise RuntimeError(NON_PRIVATE_GRADIENTS.format(name=type(self).__name__))
        if not self.built:
            self.build(trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("DP optimizers run on the TensorFlow backend only.")

    def accounting_settings(self):
        """What an accountant needs: accounted steps so far, their noise and sampling rate.

        Returns:
            A dict with `steps` (accounted steps: one per noisy update, or `k` per update with
            gradient accumulation over `k` batches, each batch being sampled on its own),
            `noise_multiplier` (per accounted step: divided by 2 for microbatches of several
            examples, whose sensitivity is doubled, and by `sqrt(k)` with accumulation), and
            `sampling_rate` (`batch_size / num_examples`, or None when either is unknown).
        """
        rate = None
        if self.batch_size is not None and self.num_examples is not None:
            rate = min(1.0, self.batch_size / self.num_examples)
        updates = int(keras.ops.convert_to_numpy(self.iterations))
        return {
            "steps": updates * self.accumulation_steps,
            "noise_multiplier": self._accounted_noise(self.noise_multiplier),
            "sampling_rate": rate,
        }

    # -- serialization -------------------------------------------------------------------------

    def _dp_config(self):
        return {key: getattr(self, key) for key in DP_ARGUMENTS}

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            **self._dp_config(),
        }


class _BuiltInDP(DPOptimizer):
    """DP version of one built-in Keras optimizer, configured with that optimizer's arguments."""

    _inner_class = None
    _inner_args = ()

    def __init__(self, *args, name=None, **kwargs):
        dp_kwargs = {key: kwargs.pop(key) for key in DP_ARGUMENTS if key in kwargs}
        inner = self._inner_class(**dict(zip(self._inner_args, args)), **kwargs)
        super().__init__(inner, name=name or type(self).__name__, **dp_kwargs)

    def get_config(self):
        inner = self.inner_optimizer.get_config()
        inner.pop("name", None)
        return {"name": self.name, **inner, **self._dp_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        rate = config.get("learning_rate")
        if isinstance(rate, dict):
            config["learning_rate"] = keras.saving.deserialize_keras_object(
                rate, custom_objects=custom_objects
            )
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_safe")
class DPSGD(_BuiltInDP):
    """DP-SGD (Abadi et al. 2016): `keras.optimizers.SGD` with per-example clipping and noise.

    Takes `keras.optimizers.SGD`'s arguments (`learning_rate`, `momentum`, `nesterov`, and the
    common ones such as `weight_decay` or `gradient_accumulation_steps`) plus the DP arguments
    of `DPOptimizer` (`l2_norm_clip`, `noise_multiplier`, `num_microbatches`, and
    `target_epsilon` with `num_examples`, `batch_size`, `epochs`, `delta`). See `DPOptimizer`
    for the semantics.

    Example:

    >>> import keras, numpy as np, keras_safe
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=keras_safe.optimizers.DPSGD(
    ...     learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.1),
    ...     loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> model = keras_safe.privacy.make_private(model)
    >>> x, y = np.random.rand(64, 4), np.random.randint(0, 2, 64)
    >>> _ = model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    """

    _inner_class = keras.optimizers.SGD
    _inner_args = ("learning_rate", "momentum", "nesterov")


@keras.saving.register_keras_serializable(package="keras_safe")
class DPAdam(_BuiltInDP):
    """Adam with DP-SGD's per-example clipping and noise.

    Takes `keras.optimizers.Adam`'s arguments (`learning_rate`, `beta_1`, `beta_2`, `epsilon`,
    `amsgrad`, and the common ones) plus the DP arguments of `DPOptimizer`. Adam's moments
    are computed from the noisy gradient, so the privacy guarantee is unchanged.

    Example:

    >>> import keras, numpy as np, keras_safe
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> model.compile(optimizer=keras_safe.optimizers.DPAdam(
    ...     learning_rate=1e-3, l2_norm_clip=1.0, noise_multiplier=1.1),
    ...     loss="sparse_categorical_crossentropy")
    >>> model = keras_safe.privacy.make_private(model)
    >>> _ = model.fit(np.random.rand(64, 4), np.random.randint(0, 2, 64), verbose=0)
    """

    _inner_class = keras.optimizers.Adam
    _inner_args = ("learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad")


def find_dp_optimizer(optimizer):
    """Returns the DP optimizer in a chain of optimizer wrappers, or None.

    Args:
        optimizer: a Keras optimizer, possibly wrapping others through `inner_optimizer`.

    Returns:
        The first `keras_safe.optimizers.DPOptimizer` in the chain, or None.

    Example:

    >>> import keras
    >>> from keras_safe.optimizers import DPSGD, GradientClip
    >>> dp = DPSGD(learning_rate=0.1, l2_norm_clip=1.0, noise_multiplier=1.0)
    >>> find_dp_optimizer(GradientClip(dp)) is dp
    True
    """
    for candidate in optimizer_chain(optimizer):
        if isinstance(candidate, DPOptimizer):
            return candidate
    return None
