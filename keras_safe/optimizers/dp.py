"""Differentially private optimizers: the optimizer side of DP-SGD.

The model side (keras_safe's train step, installed by `keras_safe.privacy.make_private`) computes
the sum of per-example gradients clipped to `l2_norm_clip`. The optimizer then adds Gaussian
noise, divides by the expected batch size and applies the result with the wrapped optimizer:

    g = (sum_i clip(grad_i, C) + N(0, (noise_multiplier * C)^2 I)) / B

where B is the expected batch size, or the number of microbatches when `num_microbatches` is set
(then each microbatch's mean gradient is clipped instead of each example's). This is the
Gaussian mechanism of Abadi et al. 2016, "Deep Learning with Differential Privacy".
"""

import dataclasses
import math

import keras
import tensorflow as tf

from keras_safe._validation import STEP_REFUSED, PrivacyError, check_choice, check_number, fail
from keras_safe.accounting import DPSchedule, accountant_names, default_delta, epsilon_of
from keras_safe.accounting.checks import check_delta
from keras_safe.accounting.schedule import check_privacy_unit, check_sampling
from keras_safe.optimizers import noise, provenance, replicas
from keras_safe.optimizers.noise import fresh_seed
from keras_safe.optimizers.wrapper import OptimizerWrapper, innermost, optimizer_chain

__all__ = ["DPAdam", "DPOptimizer", "DPSGD", "NON_PRIVATE_GRADIENTS", "find_dp_optimizer"]

NON_PRIVATE_GRADIENTS = (
    "{name} received gradients that are not the DP release of this step (per-example clipped "
    "and noised by keras_safe), so applying them would not be differentially private. This "
    "happens when the model uses Keras's default train step (or its own `train_step` that "
    "applies other gradients). Fix: call `model = keras_safe.privacy.make_private(model)` "
    "before `fit` (or pass `keras_safe.callbacks.PrivacyBudget()` to `fit`, which does it for "
    "you). In a custom training loop, apply exactly what "
    "`keras_safe.privacy.dp_gradients(model, x, y)` returns."
)

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
    "sampling",
    "noise_calibrated",
    "secure_noise",
    "privacy_unit",
    "examples_per_user",
    "physical_batch_size",
)


