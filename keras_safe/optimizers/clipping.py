"""Gradient clipping that goes beyond Keras's `clipnorm`: a wrapper around any optimizer.

`GradientClip` transforms the gradients a train step hands to the optimizer, then lets the
wrapped ("inner") optimizer apply them. It offers four clipping rules, a guard against
non-finite gradients, and statistics that are saved with the optimizer and reach `logs`.

References:
    Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural
    networks" (global norm clipping).
    Andrew, Thakkar, McMahan and Ramaswamy (2021), "Differentially Private Learning with
    Adaptive Clipping" (geometric quantile tracking of the clipping threshold).
    Brock, De, Smith and Simonyan (2021), "High-Performance Large-Scale Image Recognition
    Without Normalization" (adaptive gradient clipping, AGC).
"""

from __future__ import annotations

import math
import numbers

import keras
import tensorflow as tf
from keras import ops

from keras_safe.optimizers.wrapper import OptimizerWrapper

MODES = ("global_norm", "per_layer", "adaptive", "agc")
GROUPS = ("variable", "layer")

_DEFAULT_CLIP_NORM = 1.0
_DEFAULT_TARGET_QUANTILE = 0.5
_DEFAULT_QUANTILE_LEARNING_RATE = 0.2
_DEFAULT_CLIP_FACTOR = 0.01
_DEFAULT_EPSILON = 1e-3
_DEFAULT_AUTO_FACTOR = 2.0
_DEFAULT_EMA_DECAY = 0.99

# Which optional arguments each mode reads (all others must be left at None).
_MODE_ARGUMENTS = {
    "global_norm": {"clip_norm", "auto_factor", "ema_decay"},
    "per_layer": {"clip_norm", "group"},
    "adaptive": {"clip_norm", "target_quantile", "quantile_learning_rate"},
    "agc": {"clip_factor", "epsilon"},
}


