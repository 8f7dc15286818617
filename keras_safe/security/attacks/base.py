"""The `Attack` base class and the cache of compiled attack graphs.

An attack is a small class: its settings are attributes; the settings that shape the graph
(norm, targeted, number of restarts, ...) come from `_static()`, the numbers that do not
(epsilon, step size, number of steps) from `_dynamic()` and are fed to the compiled function
as tensors, so changing epsilon or the step count reuses the compiled graph.

`_build(static)` returns the attack's search for one batch, written against an *objective*:
`objective(x_adv) -> (value, fooled)`, per example the value the attack raises and whether the
model is fooled already. The same search serves both uses of an attack:

- evaluation (`generate`): the objective is the attack's own loss on the model's logits
  (cross-entropy, margin or DLR, towards or away from the labels); `generate` batches the
  data, compiles once per model and settings, and reassembles the adversarial inputs;
- adversarial training (`perturb`, inside keras_safe's train step): the objective is the
  training objective's (the model's per-example loss, TRADES' divergence), never fooled.

Loops are `tf.while_loop`s, not AutoGraph: Keras traces its train step without AutoGraph.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import check_number, fail
from keras_safe.security import _common
from keras_safe.training.state import safe_state

__all__ = ["Attack"]


class Attack:
    """Base class of the evasion attacks.

    Args:
        epsilon: the perturbation budget (max-norm for `norm="linf"`, Euclidean norm per
            example for `norm="l2"`).
        norm: `"linf"` or `"l2"`.
        targeted: False: push each input away from its label `y`; True: towards the target
            class `y`.
        from_logits: whether the model outputs logits; None detects it from the outputs.
        clip_min: lower end of the valid input range (scalar or broadcastable array), or None.
        clip_max: upper end of the valid input range, or None.
        batch_size: examples per compiled call (a `tf.data.Dataset` keeps its own batches).
        seed: seed of the attack's random draws; None draws one from the OS.
        jit_compile: compile the attack graph with XLA.
    """

    name = None
    #: Whether the attack uses the model's gradients (the masking checks compare both kinds).
    uses_gradients = True
    norms = _common.NORMS

    def __init__(
        self,
        epsilon,
        norm="linf",
        targeted=False,
        from_logits=None,
        clip_min=None,
        clip_max=None,
        batch_size=256,
        seed=None,
        jit_compile=False,
    ):
        self.epsilon = _common.check_epsilon(epsilon)
        _common.check_norm(norm)
        if norm not in self.norms:
            fail("norm", norm, f"one of {self.norms} for {self.name}", "pick a supported norm.")
        self.norm = norm
        self.targeted = bool(targeted)
        self.from_logits = None if from_logits is None else bool(from_logits)
        self._low, self._high = _common.check_range(clip_min, clip_max)
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.batch_size = check_number("batch_size", batch_size, low=1, integer=True)
        self.seed = None if seed is None else check_number("seed", seed, low=0, integer=True)
        self.jit_compile = bool(jit_compile)

    # -- to be defined by subclasses -------------------------------------------------------
    def _static(self):
        """Hashable settings that change the graph."""
        return (self.norm, self.targeted)

    def _dynamic(self):
        """Numbers fed to the graph as tensors: dict name -> float32/int32 numpy value."""
        return {"epsilon": np.float32(self.epsilon)}

    def _objective_loss(self):
        """The loss the attack raises in evaluation (`_common.objective`)."""
        return "ce"

    @classmethod
    def _build(cls, static):
        """Returns `search(objective, x, low, high, seed, dynamic, start=None) -> x_adv` for one
        batch: `objective(x_adv) -> (value [B], fooled [B] bool)`, `low`/`high` the input range
        (or None), `seed` a `[2]` int32 tensor, `dynamic` the tensors of `_dynamic()`, `start`
        a starting point that replaces the attack's random start (attacks without one ignore
        it)."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------
    def _compiled(self, model, kind, dtype, x, bounds, dynamic):
        """The compiled batch function, traced once for any batch size."""
        key = (type(self), self._static(), kind, dtype, self.jit_compile, tuple(x.shape[1:]))
        key += tuple(tuple(b.shape) for b in bounds)
        # Kept with the model (its `SafeState`), so the graphs go away with it.
        per_model = safe_state(model).attack_graphs
        if key not in per_model:
            call = _common.model_fn(model, kind, dtype)
            search = type(self)._build(self._static())
            fn = _BatchFunction(search, call, self.targeted, self._objective_loss())
            signature = [
                tf.TensorSpec([None, *x.shape[1:]], tf.float32),
                tf.TensorSpec([None], tf.int32),
                tuple(tf.TensorSpec(b.shape, tf.float32) for b in bounds),
                tf.TensorSpec([2], tf.int32),
                {k: tf.TensorSpec([None] * len(v.shape), v.dtype) for k, v in dynamic.items()},
            ]
            per_model[key] = tf.function(
                fn, input_signature=signature, jit_compile=self.jit_compile or None
            )
        return per_model[key]

    def generate(self, model, x, y=None):
        """Adversarial inputs for `x`.

        Args:
            model: a Keras classifier with one output `(batch, classes)`, logits or
                probabilities (one unit: a binary classifier).
            x: inputs as a numpy array, a tensor, or a `tf.data.Dataset` of `(x, y)` batches.
            y: true labels (untargeted) or target classes (targeted): integers or one-hot
                rows. Untargeted attacks use the model's own predictions when None.

        Returns:
            The adversarial inputs: a `tf.Tensor` when `x` is one, else a numpy array (for a
            dataset, the batches concatenated in order).
        """
        if not isinstance(model, keras.Model) and not callable(model):
            fail("model", model, "a Keras model", "pass the classifier to attack.")
        if self.targeted and y is None and not isinstance(x, tf.data.Dataset):
            fail("y", None, "the target classes when targeted=True", "pass y=target labels.")
        as_tensor = tf.is_tensor(x)
        if not isinstance(x, tf.data.Dataset) and not as_tensor:
            x = np.asarray(x)
        dtype = tf.as_dtype(keras.backend.floatx())
        rng = np.random.default_rng(self.seed)
        dynamic = {k: tf.constant(v) for k, v in self._dynamic().items()}
        bounds = () if self._low is None else (tf.constant(self._low), tf.constant(self._high))
        kind, fn, outputs = None, None, []
        for xb, yb in _common.batches(x, y, self.batch_size):
            xb = tf.cast(xb, tf.float32)
            if kind is None:
                first = model(tf.cast(xb[:64], dtype), training=False)
                _common.check_outputs(first)
                kind = _common.output_kind(model, first, self.from_logits)
                fn = self._compiled(model, kind, dtype, xb, bounds, dynamic)
                num_classes = int(first.shape[-1])
            if yb is None:
                if self.targeted:
                    fail("y", None, "target classes when targeted=True", "add them to the data.")
                z = _common.logits(model(tf.cast(xb, dtype), training=False), kind)
                labels = tf.argmax(z, axis=-1, output_type=tf.int32)
            else:
                labels = tf.constant(_common.as_labels(np.asarray(yb), num_classes))
            seed = tf.constant(rng.integers(0, 2**31 - 1, size=2), tf.int32)
            outputs.append(fn(xb, labels, bounds, seed, dynamic))
        if not outputs:
            fail("x", "no examples", "at least one example", "pass a non-empty batch.")
        result = tf.concat(outputs, axis=0)
        return result if as_tensor else result.numpy()

    def __call__(self, model, x, y=None):
        return self.generate(model, x, y)

    def perturb(self, objective, x, seed=None, start=None):
        """The attack's search on one batch in the current graph, for `objective`.

        What adversarial training runs inside keras_safe's train step (`make_robust`): the
        attack's search, with its settings (epsilon, norm, input range, steps, ...), raising
        `objective` instead of its own loss.

        Args:
            objective: `objective(x_adv) -> (value, fooled)`: per example (`[B]`) the value to
                raise and whether the search may stop changing that example (a boolean
                tensor; all False to keep raising the value).
            x: the batch, a float32 tensor `[B, ...]`.
            seed: a `[2]` int32 tensor for the random draws; None draws one (fresh at every
                run of the graph).
            start: where an attack with a starting point (PGD, APGD) starts, in place of its
                random start (TRADES' small Gaussian offset); None: its own start.

        Returns:
            The adversarial inputs, without a gradient path to `x` or the weights.
        """
        if seed is None:
            seed = tf.random.uniform([2], 0, 2**31 - 1, dtype=tf.int32)
        low = None if self._low is None else tf.constant(self._low)
        high = None if self._high is None else tf.constant(self._high)
        dynamic = {k: tf.constant(v) for k, v in self._dynamic().items()}
        search = type(self)._build(self._static())
        return tf.stop_gradient(search(objective, x, low, high, seed, dynamic, start))

    def get_config(self):
        """The attack's settings (JSON-friendly)."""
        return {
            "epsilon": self.epsilon,
            "norm": self.norm,
            "targeted": self.targeted,
            "from_logits": self.from_logits,
            "clip_min": _plain(self.clip_min),
            "clip_max": _plain(self.clip_max),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "jit_compile": self.jit_compile,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(epsilon={self.epsilon:g}, norm={self.norm!r})"


class _BatchFunction:
    """The per-batch graph function of `generate`: the search on the attack's own objective. A
    callable object rather than a closure: TensorFlow counts retracing per code object, and one
    attack compiled for several models or settings is not retracing. (`tf.function` copies the
    object's attributes onto itself: they must not shadow its own, such as `_call`.)"""

    def __init__(self, search, call, targeted, loss):
        self.attack_search = search
        self.model_logits = call
        self.targeted = targeted
        self.objective_loss = loss

    def __call__(self, x, labels, bounds, seed, dynamic):
        low, high = bounds if bounds else (None, None)
        call, targeted, loss = self.model_logits, self.targeted, self.objective_loss

        def objective(x_adv):
            z = call(x_adv)
            return _common.objective(z, labels, targeted, loss), _common.fooled(z, labels, targeted)

        return self.attack_search(objective, x, low, high, seed, dynamic)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