@keras.saving.register_keras_serializable(package="keras_safe")
class DPOptimizer(OptimizerWrapper):
    """Makes any Keras optimizer differentially private (DP-SGD's noisy, clipped update).

    Each example's gradient (or each microbatch's mean gradient) is clipped to `l2_norm_clip`
    in global L2 norm over all trainable variables, the clipped gradients are summed, Gaussian
    noise with standard deviation `l2_norm_clip * noise_multiplier` is added once per update,
    and the result is divided by the expected batch size (or the number of microbatches). The
    wrapped optimizer then applies it as usual (momentum, Adam moments, weight decay and
    learning-rate schedules act on the noisy gradient: post-processing, the guarantee is
    unchanged).

    The data settings are read from `fit`: on arrays, the number of examples and the batch size
    given to `fit`; on `keras_safe.privacy.poisson_batches`, the settings it was built with.
    Declare `num_examples` and `batch_size` only for other inputs (a generic `tf.data` pipeline,
    `train_on_batch`, a custom loop); declared values that disagree with what `fit` does are
    refused, since they would misstate epsilon.

    With `gradient_accumulation_steps=k` on the wrapped optimizer, one update averages `k`
    batches: noise of total standard deviation `l2_norm_clip * noise_multiplier` is spread
    over the `k` batches (each adds `1/sqrt(k)` of it); see `keras_safe.accounting.DPSchedule` for
    how that, and microbatching, is accounted.

    Noise is fresh at every step: a counter-based generator (Philox) keyed by a 62-bit seed and a
    draw counter. The seed comes from the operating system's entropy, whatever the global Keras
    or NumPy seed, and is not saved, so neither `keras.utils.set_random_seed` nor a saved model
    lets anyone regenerate the noise; the counter is saved, so a reloaded model never repeats a
    draw. `seed=...` makes the noise reproducible for debugging: whoever knows that seed can
    regenerate the noise and subtract it, so the guarantee is void for a release, and the
    model's privacy ledger marks those steps as seeded.

    Training needs keras_safe's train step: `keras_safe.privacy.make_private(model)` (or the
    `keras_safe.callbacks.PrivacyBudget` callback). `apply` accepts only the gradient tensors
    this optimizer released in the same step; anything else raises instead of training
    non-privately.

    Args:
        inner_optimizer: the Keras optimizer to wrap (instance or name, e.g. `"sgd"`), as
            Keras's `LossScaleOptimizer` names it.
        l2_norm_clip: clipping bound C on each example's gradient L2 norm (> 0).
        noise_multiplier: noise standard deviation as a multiple of C (>= 0). Give this or
            `target_epsilon`.
        num_microbatches: if set, the batch is split into this many microbatches of
            consecutive examples whose mean gradients are clipped (TF Privacy's semantics);
            every batch size must be divisible by it. Use per-example clipping (None, the
            default) with `poisson_batches`.
        target_epsilon: the model's privacy budget, for its whole life: the total epsilon
            every run together may spend (it is saved in the model's privacy ledger, with
            `delta` and `accountant`; see `keras_safe.privacy.PrivacyLedger.set_budget` to
            change it on purpose). At the start of each `fit` the noise is calibrated so that
            what the model spent before plus the planned run, `epochs` epochs of
            `ceil(n / batch_size)` steps, stays within it; a run that cannot is refused before
            its first step, and no step ever takes the model past it (`train_on_batch` and
            custom loops included). Calibrated before `fit` when `num_examples`, `batch_size`
            and `epochs` are all declared.
        num_examples: number of training examples, for inputs keras_safe cannot count.
        batch_size: expected batch size (the divisor of the noisy sum), for inputs keras_safe
            cannot read it from.
        epochs: planned number of epochs (for calibration before `fit`).
        delta: the delta of (epsilon, delta)-DP, below `1 / num_examples`; defaults to the
            model's budget's, else `keras_safe.accounting.default_delta(num_examples)`.
        accountant: `"rdp"` or `"pld"` (or another registered accountant): calibrates the
            noise and enforces `target_epsilon`; None (default) is the model's budget's, else
            `"rdp"`.
        seed: None (the default: OS entropy, the only setting valid for a release), or an
            integer for reproducible, non-private noise.
        sampling: how `fit` on arrays draws its batches. None or `"poisson"` (the default):
            Poisson sampling, the batches the usual epsilon assumes. `"shuffle"`: Keras's
            shuffled fixed-size batches, an explicit opt-in accounted without amplification
            by sampling (each epoch begun is one Gaussian mechanism; see
            `keras_safe.accounting.DPSchedule`) and labelled so in the logs, `PrivacyBudget`'s
            summary and the privacy statement. `fit(..., shuffle=False)` on a private model is
            the same opt-in, for batches in the data's order. For batches keras_safe does not
            draw (`train_on_batch`, `dp_gradients`, custom loops, a `tf.data` pipeline of your
            own) it states what they are:
            `"poisson"` declares them Poisson samples of `num_examples` at the expected
            `batch_size` (accounted with amplification by sampling, on the caller's word);
            None or `"shuffle"` accounts each such step as a Gaussian mechanism of its own.
        secure_noise: False (default): the Gaussian noise of
            `keras_safe.optimizers.noise.gaussian_noise` (no atoms, 52-bit resolution). True: a
            release that no floating-point effect of the sampler reaches: the clipped sum is
            rounded to a power-of-two grid `g` about `2^-36 C`, the noise is a Gaussian of
            standard deviation `(1 + g sqrt(d) / C) sigma C` rounded to whole grid steps,
            and their sum is exact in float64 (`snapped_gaussian_sum`; the factor covers the
            rounding of the sum, by which one example can move it by at most `g sqrt(d)` more).
            About twice the cost of the default noise draw; one device only.
        privacy_unit: `"example"` (the default: the guarantee covers one training example) or
            `"user"`: it covers one user with all of their examples. Then `num_examples` and
            `batch_size` count users, batches carry user ids
            (`keras_safe.privacy.poisson_batches(x, y, users=ids, examples_per_user=k)`, or
            `fit(x, y, users=ids)` on arrays), each step samples users (not rows), and the sum
            of each sampled user's per-example gradients (at most `examples_per_user` of
            their examples, drawn at random) is clipped to `l2_norm_clip` as one vector.
        examples_per_user: with `privacy_unit="user"`: the most examples of one user a step
            uses (the rows of a user's slot in the batch); read from the data when not given.
        physical_batch_size: None, or P: a batch (the logical batch, `fit`'s `batch_size`, a
            Poisson sample at rate `batch_size / num_examples`) is clipped in chunks of P rows
            one after the other, so that memory holds one chunk's activations and
            per-example factors, and the noise is drawn once for the whole batch, which is
            accounted as one step (what Opacus's `BatchMemoryManager` does with logical and
            physical batches). It also lowers the memory of an ordinary batch where the
            per-example factors fill it (conv nets: `batch_size=256` in chunks of 64). `fit` on
            arrays pads each Poisson batch to a multiple of P (the size a sample exceeds with
            probability below 1e-9, rounded up); other batches must have a fixed number of
            rows, a multiple of P. Unlike `gradient_accumulation_steps`, which accounts every
            physical batch as its own Poisson sample with a share of the noise, this keeps the
            epsilon of the large batch.
        noise_calibrated: set in saved configs: True when `noise_multiplier` was calibrated
            from `target_epsilon` (it is calibrated again, for what is left, at the next
            `fit`).
        name: optimizer name.

    Raises:
        keras_safe._validation.ArgumentError: on a non-positive clip, a negative noise
            multiplier, a bad microbatch count, both or neither of `noise_multiplier` and
            `target_epsilon`, or calibration settings that are inconsistent.

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
        inner_optimizer=None,
        l2_norm_clip=1.0,
        noise_multiplier=None,
        num_microbatches=None,
        target_epsilon=None,
        num_examples=None,
        batch_size=None,
        epochs=None,
        delta=None,
        accountant=None,
        seed=None,
        sampling=None,
        noise_calibrated=False,
        secure_noise=False,
        privacy_unit="example",
        examples_per_user=None,
        physical_batch_size=None,
        name=None,
        **kwargs,
    ):
        if "optimizer" in kwargs:
            fail(
                "optimizer",
                kwargs["optimizer"],
                "given as inner_optimizer (Keras's name for the optimizer a wrapper wraps)",
                "pass DPOptimizer(inner_optimizer=...) or the optimizer first.",
            )
        if kwargs:
            fail(
                "kwargs",
                sorted(kwargs),
                "empty (DPOptimizer takes only DP arguments)",
                "set optimizer options (learning rate, weight decay, gradient accumulation...) "
                "on the wrapped optimizer instead.",
            )
        inner = keras.optimizers.get(inner_optimizer)
        if isinstance(inner, DPOptimizer) or not isinstance(inner, keras.optimizers.Optimizer):
            fail("inner_optimizer", inner_optimizer, "a (non-DP) Keras optimizer or its name")
        super().__init__(inner, name=name or f"DP{type(inner).__name__}")
        self.l2_norm_clip = check_number("l2_norm_clip", l2_norm_clip, low=0, low_inclusive=False)
        self.num_microbatches = check_number(
            "num_microbatches", num_microbatches, low=1, integer=True, allow_none=True
        )
        self.num_examples = check_number(
            "num_examples", num_examples, low=1, integer=True, allow_none=True
        )
        self.batch_size = check_number(
            "batch_size", batch_size, low=1, integer=True, allow_none=True
        )
        self.epochs = check_number("epochs", epochs, low=0, low_inclusive=False, allow_none=True)
        self.target_epsilon = check_number(
            "target_epsilon", target_epsilon, low=0, low_inclusive=False, allow_none=True
        )
        self.delta = None if delta is None else check_delta(delta, self.num_examples)
        self.accountant = (
            None
            if accountant is None
            else check_choice(
                "accountant",
                accountant.lower() if isinstance(accountant, str) else accountant,
                accountant_names(),
            )
        )
        self.sampling = None if sampling is None else check_sampling(sampling)
        self.privacy_unit = check_privacy_unit(privacy_unit or "example")
        self.examples_per_user = check_number(
            "examples_per_user", examples_per_user, low=1, integer=True, allow_none=True
        )
        if self.examples_per_user is not None and self.privacy_unit != "user":
            fail(
                "examples_per_user",
                self.examples_per_user,
                "given with privacy_unit='user' only",
                "pass privacy_unit='user' for user-level privacy, or leave examples_per_user "
                "out (for the user-level epsilon of example-level training, pass users=... to "
                "fit).",
            )
        self.physical_batch_size = check_number(
            "physical_batch_size", physical_batch_size, low=1, integer=True, allow_none=True
        )
        if self.physical_batch_size and self.num_microbatches:
            fail(
                "physical_batch_size",
                self.physical_batch_size,
                "None with num_microbatches (chunks would cut microbatches)",
                "leave one of them out.",
            )
        if self.privacy_unit == "user" and self.num_microbatches:
            fail(
                "num_microbatches",
                self.num_microbatches,
                "None with privacy_unit='user' (each user's examples are clipped together)",
                "leave num_microbatches out for user-level privacy.",
            )
        if self.num_examples and self.batch_size and self.batch_size > self.num_examples:
            fail("batch_size", self.batch_size, f"at most num_examples ({self.num_examples})")
        if seed is not None:
            seed = check_number("seed", seed, low=0, integer=True)
        self.seed = seed
        self._base_seed = seed if seed is not None else fresh_seed()
        self.secure_noise = check_choice("secure_noise", secure_noise, (True, False))
        noise_multiplier = check_number(
            "noise_multiplier", noise_multiplier, low=0, allow_none=True
        )
        if noise_multiplier is None and self.target_epsilon is None:
            fail(
                "noise_multiplier",
                None,
                "given, or `target_epsilon` instead",
                "give `noise_multiplier` (for example 1.1) or `target_epsilon` so the noise can "
                "be set.",
            )
        self.noise_multiplier = noise_multiplier
        self.noise_calibrated = bool(noise_calibrated) and noise_multiplier is not None
        if (
            self.target_epsilon is not None
            and self.num_examples
            and self.batch_size
            and self.epochs
        ):
            # A declared plan: the noise is set once for it (the model's whole budget), and
            # each run is checked against it, not calibrated again.
            self.calibrate(self.schedule(), self.epochs)
            self.noise_calibrated = False

    # -- settings and calibration ----------------------------------------------------------------

    @property
    def accumulation_steps(self):
        """Batches averaged into one update (the wrapped optimizer's gradient accumulation)."""
        return getattr(innermost(self.inner_optimizer), "gradient_accumulation_steps", None) or 1

    @property
    def seeded(self):
        """True when the noise comes from a user-given seed (reproducible: not for a release)."""
        return self.seed is not None

    @property
    def needs_calibration(self):
        """True while `target_epsilon` is given but the noise is not yet calibrated."""
        return self.noise_multiplier is None

    def schedule(
        self,
        num_examples=None,
        batch_size=None,
        steps_per_epoch=None,
        sampling=None,
        one_pass_epochs=False,
        examples_per_user=None,
    ):
        """The `DPSchedule` of this optimizer on data of the given size (declared values are
        checked against it); `sampling`: what the data is known to be, else this optimizer's.
        With `privacy_unit="user"`, sizes count users."""
        return DPSchedule.from_optimizer(
            self, num_examples, batch_size, steps_per_epoch, sampling, one_pass_epochs,
            examples_per_user,
        )  # fmt: skip

    def calibrate(self, schedule, epochs, prior=(), delta=None, accountant=None):
        """Sets (or checks) `noise_multiplier` so that `prior` segments (what the model spent
        before) plus `epochs` epochs of `schedule` spend at most `target_epsilon`.

        A noise multiplier that was calibrated before is calibrated again, for what is left; a
        given one is checked against the plan instead.

        Args:
            schedule: the `DPSchedule` of the run.
            epochs: the epochs planned.
            prior: `(accounted noise, accounted rate, mechanisms)` segments already spent (the
                model's privacy ledger).
            delta: the budget's delta; defaults to this optimizer's, else
                `default_delta(num_examples)`.
            accountant: the budget's accountant; defaults to this optimizer's, else `"rdp"`.

        Raises:
            keras_safe._validation.ArgumentError: naming `target_epsilon` when nothing of the
                budget is left or the plan cannot fit in it, or `noise_multiplier` when a given
                noise misses the target.
        """
        if self.target_epsilon is None:
            return self.noise_multiplier
        steps = schedule.batches_for_epochs(epochs)
        if delta is None:
            delta = self.delta if self.delta is not None else default_delta(schedule.num_examples)
        accountant = accountant or self.accountant or "rdp"
        prior = [tuple(p) for p in prior if p[2] > 0]
        spent = epsilon_of(prior, delta, accountant) if prior else 0.0
        target = self.target_epsilon
        no_room = (
            f"a budget with room for this fit: the model spent epsilon {spent:.4f} of it already "
            f"(delta {delta:.3g}, {accountant.upper()} accountant, its privacy ledger), and "
            f"{steps} more steps ({schedule.label}) do not fit in what is left; every "
            "target_epsilon is the model's budget for its whole life"
        )
        no_room_fix = (
            "stop training here, train fewer steps, or raise the budget explicitly with "
            "keras_safe.privacy.get_ledger(model).set_budget(new_target) and give that "
            "target_epsilon (state the larger epsilon)."
        )
        if spent >= target * (1 - 1e-9) and steps > 0:
            fail("target_epsilon", target, no_room, no_room_fix)
        if self.noise_multiplier is None or self.noise_calibrated:
            try:
                noise = schedule.calibrate(target, steps, delta, accountant, prior)
            except ValueError:
                fail("target_epsilon", target, no_room + " (not even at noise 1000)", no_room_fix)
            self.noise_multiplier = float(noise)
            self.noise_calibrated = True
            return self.noise_multiplier
        planned = dataclasses.replace(schedule, noise_multiplier=self.noise_multiplier)
        total = planned.epsilon(steps, delta, accountant, prior)
        if total > target * (1 + 1e-6):
            fail(
                "noise_multiplier",
                self.noise_multiplier,
                f"large enough for target_epsilon={target} over {steps} steps "
                f"({schedule.label}; the model spent epsilon {spent:.4f} before, and the plan "
                f"would bring it to {total:.4f})",
                "give only `target_epsilon` and let keras_safe calibrate the noise for the "
                "steps that will run, or train fewer steps.",
            )
        return self.noise_multiplier

    def build(self, var_list):
        if self.built:
            return
        # Only the draw counter is an optimizer variable (saved with the model): the seed is
        # not, so a saved model does not reveal the noise, and a reloaded one continues the
        # counter, so it never repeats a draw of its earlier steps.
        # Under a strategy every replica counts the same updates; the first replica's count is
        # kept (each replica's draw is told apart by its index in `noise.noise_key`).
        self._noise_draws = self.add_variable(
            shape=(),
            dtype="int64",
            initializer="zeros",
            aggregation="only_first_replica",
            name="noise_draws",
        )
        super().build(var_list)

    # -- the DP part -----------------------------------------------------------------------------

    def privatize(self, clipped_sums, denominator, variables, gate=None):
        """Adds the calibrated Gaussian noise to clipped gradient sums and averages them.

        Called by keras_safe's train step only, which records what it finally releases (these
        tensors, once the charge and the checks are in place) as the step's DP release
        (`keras_safe.optimizers.provenance`); `apply` accepts no other gradient tensors.

        Under a `tf.distribute` strategy with R replicas in sync (each passing the clipped sum of
        its part of the global batch), each replica adds independent noise of standard deviation
        `l2_norm_clip * noise_multiplier / sqrt(R)`, the noisy sums are summed over the
        replicas, and every replica returns the whole release of the global batch
        (`keras_safe.optimizers.replicas`).

        Args:
            clipped_sums: list of tensors, the sums of per-example (or per-microbatch)
                gradients clipped to `l2_norm_clip`, aligned with `variables`.
            denominator: the divisor (expected global batch size, or microbatch count).
            variables: the trainable variables the sums belong to.
            gate: None, or a boolean tensor: False releases zeros (the step's own checks
                refused it where assertions do not run, under XLA).

        Returns:
            The list of noisy averaged gradients.

        Raises:
            keras_safe._validation.ArgumentError: when the noise was never calibrated.
        """
        if not provenance.in_release():
            raise PrivacyError(
                f"{type(self).__name__}.privatize is called by keras_safe's train step only: "
                "there the sums come from its per-example clipping, the step's checks hold and "
                "the ledger is charged, none of which a direct call has. Fix: compute gradients "
                "with keras_safe.privacy.dp_gradients(model, x, y) and apply exactly what it "
                "returns."
            )
        if self.noise_multiplier is None:
            fail(
                "noise_multiplier",
                None,
                "calibrated before the first step",
                "train with `fit` (which calibrates `target_epsilon` for the planned epochs), "
                "or declare `num_examples`, `batch_size` and `epochs` on the optimizer.",
            )
        if not self.built:
            self.build(variables)
        stddev = self.schedule().noise_stddev(self.l2_norm_clip)
        denominator = tf.cast(denominator, tf.float32)
        sums = [tf.cast(total, tf.float32) for total in clipped_sums]
        if stddev > 0:
            sizes = [int(v.shape.num_elements()) for v in variables]
            if self.secure_noise:
                sums = self._snapped_release(sums, sizes, stddev)
            else:
                noise = replicas.noise_shares(self._base_seed, self._noise_draws, sizes, stddev)
                sums = [total + tf.reshape(n, tf.shape(total)) for total, n in zip(sums, noise)]
        # Under a strategy, every replica gets the whole release (keras_safe.optimizers.replicas).
        sums = replicas.sum_over_replicas(sums)
        scale = 1.0 / denominator
        if gate is not None:
            scale = scale * tf.cast(gate, tf.float32)
        noisy = [tf.cast(total * scale, v.dtype) for total, v in zip(sums, variables)]
        self._noise_draws.assign_add(1)
        return noisy

    def _snapped_release(self, sums, sizes, stddev):
        """`secure_noise`: the sums snapped to a power-of-two grid plus rounded Gaussian noise,
        exact in float64 (`keras_safe.optimizers.noise.snapped_gaussian_sum`)."""
        if replicas.num_replicas() > 1:
            raise PrivacyError(
                "secure_noise=True runs on one device: the replicas' rounded noise shares would "
                "not add up to one rounded Gaussian. Fix: train without a tf.distribute "
                "strategy, or with secure_noise=False."
            )
        # The grid: a power of two about 2^-36 C, so that sums of up to 2^16 examples and the
        # noise stay below 2^52 grid steps (exact in float64); the in-step check below holds it.
        grid = 2.0 ** (math.floor(math.log2(self.l2_norm_clip)) - 36)
        dimension = sum(sizes)
        # Rounding the sum moves each coordinate by at most grid / 2: one example can move the
        # rounded sum by C + grid * sqrt(d); the noise grows by that factor.
        stddev = stddev * (1.0 + grid * math.sqrt(dimension) / self.l2_norm_clip)
        step = noise.noise_key(self._base_seed, 0, self._noise_draws)
        out = []
        for i, total in enumerate(sums):
            key = tf.random.experimental.stateless_fold_in(step, i)
            check = tf.debugging.assert_less(
                tf.reduce_max(tf.abs(tf.cast(total, tf.float64))),
                tf.constant(2.0**52 * grid, tf.float64),
                message=f"{STEP_REFUSED}a clipped sum is too large for the exact grid of "
                "secure_noise (more than 2^16 examples of norm C in one step). Fix: use "
                "smaller batches with secure_noise=True.",
            )
            with tf.control_dependencies([check]):
                out.append(
                    tf.cast(noise.snapped_gaussian_sum(total, stddev, grid, key), tf.float32)
                )
        return out

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if provenance.unreleased(grads):
            raise PrivacyError(NON_PRIVATE_GRADIENTS.format(name=type(self).__name__))
        if not self.built:
            self.build(trainable_variables)
        # Everything the wrapped optimizer does (its step counter included) waits for the
        # release, which waits for the step's checks and the ledger's charge: a step refused
        # there (the budget, for example) changes nothing.
        with tf.control_dependencies([g for g in grads if g is not None]):
            # Keras's optimizer sums the replicas' gradients: each hands on its 1/R share.
            self.inner_optimizer.apply(
                replicas.share_for_inner_optimizer(grads), trainable_variables
            )

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("DP optimizers run on the TensorFlow backend only.")

    # -- serialization ---------------------------------------------------------------------------

    def _dp_config(self):
        config = {key: getattr(self, key) for key in DP_ARGUMENTS}
        if not self.noise_calibrated:
            config.pop("noise_calibrated")
        if self.privacy_unit == "example":
            config.pop("privacy_unit")
            config.pop("examples_per_user")
        if self.physical_batch_size is None:
            config.pop("physical_batch_size")
        return config

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
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
