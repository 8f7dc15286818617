"""`GradientClip`: a wrapper around any optimizer that clips (or drops) gradients first.

The wrapper computes the gradient norms of a step, lets its clip rule (one class per `mode`, in
this package) transform the gradients, keeps the statistics shared by every rule, drops steps
whose gradients are not finite, and hands the result to the wrapped ("inner") optimizer.
"""

import keras
import tensorflow as tf
from keras import ops

from keras_safe._validation import PrivacyError, check_choice, fail
from keras_safe.optimizers import provenance, replicas
from keras_safe.optimizers.clipping.adaptive import AdaptiveClip
from keras_safe.optimizers.clipping.agc import AGCClip
from keras_safe.optimizers.clipping.base import l2_norm
from keras_safe.optimizers.clipping.global_norm import GlobalNormClip
from keras_safe.optimizers.clipping.per_layer import PerLayerClip
from keras_safe.optimizers.dp import NON_PRIVATE_GRADIENTS, find_dp_optimizer
from keras_safe.optimizers.wrapper import OptimizerWrapper

__all__ = ["MODES", "RULES", "GradientClip", "make_rule"]

#: The clip rule behind each `mode` (a mode may pick a variant from its arguments).
RULES = {
    "global_norm": GlobalNormClip,
    "per_layer": PerLayerClip,
    "adaptive": AdaptiveClip,
    "agc": AGCClip,
}
MODES = tuple(RULES)


def make_rule(mode, **arguments):
    """The clip rule for `GradientClip(mode=mode, **arguments)`; None means "the default".

    Raises:
        keras_safe._validation.ArgumentError: for an unknown mode, an argument the mode does
            not read, or a value the rule refuses.

    Example:
        >>> make_rule("agc", clip_factor=0.05, clip_norm=None)
        AGCClip(clip_factor=0.05, epsilon=0.001)
    """
    check_choice("mode", mode, MODES)
    given = {name: value for name, value in arguments.items() if value is not None}
    rule_class = RULES[mode].select(given)
    for name in sorted(given):
        if name not in rule_class.arguments:
            rule_class.reject(name, given[name])
    return rule_class(**given)


