"""A callback that watches per-layer gradient norms and warns about vanishing or exploding ones."""

import math
import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_safe.optimizers.wrapper import optimizer_chain


def _layer_of(path):
    """The layer part of a variable path: `"dense/kernel"` -> `"dense"`."""
    return path.rsplit("/", 1)[0] if "/" in path else path


@keras.saving.register_keras_serializable(package="keras_safe")
class GradientMonitor(keras.callbacks.Callback):
    """Logs per-layer gradient norms every epoch and warns about vanishing or exploding layers.

    Where the gradients come from:

    - with `x` (and `y`) given: at the end of every epoch the gradient of the compiled loss on
      that fixed batch is computed (with `training=training`), so epochs are compared on the
      same data. Keep the batch small (tens to hundreds of examples): one forward and
      backward pass per epoch is the whole cost.
    - without data: the gradients of the last training batch of the epoch, as recorded
      (before clipping) by a `keras_safe.optimizers.GradientClip` in the model's optimizer
      chain. Without such an optimizer, `fit` raises a ValueError naming both fixes.

    A layer's norm is the L2 norm of the gradients of all its variables together (variables are
    grouped by their path, e.g. `dense/kernel` and `dense/bias` form layer `dense`; the
    model's own name is left out of the path, and a wrapped layer is named by its wrapper and
    itself, e.g. `weight_noise/dense`). Every
    epoch the callback writes `grad_norm/<layer>` into the epoch `logs` (so `History`,
    CSVLogger and TensorBoard record them) and keeps them in `self.norms`. It warns
    (`UserWarning`, naming the layers) when a layer's norm is below `vanishing_threshold`,
    above `exploding_threshold`, or more than `growth_factor` times its value of the epoch
    before; each alert is also appended to `self.alerts` as
    `(epoch, layer, kind, norm)` with kind `"vanishing"`, `"exploding"` or `"growing"`.

    Under differential privacy: norms computed on a fixed batch of training examples are not
    covered by the DP guarantee (they are exact, noiseless functions of those examples), so
    pass public or held-out data there, or pass no data: the norms recorded by `GradientClip`
    are those of the noisy DP gradient, post-processing that costs no privacy.

    It also copies the `step_logs()` of every optimizer in the chain (for example
    `GradientClip`'s `grad_norm`, `clip_fraction`, `skipped_steps`) into `logs` at the end of
    every batch and epoch, so they show in the progress bar and `History` under Keras's
    default train step.

    Args:
        x: optional fixed batch of inputs (array, or list/dict for multi-input models).
        y: optional targets for `x`.
        sample_weight: optional sample weights for `x`.
        vanishing_threshold: a norm below this flags a vanishing layer (>= 0; 0 disables).
        exploding_threshold: a norm above this flags an exploding layer (> 0; None
            disables).
        growth_factor: a norm more than this many times the previous epoch's flags a growing
            layer (> 1; None disables).
        training: the `training` flag of the forward pass on `x`.
        log_norms: whether to write the per-layer norms into the epoch logs.
        copy_step_logs: whether to copy the optimizers' `step_logs()` into the logs.
        warn: whether to issue warnings (alerts are recorded either way).

    Raises:
        ValueError: for invalid thresholds, `y` without `x`, or (when training starts) no data
            and no `GradientClip` optimizer.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.callbacks import GradientMonitor
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="hidden"),
        ...                           keras.layers.Dense(1, name="out")])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> x = np.ones((16, 4), "float32"); y = np.zeros((16, 1), "float32")
        >>> history = model.fit(x, y, epochs=2, verbose=0,
        ...                     callbacks=[GradientMonitor(x[:8], y[:8])])
        >>> sorted(k for k in history.history if k.startswith("grad_norm"))
        ['grad_norm/hidden', 'grad_norm/out']
    """

    def __init__(
        self,
        x=None,
        y=None,
        sample_weight=None,
        vanishing_threshold=1e-7,
        exploding_threshold=1e3,
        growth_factor=10.0,
        training=False,
        log_norms=True,
        copy_step_logs=True,
        warn=True,
    ):
        super().__init__()
        if x is None and (y is not None or sample_weight is not None):
            raise ValueError(
                "GradientMonitor got `y` or `sample_weight` without `x`. Fix: pass the fixed "
                "batch as GradientMonitor(x=x_small, y=y_small)."
            )
        if (
            isinstance(vanishing_threshold, bool)
            or not isinstance(vanishing_threshold, numbers.Real)
            or not vanishing_threshold >= 0
        ):
            raise ValueError(
                "Argument `vanishing_threshold` must be a number >= 0; received "
                f"{vanishing_threshold!r}."
            )
        if exploding_threshold is not None and not (
            isinstance(exploding_threshold, numbers.Real) and exploding_threshold > 0
        ):
            raise ValueError(
                "Argument `exploding_threshold` must be a positive number or None; received "
                f"{exploding_threshold!r}."
            )
        if exploding_threshold is not None and exploding_threshold <= vanishing_threshold:
            raise ValueError(
                f"Argument `exploding_threshold` ({exploding_threshold}) must be larger than "
                f"`vanishing_threshold` ({vanishing_threshold})."
            )
        if growth_factor is not None and not (
            isinstance(growth_factor, numbers.Real) and growth_factor > 1
        ):
            raise ValueError(
                "Argument `growth_factor` must be a number > 1 or None; received "
                f"{growth_factor!r}."
            )
        self.x = x
        self.y = y
        self.sample_weight = sample_weight
        self.vanishing_threshold = float(vanishing_threshold)
        self.exploding_threshold = (
            None if exploding_threshold is None else float(exploding_threshold)
        )
        self.growth_factor = None if growth_factor is None else float(growth_factor)
        self.training = bool(training)
        self.log_norms = bool(log_norms)
        self.copy_step_logs = bool(copy_step_logs)
        self.warn = bool(warn)
        self.norms = {}
        self.alerts = []
        self._clip = None

    # ------------------------------------------------------------------ gradients

    def _find_clip(self):
        for optimizer in optimizer_chain(getattr(self.model, "optimizer", None)):
            if hasattr(optimizer, "variable_grad_norms"):
                return optimizer
        return None

    def on_train_begin(self, logs=None):
        self._clip = self._find_clip()
        if self.x is None and self._clip is None:
            raise ValueError(
                "GradientMonitor has no gradients to watch: it was given no fixed batch and "
                "the model's optimizer is not a keras_safe GradientClip. Fix: pass a small "
                "batch, GradientMonitor(x=x_train[:256], y=y_train[:256]), or compile with "
                "optimizer=keras_safe.optimizers.GradientClip(optimizer)."
            )

    def variable_gradient_norms(self):
        """Gradient norm of each trainable variable, keyed by the variable's path.

        Returns:
            A dict `path -> float`: the norms on the fixed batch when one was given, otherwise
            those of the last training step recorded by the `GradientClip` optimizer.
        """
        if self.x is None:
            clip = self._clip or self._find_clip()
            if clip is None or not clip.built or int(np.asarray(clip.steps)) == 0:
                return {}  # no step recorded yet (e.g. every step skipped by loss scaling)
            return {p: float(v) for p, v in clip.variable_grad_norms().items()}
        variables = list(self.model.trainable_variables)
        with tf.GradientTape() as tape:
            y_pred = self.model(self.x, training=self.training)
            loss = self.model.compute_loss(
                x=self.x,
                y=self.y,
                y_pred=y_pred,
                sample_weight=self.sample_weight,
                training=self.training,
            )
        grads = tape.gradient(loss, variables)
        norms = {}
        for v, g in zip(variables, grads, strict=True):
            if g is None:
                continue
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            norms[v.path] = float(np.sqrt(np.sum(np.square(np.asarray(g, dtype=np.float64)))))
        return norms

    def layer_gradient_norms(self):
        """Gradient norm of each layer: the L2 norm over all of its variables' gradients.

        Returns:
            A dict `layer name -> float`, in the order of the model's variables.
        """
        prefix = f"{self.model.name}/" if self.model is not None else None
        squares = {}
        for path, norm in self.variable_gradient_norms().items():
            if prefix and path.startswith(prefix):
                path = path[len(prefix) :]
            layer = _layer_of(path)
            squares[layer] = squares.get(layer, 0.0) + norm * norm
        return {layer: math.sqrt(s) for layer, s in squares.items()}

    # ------------------------------------------------------------------ callback hooks

    def _copy_step_logs(self, logs):
        if not self.copy_step_logs or logs is None:
            return
        for optimizer in optimizer_chain(getattr(self.model, "optimizer", None)):
            step_logs = getattr(optimizer, "step_logs", None)
            if callable(step_logs):
                for key, value in step_logs().items():
                    logs[key] = float(np.asarray(value))

    def on_train_batch_end(self, batch, logs=None):
        self._copy_step_logs(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._copy_step_logs(logs)
        norms = self.layer_gradient_norms()
        flagged = {"vanishing": [], "exploding": [], "growing": []}
        for layer, norm in norms.items():
            previous = self.norms.get(layer, [])
            if not math.isfinite(norm) or (
                self.exploding_threshold is not None and norm > self.exploding_threshold
            ):
                flagged["exploding"].append((layer, norm))
            elif norm < self.vanishing_threshold:
                flagged["vanishing"].append((layer, norm))
            elif (
                self.growth_factor is not None
                and previous
                and previous[-1] > 0
                and norm > self.growth_factor * previous[-1]
            ):
                flagged["growing"].append((layer, norm))
            self.norms.setdefault(layer, []).append(norm)
            if self.log_norms and logs is not None:
                logs[f"grad_norm/{layer}"] = norm
        messages = []
        for kind, items in flagged.items():
            for layer, norm in items:
                self.alerts.append((epoch, layer, kind, norm))
            if not items:
                continue
            listed = ", ".join(f"'{layer}' ({norm:.3g})" for layer, norm in items)
            if kind == "vanishing":
                rule = f"below vanishing_threshold={self.vanishing_threshold:g}"
            elif kind == "exploding":
                rule = f"above exploding_threshold={self.exploding_threshold}"
            else:
                rule = f"more than growth_factor={self.growth_factor:g} times the previous epoch"
            messages.append(f"{kind} gradients in layer(s) {listed}: norm {rule}")
        if messages and self.warn:
            warnings.warn(
                f"GradientMonitor, epoch {epoch + 1}: " + "; ".join(messages) + ".",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ config

    def get_config(self):
        """Returns the thresholds and flags (not the fixed batch, which is data).

        Returns:
            A JSON-friendly dict.
        """
        return {
            "vanishing_threshold": self.vanishing_threshold,
            "exploding_threshold": self.exploding_threshold,
            "growth_factor": self.growth_factor,
            "training": self.training,
            "log_norms": self.log_norms,
            "copy_step_logs": self.copy_step_logs,
            "warn": self.warn,
        }

    @classmethod
    def from_config(cls, config):
        """Creates a monitor from `get_config()`'s output (without a fixed batch).

        Args:
            config: the dict returned by `get_config`.

        Returns:
            A new `GradientMonitor`.
        """
        return cls(**config)