def _dense(gradient):
    """Turns a `tf.IndexedSlices` gradient (from an embedding lookup) into a dense tensor."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def _l2_norm(x, axis=None, keepdims=False):
    return ops.sqrt(ops.sum(ops.square(ops.cast(x, "float32")), axis=axis, keepdims=keepdims))


def unitwise_norm(x):
    """The per-unit L2 norm used by adaptive gradient clipping (Brock et al. 2021).

    A unit is one output unit of a layer: scalars and vectors form one unit; for a tensor of
    rank 2 or more (Dense kernel `(in, out)`, Conv kernel `(h, w, in, out)`, Embedding table
    `(vocab, dim)`) every index of the last axis is a unit, so the norm is taken over all
    other axes.

    Args:
        x: a tensor.

    Returns:
        A float32 tensor broadcastable against `x`: a scalar for rank 0 and 1, otherwise the
        shape of `x` with every axis but the last reduced to 1.

    Example:
        >>> import numpy as np
        >>> unitwise_norm(np.array([[3.0, 0.0], [4.0, 1.0]])).numpy().tolist()
        [[5.0, 1.0]]
    """
    rank = len(x.shape)
    if rank <= 1:
        return _l2_norm(x)
    return _l2_norm(x, axis=tuple(range(rank - 1)), keepdims=True)


@keras.saving.register_keras_serializable(package="keras_safe")
class GradientClip(OptimizerWrapper):
    """Wraps any Keras optimizer and clips (or drops) the gradients before it applies them.

    Modes (every mode has a default threshold, so `GradientClip(opt, mode=m)` works as is):

    - `"global_norm"`: scale all gradients by `min(1, c / N)`, `N` the global L2 norm of
      all gradients of the step. `clip_norm` is a fixed `c` (default 1.0), or `"auto"` for a
      threshold that follows training: `c = auto_factor * m`, with `m` an exponential moving
      average (decay `ema_decay`) of the already clipped global norms of earlier steps; the
      first step is never clipped. This catches sudden spikes of the norm without picking a
      number by hand.
    - `"per_layer"`: the same rule applied separately to each variable (`group="variable"`,
      default) or to each layer (`group="layer"`: the variables that share a path prefix,
      such as `dense/kernel` and `dense/bias`), each with threshold `clip_norm` (default 1.0).
    - `"adaptive"`: global norm clipping whose threshold tracks the `target_quantile` of the
      recent gradient norms by the geometric update of Andrew et al. (2021):
      `c <- c * exp(-quantile_learning_rate * (b - target_quantile))`, where `b` is 1 if
      this step's norm was at most `c` and 0 otherwise. `clip_norm` is the initial threshold
      (default 1.0), `target_quantile` defaults to 0.5 (the median) and
      `quantile_learning_rate` to 0.2, the values of the paper.
    - `"agc"`: unit-wise adaptive gradient clipping of Brock et al. (2021): for each unit `i`
      (see `unitwise_norm`), if `||G_i|| > clip_factor * max(||W_i||, epsilon)` then
      `G_i <- clip_factor * max(||W_i||, epsilon) * G_i / ||G_i||`. Defaults
      `clip_factor=0.01`, `epsilon=1e-3` as in the paper; larger values (0.02 - 0.16) suit
      small batches.

    With `skip_non_finite=True` (the default) a step whose gradients contain NaN or Inf is
    dropped: the weights and the inner optimizer's state (its slots and `iterations`) stay as
    they were (under DP `iterations` still advances, see below), and `skipped_steps` grows
    by one.

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
    post-processing of a DP release, so the privacy guarantee (epsilon, delta) is unchanged.
    It can still help, for example by taming the noise-dominated steps of a large model.
    DP-SGD drops any example whose gradient is not finite before summing, so the noisy
    gradient is finite and steps are not skipped for one bad example (a skip would reveal it).
    Should a skip happen anyway, it is still charged to the privacy budget: it leaves the
    weights and optimizer slots alone but advances the inner optimizer's `iterations` (the
    count the accountant reads); this is not supported together with gradient accumulation.

    Args:
        optimizer: the `keras.optimizers.Optimizer` to wrap (the "inner" optimizer), or a
            name or config that `keras.optimizers.get` accepts.
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
        ValueError: for an unknown mode, a threshold that is not positive, an argument that
            the chosen mode does not read, or an inner optimizer that cannot be wrapped.

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
        optimizer,
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
        if kwargs:
            raise ValueError(
                f"GradientClip got unknown argument(s) {sorted(kwargs)}. Fix: set learning "
                "rate, weight decay and Keras's own clipping options on the wrapped optimizer, "
                "e.g. GradientClip(keras.optimizers.SGD(learning_rate=0.1, weight_decay=1e-4))."
            )
        inner = optimizer
        if not isinstance(inner, keras.optimizers.Optimizer):
            try:
                inner = keras.optimizers.get(inner)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    "Argument `optimizer` of GradientClip must be a keras.optimizers.Optimizer "
                    f"(or a name such as 'sgd'); received {optimizer!r}."
                ) from error
        if isinstance(inner, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "GradientClip cannot wrap a LossScaleOptimizer: it would clip the scaled "
                "gradients. Fix: wrap the other way round, "
                "keras.optimizers.LossScaleOptimizer(GradientClip(inner_optimizer))."
            )
        if mode not in MODES:
            raise ValueError(f"Argument `mode` must be one of {MODES}; received mode={mode!r}.")

        given = {
            "clip_norm": clip_norm,
            "group": group,
            "target_quantile": target_quantile,
            "quantile_learning_rate": quantile_learning_rate,
            "clip_factor": clip_factor,
            "epsilon": epsilon,
            "auto_factor": auto_factor,
            "ema_decay": ema_decay,
        }
        unused = sorted(
            k for k, v in given.items() if v is not None and k not in _MODE_ARGUMENTS[mode]
        )
        if unused:
            raise ValueError(
                f"Argument(s) {unused} are not used by mode={mode!r}. Fix: remove them; "
                f"mode={mode!r} reads {sorted(_MODE_ARGUMENTS[mode])}."
            )

        super().__init__(inner, name=name)
        self.mode = mode
        self.skip_non_finite = bool(skip_non_finite)
        self.clip_norm = None
        self.group = None
        self.target_quantile = None
        self.quantile_learning_rate = None
        self.clip_factor = None
        self.epsilon = None
        self.auto_factor = None
        self.ema_decay = None

        if mode in ("global_norm", "per_layer", "adaptive"):
            if clip_norm is None:
                clip_norm = _DEFAULT_CLIP_NORM
            if mode == "global_norm" and clip_norm == "auto":
                self.auto_factor = _positive(
                    "auto_factor", _DEFAULT_AUTO_FACTOR if auto_factor is None else auto_factor
                )
                if self.auto_factor <= 1.0:
                    raise ValueError(
                        f"Argument `auto_factor` must be > 1; received {auto_factor}. Fix: "
                        "use e.g. auto_factor=2.0 (clip steps whose norm is twice the average)."
                    )
                self.ema_decay = _DEFAULT_EMA_DECAY if ema_decay is None else float(ema_decay)
                if not 0.0 <= self.ema_decay < 1.0:
                    raise ValueError(
                        f"Argument `ema_decay` must be in [0, 1); received ema_decay={ema_decay}."
                    )
                self.clip_norm = "auto"
            else:
                if mode == "global_norm" and (auto_factor is not None or ema_decay is not None):
                    raise ValueError(
                        "Arguments `auto_factor` and `ema_decay` are only used with "
                        "clip_norm='auto'. Fix: pass clip_norm='auto' or remove them."
                    )
                self.clip_norm = _positive("clip_norm", clip_norm, allow_auto=mode == "global_norm")
        if mode == "per_layer":
            self.group = "variable" if group is None else group
            if self.group not in GROUPS:
                raise ValueError(f"Argument `group` must be one of {GROUPS}; received {group!r}.")
        if mode == "adaptive":
            self.target_quantile = (
                _DEFAULT_TARGET_QUANTILE if target_quantile is None else float(target_quantile)
            )
            if not 0.0 < self.target_quantile < 1.0:
                raise ValueError(
                    "Argument `target_quantile` must be in (0, 1); received "
                    f"target_quantile={target_quantile}. Fix: e.g. 0.5 tracks the median norm."
                )
            self.quantile_learning_rate = _positive(
                "quantile_learning_rate",
                _DEFAULT_QUANTILE_LEARNING_RATE
                if quantile_learning_rate is None
                else quantile_learning_rate,
            )
        if mode == "agc":
            self.clip_factor = _positive(
                "clip_factor", _DEFAULT_CLIP_FACTOR if clip_factor is None else clip_factor
            )
            self.epsilon = _positive("epsilon", _DEFAULT_EPSILON if epsilon is None else epsilon)

    # ------------------------------------------------------------------ delegation

    @property
    def _tracks_threshold(self):
        return self.mode == "adaptive" or self.clip_norm == "auto"

    def build(self, var_list):
        """Creates the statistics variables and builds the inner optimizer.

        Args:
            var_list: the model's trainable variables.
        """
        if self.built:
            return
        var_list = list(var_list)
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
        if self._tracks_threshold:
            initial = math.inf if self.clip_norm == "auto" else float(self.clip_norm)
            self._threshold = self.add_variable(
                (),
                initializer=keras.initializers.Constant(initial),
                dtype="float32",
                name="clip_threshold",
            )
            self._norm_average = self.add_variable(
                (), initializer="zeros", dtype="float32", name="norm_average"
            )
        self._variable_norms = [
            self.add_variable((), initializer="zeros", dtype="float32", name="variable_grad_norm")
            for _ in var_list
        ]
        self._norm_index = {id(v): i for i, v in enumerate(var_list)}
        self._variable_paths = [v.path for v in var_list]
        if self.mode == "per_layer" and self.group == "layer":
            self._group_of = [p.rsplit("/", 1)[0] if "/" in p else p for p in self._variable_paths]
        if self.skip_non_finite:
            _dp_charged_optimizer(self.inner_optimizer)  # raises early on an unsupported setup
        super().build(var_list)

    # ------------------------------------------------------------------ clipping

    def _clip(self, grads, variables, norms, global_norm):
        """Returns (clipped gradients, whether anything was clipped, new threshold or None)."""
        mode = self.mode
        if mode == "global_norm" or mode == "adaptive":
            if self._tracks_threshold:
                threshold = ops.convert_to_tensor(self._threshold)
            else:
                threshold = ops.convert_to_tensor(self.clip_norm, "float32")
            scale = _scale(global_norm, threshold)
            clipped = [None if g is None else g * ops.cast(scale, g.dtype) for g in grads]
            was_clipped = ops.greater(global_norm, threshold)
            new_threshold = None
            if mode == "adaptive":
                below = ops.cast(ops.logical_not(was_clipped), "float32")
                new_threshold = threshold * ops.exp(
                    -self.quantile_learning_rate * (below - self.target_quantile)
                )
            elif self.clip_norm == "auto":
                first = ops.logical_not(ops.isfinite(threshold))  # no finite step seen yet
                kept_norm = ops.minimum(global_norm, threshold)
                average = ops.where(
                    first,
                    kept_norm,
                    self.ema_decay * self._norm_average + (1.0 - self.ema_decay) * kept_norm,
                )
                new_threshold = (average, self.auto_factor * average)
            return clipped, was_clipped, new_threshold

        if mode == "per_layer":
            if self.group == "variable":
                group_norm = list(norms)
            else:
                squares = {}
                for v, n in zip(variables, norms, strict=True):
                    if n is None:
                        continue
                    key = self._group_of[self._norm_index[id(v)]]
                    squares[key] = squares.get(key, 0.0) + ops.square(n)
                group_norm = []
                for v, n in zip(variables, norms, strict=True):
                    if n is None:
                        group_norm.append(None)
                    else:
                        group_norm.append(
                            ops.sqrt(squares[self._group_of[self._norm_index[id(v)]]])
                        )
            threshold = ops.convert_to_tensor(self.clip_norm, "float32")
            clipped, flags = [], []
            for g, n in zip(grads, group_norm, strict=True):
                if g is None:
                    clipped.append(None)
                    continue
                clipped.append(g * ops.cast(_scale(n, threshold), g.dtype))
                flags.append(ops.greater(n, threshold))
            return clipped, _any(flags), None

        # AGC
        clipped, flags = [], []
        for g, v in zip(grads, variables, strict=True):
            if g is None:
                clipped.append(None)
                continue
            max_norm = self.clip_factor * ops.maximum(unitwise_norm(v), self.epsilon)
            g_norm = unitwise_norm(g)
            trigger = ops.greater(g_norm, max_norm)
            factor = ops.where(trigger, max_norm / ops.maximum(g_norm, 1e-30), 1.0)
            clipped.append(g * ops.cast(factor, g.dtype))
            flags.append(ops.any(trigger))
        return clipped, _any(flags), None

    def apply(self, grads, trainable_variables=None):
        """Clips `grads`, updates the statistics and lets the inner optimizer apply them.

        Args:
            grads: list of gradients, one per variable (None for a variable without one).
            trainable_variables: the variables, or None to use those the optimizer was
                built with.
        """
        grads = list(grads)
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "GradientClip.apply was called without `trainable_variables` before the "
                    "optimizer was built. Fix: call optimizer.build(model.trainable_variables) "
                    "first or pass the variables."
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"GradientClip.apply got {len(grads)} gradients for "
                f"{len(trainable_variables)} variables; they must match one to one."
            )
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True

        grads = [None if g is None else _dense(g) for g in grads]
        # Variables that Keras overwrites with their "gradient" (float8 scales) are passed on
        # untouched, as LossScaleOptimizer does.
        free = [
            g is not None and not getattr(v, "overwrite_with_gradient", False)
            for g, v in zip(grads, trainable_variables, strict=True)
        ]
        work = [g if f else None for g, f in zip(grads, free, strict=True)]
        norms = [None if g is None else _l2_norm(g) for g in work]
        present = [n for n in norms if n is not None]
        if not present:
            self.inner_optimizer.apply(grads, trainable_variables)
            return
        global_norm = ops.sqrt(ops.sum(ops.stack([ops.square(n) for n in present])))
        finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads if g is not None]))

        clipped, was_clipped, new_threshold = self._clip(
            work, trainable_variables, norms, global_norm
        )
        final = [c if f else g for g, c, f in zip(grads, clipped, free, strict=True)]

        # Statistics (assigned outside the conditional apply, guarded by `finite`).
        one = ops.convert_to_tensor(1, "int64")
        zero = ops.convert_to_tensor(0, "int64")
        ok = finite if self.skip_non_finite else ops.convert_to_tensor(True)
        if self._tracks_threshold:
            # A non-finite step never moves the threshold, skipped or not.
            if self.clip_norm == "auto":
                average, threshold = new_threshold
                self._norm_average.assign(ops.where(finite, average, self._norm_average))
                self._threshold.assign(ops.where(finite, threshold, self._threshold))
            else:
                self._threshold.assign(ops.where(finite, new_threshold, self._threshold))
        self._clipped_steps.assign_add(ops.where(ops.logical_and(ok, was_clipped), one, zero))
        self._skipped_steps.assign_add(ops.where(ok, zero, one))
        self._steps.assign_add(one)
        self._grad_norm.assign(global_norm)
        for v, n in zip(trainable_variables, norms, strict=True):
            index = self._norm_index.get(id(v))
            if n is not None and index is not None:
                self._variable_norms[index].assign(n)

        def apply_fn():
            self.inner_optimizer.apply(final, trainable_variables)

        def skip_fn():
            charged = _dp_charged_optimizer(self.inner_optimizer)
            if charged is not None:
                # Under DP the noisy gradient of this step was computed; count the step so
                # the accountant charges it (see the class docstring).
                charged.iterations.assign_add(1)

        if self.skip_non_finite:
            ops.cond(finite, apply_fn, skip_fn)
        else:
            apply_fn()

    # ------------------------------------------------------------------ statistics

    def step_logs(self):
        """The clipping statistics, to merge into the training logs.

        Returns:
            A dict of scalar tensors: `grad_norm` (global norm of the last step's gradients
            before clipping), `clip_fraction` (fraction of applied steps that were clipped),
            `skipped_steps` (count of dropped non-finite steps) and, for the adaptive
            thresholds, `clip_norm` (the threshold for the next step). Empty before the
            optimizer is built.
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
        if self._tracks_threshold:
            logs["clip_norm"] = ops.convert_to_tensor(self._threshold)
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
        """Returns the configuration, with the inner optimizer serialized.

        Returns:
            A JSON-friendly dict.
        """
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "mode": self.mode,
            "clip_norm": self.clip_norm,
            "group": self.group,
            "target_quantile": self.target_quantile,
            "quantile_learning_rate": self.quantile_learning_rate,
            "clip_factor": self.clip_factor,
            "epsilon": self.epsilon,
            "auto_factor": self.auto_factor,
            "ema_decay": self.ema_decay,
            "skip_non_finite": self.skip_non_finite,
        }


def _positive(name, value, allow_auto=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        hint = " or 'auto'" if allow_auto else ""
        raise ValueError(
            f"Argument `{name}` must be a positive number{hint}; received {name}={value!r}."
        )
    if not math.isfinite(value):
        raise ValueError(f"Argument `{name}` must be finite; received {name}={value!r}.")
    return float(value)


def _dp_charged_optimizer(optimizer):
    """Under DP, the optimizer whose `iterations` the accountant reads; None without DP.

    A DP optimizer is recognised by its `privatize` method (keras_safe's DP optimizers).
    """
    chain = []
    while optimizer is not None:
        chain.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    if not any(callable(getattr(o, "privatize", None)) for o in chain):
        return None
    innermost = chain[-1]
    if getattr(innermost, "gradient_accumulation_steps", None) or not isinstance(
        innermost.iterations, keras.Variable
    ):
        raise ValueError(
            "GradientClip(skip_non_finite=True) around a DP optimizer whose wrapped optimizer "
            "uses gradient_accumulation_steps is not supported: a skipped batch could not be "
            "charged to the privacy budget. Fix: pass skip_non_finite=False, or drop "
            "gradient accumulation."
        )
    return innermost


def _scale(norm, threshold):
    """`min(1, threshold / norm)`, safe for a zero norm and an infinite threshold."""
    return ops.where(ops.greater(norm, threshold), threshold / ops.maximum(norm, 1e-30), 1.0)


def _any(flags):
    if not flags:
        return ops.convert_to_tensor(False)
    return ops.any(ops.stack(flags))