def _dense(gradient):
    """Turns a `tf.IndexedSlices` gradient (from an embedding lookup) into a dense tensor."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


@keras.saving.register_keras_serializable(package="keras_safe")
class GradientClip(OptimizerWrapper):
    """Wraps any Keras optimizer and clips (or drops) the gradients before it applies them.

    Modes (every mode has a default threshold, so `GradientClip(opt, mode=m)` works as is);
    each is a clip rule of `keras_safe.optimizers.clipping`, available as `optimizer.rule`:

    - `"global_norm"` (`GlobalNormClip`): scale all gradients by `min(1, c / N)`, `N` the
      global L2 norm of all gradients of the step. `clip_norm` is a fixed `c` (default 1.0),
      or `"auto"` (`AutoGlobalNormClip`) for a threshold that follows training:
      `c = auto_factor * m`, with `m` an exponential moving average (decay `ema_decay`) of
      the already clipped global norms of earlier steps; the first step is never clipped.
    - `"per_layer"` (`PerLayerClip`): the same rule applied separately to each variable
      (`group="variable"`, default) or to each layer (`group="layer"`: the variables that
      share a path prefix, such as `dense/kernel` and `dense/bias`), each with threshold
      `clip_norm` (default 1.0).
    - `"adaptive"` (`AdaptiveClip`): global norm clipping whose threshold tracks the
      `target_quantile` of the recent gradient norms by the geometric update of Andrew et al.
      (2021): `c <- c * exp(-quantile_learning_rate * (b - target_quantile))`, where `b` is 1
      if this step's norm was at most `c` and 0 otherwise. `clip_norm` is the initial
      threshold (default 1.0); `target_quantile` defaults to 0.5 (the median) and
      `quantile_learning_rate` to 0.2, the values of the paper.
    - `"agc"` (`AGCClip`): unit-wise adaptive gradient clipping of Brock et al. (2021): for
      each unit `i` (see `unitwise_norm`), if `||G_i|| > clip_factor * max(||W_i||, epsilon)`
      then `G_i <- clip_factor * max(||W_i||, epsilon) * G_i / ||G_i||`. Defaults
      `clip_factor=0.01`, `epsilon=1e-3` as in the paper.

    With `skip_non_finite=True` (the default) a step whose gradients contain NaN or Inf is
    dropped: the weights and the inner optimizer's state (its slots and `iterations`) stay as
    they were, no threshold moves, and `skipped_steps` grows by one.

    Statistics, kept in optimizer variables (saved with the optimizer) and returned by
    `step_logs()`: `grad_norm` (global L2 norm of the last step's gradients before clipping),
    `clip_fraction` (fraction of the applied steps so far whose gradients were clipped),
    `skipped_steps` (number of dropped non-finite steps) and, for `"adaptive"` and
    `clip_norm="auto"`, `clip_norm` (the threshold for the next step). keras_safe's own train
    step (`keras_safe.privacy.make_private`) merges `step_logs()` into the logs of every
    batch. Keras's default train step does not know about them: add the callback
    `keras_safe.callbacks.GradientMonitor()` to `fit`, which copies them into `logs` at the
    end of every batch and epoch (progress bar, `History`, CSVLogger, TensorBoard).

    Differential privacy: under DP-SGD the clipping that bounds each example's influence is
    the per-example clipping of the DP optimizer, set by its `l2_norm_clip`; `GradientClip`
    does not replace it. `GradientClip(DPSGD(...))` receives the gradient after per-example
    clipping, summing, noising and averaging, and clips that noisy average: this is
    post-processing of a DP release, so the privacy guarantee (epsilon, delta) is unchanged,
    and its outputs count as a release for the DP optimizer below. Like the DP optimizer, it
    refuses (`PrivacyError`, a `RuntimeError`) gradients that are not a DP release
    of the step, such as those of Keras's default train step when `make_private` was not
    called. DP-SGD drops any example whose gradient is not finite before summing, so the noisy
    gradient is finite and steps are not skipped for one bad example (a skip would reveal
    it); should a skip happen anyway, the step was still charged to the privacy budget when
    its noise was drawn.

    Args:
        inner_optimizer: the `keras.optimizers.Optimizer` to wrap, or a name or config that
            `keras.optimizers.get` accepts (Keras's `LossScaleOptimizer` names it the same).
        mode: one of `"global_norm"`, `"per_layer"`, `"adaptive"`, `"agc"`.
        clip_norm: threshold for `"global_norm"` (a positive float or `"auto"`),
            `"per_layer"` (a positive float) and initial threshold of `"adaptive"`.
            Defaults to 1.0.
        group: `"per_layer"` only: `"variable"` (default) or `"layer"`.
        target_quantile: `"adaptive"` only: quantile of the gradient norm to track, in (0, 1).
        quantile_learning_rate: `"adaptive"` only: step size of the geometric update, > 0.
        clip_factor: `"agc"` only: the ratio `lambda` of gradient norm to weight norm, > 0.
        epsilon: `"agc"` only: floor on the weight norm, so that zero-initialised weights
            (biases) can move, > 0.
        auto_factor: `"global_norm"` with `clip_norm="auto"` only: multiple of the moving
            average of the norm above which a step is clipped, > 1. Defaults to 2.0.
        ema_decay: `"global_norm"` with `clip_norm="auto"` only: decay of the moving average,
            in [0, 1). Defaults to 0.99.
        skip_non_finite: whether to drop a step whose gradients contain NaN or Inf.
        name: name of the optimizer.

    Raises:
        keras_safe._validation.ArgumentError: (a `ValueError`) for an unknown mode, a
            threshold out of range, an argument that the chosen mode does not read, or an
            inner optimizer that cannot be wrapped.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.optimizers import GradientClip
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=GradientClip(keras.optimizers.SGD(0.1), mode="agc"),
        ...               loss="mse")
        >>> x = np.ones((8, 4), "float32"); y = np.zeros((8, 1), "float32")
        >>> _ = model.fit(x, y, epochs=1, verbose=0)
        >>> sorted(model.optimizer.step_logs())
        ['clip_fraction', 'grad_norm', 'skipped_steps']
    """

    def __init__(
        self,
        inner_optimizer=None,
        mode="global_norm",
        clip_norm=None,
        group=None,
        target_quantile=None,
        quantile_learning_rate=None,
        clip_factor=None,
        epsilon=None,
        auto_factor=None,
        ema_decay=None,
        skip_non_finite=True,
        name=None,
        **kwargs,
    ):
        if "optimizer" in kwargs:
            fail(
                "optimizer",
                kwargs["optimizer"],
                "given as inner_optimizer (Keras's name for the optimizer a wrapper wraps)",
                "pass GradientClip(inner_optimizer=...) or the optimizer first.",
            )
        for key in sorted(kwargs):
            fail(
                key,
                kwargs[key],
                "set on the wrapped optimizer, not on GradientClip",
                "set learning rate, weight decay and Keras's own clipping options on the "
                "wrapped optimizer, e.g. "
                "GradientClip(keras.optimizers.SGD(learning_rate=0.1, weight_decay=1e-4)).",
            )
        rule = make_rule(
            mode,
            clip_norm=clip_norm,
            group=group,
            target_quantile=target_quantile,
            quantile_learning_rate=quantile_learning_rate,
            clip_factor=clip_factor,
            epsilon=epsilon,
            auto_factor=auto_factor,
            ema_decay=ema_decay,
        )
        if skip_non_finite not in (True, False):
            fail("skip_non_finite", skip_non_finite, "True or False")
        super().__init__(_inner(inner_optimizer), name=name)
        self.mode = mode
        self.rule = rule
        self.skip_non_finite = bool(skip_non_finite)

    def build(self, var_list):
        """Creates the statistics and the rule's variables, and builds the inner optimizer.

        Args:
            var_list: the model's trainable variables.
        """
        if self.built:
            return
        var_list = list(var_list)
        # The order of the variables is the order of a saved file: shared statistics, the
        # rule's state, the per-variable norms, then the inner optimizer's.
        self._steps = self.add_variable((), initializer="zeros", dtype="int64", name="steps")
        self._clipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="clipped_steps"
        )
        self._skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="skipped_steps"
        )
        self._grad_norm = self.add_variable(
            (), initializer="zeros", dtype="float32", name="grad_norm"
        )
        self.rule.build(self, var_list)
        self._variable_norms = [
            self.add_variable((), initializer="zeros", dtype="float32", name="variable_grad_norm")
            for _ in var_list
        ]
        self._norm_index = {id(v): i for i, v in enumerate(var_list)}
        self._variable_paths = [v.path for v in var_list]
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        """Clips `grads`, updates the statistics and lets the inner optimizer apply them.

        Args:
            grads: list of gradients, one per variable (None for a variable without one).
            trainable_variables: the variables, or None to use those the optimizer was
                built with.

        Raises:
            PrivacyError: (a RuntimeError) when a DP optimizer is wrapped and `grads` are not its
                release of this step (for example without `keras_safe.privacy.make_private`).
        """
        grads = list(grads)
        dp = find_dp_optimizer(self.inner_optimizer)
        if dp is not None and provenance.unreleased(grads):
            # Refuse here, before any conditional, so the message is not buried in a traced
            # branch's error.
            raise PrivacyError(
                NON_PRIVATE_GRADIENTS.format(name=f"GradientClip({type(dp).__name__})")
            )
        if len(grads) == 0:
            return
        trainable_variables = self._variables_for(grads, trainable_variables)
        grads = [None if g is None else _dense(g) for g in grads]
        # Variables that Keras overwrites with their "gradient" (float8 scales) are passed on
        # untouched, as LossScaleOptimizer does.
        free = [
            g is not None and not getattr(v, "overwrite_with_gradient", False)
            for g, v in zip(grads, trainable_variables, strict=True)
        ]
        work = [g if f else None for g, f in zip(grads, free, strict=True)]
        norms = [None if g is None else l2_norm(g) for g in work]
        present = [n for n in norms if n is not None]
        if not present:
            self._hand_on(dp, grads, trainable_variables)
            return
        global_norm = ops.sqrt(ops.sum(ops.stack([ops.square(n) for n in present])))
        finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads if g is not None]))

        clipped, was_clipped = self.rule.clip(work, trainable_variables, norms, global_norm)
        final = [c if f else g for g, c, f in zip(grads, clipped, free, strict=True)]

        # Statistics, assigned outside the conditional apply and guarded by `finite`.
        self.rule.update(global_norm, was_clipped, finite)
        one = ops.convert_to_tensor(1, "int64")
        zero = ops.convert_to_tensor(0, "int64")
        ok = finite if self.skip_non_finite else ops.convert_to_tensor(True)
        self._clipped_steps.assign_add(ops.where(ops.logical_and(ok, was_clipped), one, zero))
        self._skipped_steps.assign_add(ops.where(ok, zero, one))
        self._steps.assign_add(one)
        self._grad_norm.assign(global_norm)
        for v, n in zip(trainable_variables, norms, strict=True):
            index = self._norm_index.get(id(v))
            if n is not None and index is not None:
                self._variable_norms[index].assign(n)

        if self.skip_non_finite:
            # A conditional apply that also works under a tf.distribute strategy.
            replicas.apply_if(finite, self._hand_on, dp, final, trainable_variables)
        else:
            self._hand_on(dp, final, trainable_variables)

    def _variables_for(self, grads, trainable_variables):
        """The variables `grads` belong to; builds the optimizer on first use."""
        if trainable_variables is None:
            if not self.built:
                fail(
                    "trainable_variables",
                    None,
                    "given when GradientClip.apply runs before the optimizer is built",
                    "call optimizer.build(model.trainable_variables) first or pass them.",
                )
            trainable_variables = self._trainable_variables  # keras-internal: optimizer-variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            fail(
                "grads",
                f"{len(grads)} gradients",
                f"one gradient per variable ({len(trainable_variables)} variables)",
                "pass gradients aligned with the variables, None where there is none.",
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        return trainable_variables

    def _hand_on(self, dp, grads, trainable_variables):
        """Applies `grads` with the inner optimizer; under DP they are post-processing of the
        step's release (checked on entry to `apply`), so they are recorded as a release."""
        if dp is not None:
            provenance.mark_released(grads)
        self.inner_optimizer.apply(grads, trainable_variables)

    def load_own_variables(self, store):
        """Loads the saved variables, also from files of keras_safe 0.1.0 (whose adaptive
        mode saved a variable it did not use)."""
        extra = self.rule.legacy_unused_variables
        if extra and self.built and len(store.keys()) == len(self.variables) + extra:
            # They sat right after the rule's variables, before the per-variable norms.
            slot = (
                len(self.variables)
                - len(self.inner_optimizer.variables)
                - len(self._variable_norms)
            )
            keep = [i for i in range(len(store.keys())) if not 0 <= i - slot < extra]
            store = {str(new): store[str(old)] for new, old in enumerate(keep)}
        super().load_own_variables(store)

    # ------------------------------------------------------------------ statistics

    def step_logs(self):
        """The clipping statistics, to merge into the training logs.

        Returns:
            A dict of scalar tensors: `grad_norm` (global norm of the last step's gradients
            before clipping), `clip_fraction` (fraction of applied steps that were clipped),
            `skipped_steps` (count of dropped non-finite steps) and the rule's own figures
            (`clip_norm`, the threshold of the next step, for the adaptive thresholds).
            Empty before the optimizer is built.
        """
        if not self.built:
            return {}
        applied = ops.maximum(self._steps - self._skipped_steps, 1)
        logs = {
            "grad_norm": ops.convert_to_tensor(self._grad_norm),
            "clip_fraction": ops.cast(self._clipped_steps, "float32")
            / ops.cast(applied, "float32"),
            "skipped_steps": ops.convert_to_tensor(self._skipped_steps),
        }
        logs.update(self.rule.step_logs())
        return logs

    def variable_grad_norms(self):
        """The L2 norm of each variable's gradient at the last step, before clipping.

        Returns:
            A dict mapping the variable's path (e.g. `"dense/kernel"`) to a scalar tensor;
            empty before the optimizer is built.
        """
        if not self.built:
            return {}
        return {
            path: ops.convert_to_tensor(var)
            for path, var in zip(self._variable_paths, self._variable_norms, strict=True)
        }

    @property
    def steps(self):
        """Number of `apply` calls seen, skipped ones included (a scalar variable)."""
        return self._steps

    @property
    def clipped_steps(self):
        """Number of applied steps whose gradients were clipped (a scalar variable)."""
        return self._clipped_steps

    @property
    def skipped_steps(self):
        """Number of steps dropped for non-finite gradients (a scalar variable)."""
        return self._skipped_steps

    # ------------------------------------------------------------------ config

    def get_config(self):
        """Returns the configuration: the inner optimizer, the mode and the rule's arguments.

        Configs of keras_safe 0.1.0, which list every mode's arguments (None for those the
        mode does not read), load as well.

        Returns:
            A JSON-friendly dict.
        """
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "mode": self.mode,
            **self.rule.get_config(),
            "skip_non_finite": self.skip_non_finite,
        }


def _inner(optimizer):
    """The optimizer to wrap, checked: a Keras optimizer (or its name) other than a loss-scaler."""
    inner = optimizer
    if not isinstance(inner, keras.optimizers.Optimizer):
        try:
            inner = keras.optimizers.get(inner)
        except (ValueError, TypeError):
            fail(
                "inner_optimizer",
                optimizer,
                "a keras.optimizers.Optimizer or a name such as 'sgd'",
                "pass e.g. GradientClip(keras.optimizers.SGD(0.1)).",
            )
    if isinstance(inner, keras.optimizers.LossScaleOptimizer):
        fail(
            "inner_optimizer",
            type(inner).__name__,
            "an optimizer other than a LossScaleOptimizer (GradientClip would clip the scaled "
            "gradients)",
            "wrap the other way round, "
            "keras.optimizers.LossScaleOptimizer(GradientClip(inner_optimizer)).",
        )
    return inner
