"""Adversarial training as stages of keras_safe's train step: PGD (Madry) and TRADES.

`make_robust(model, epsilon, method=...)` installs one of two stages
(`keras_safe.training.stages`) on the model:

- `AdversarialExamples` (PGD adversarial training, Madry et al. 2018, "Towards deep learning
  models resistant to adversarial attacks"): a data stage that replaces each batch by its PGD
  adversarial examples, which maximise the model's own compiled loss; the step then trains on
  them as on any data.
- `TRADES` (Zhang et al. 2019, "Theoretically principled trade-off between robustness and
  accuracy"): a loss stage whose per-example loss is `CE(f(x), y) + beta * KL(f(x) || f(x'))`,
  where `x'` maximises that KL divergence inside the ball.

Both keep examples independent: example i's adversarial input is found from example i and the
weights alone (the model runs in inference mode during the search and the steps are per
example), so under DP-SGD (`make_private`, either order) each example's gradient is that of
its own adversarial loss, clipped and noised like any other. Both are serializable and saved
with the model.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_safe._validation import check_choice, check_number, fail
from keras_safe.privacy.losses import PerExampleLoss
from keras_safe.security import _common
from keras_safe.training.private_model import install
from keras_safe.training.stages import TrainingStage, get_stages, set_stages

__all__ = ["AdversarialExamples", "TRADES", "make_robust"]

METHODS = ("pgd", "trades")


class _AdversarialStage(TrainingStage):
    """Settings and the projected gradient ascent shared by both stages."""

    def __init__(
        self,
        epsilon,
        steps=10,
        step_size=None,
        norm="linf",
        clip_min=None,
        clip_max=None,
        random_start=True,
        from_logits=None,
    ):
        self.epsilon = _common.check_epsilon(epsilon)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.step_size = check_number("step_size", step_size, low=0.0, allow_none=True)
        self.norm = _common.check_norm(norm)
        low, high = _common.check_range(clip_min, clip_max)
        self._low = None if low is None else tf.constant(low)
        self._high = None if high is None else tf.constant(high)
        self.clip_min = None if low is None else low.tolist()
        self.clip_max = None if high is None else high.tolist()
        self.random_start = bool(random_start)
        self.from_logits = None if from_logits is None else bool(from_logits)

    @property
    def effective_step_size(self):
        """The step: `step_size`, or `2.5 * epsilon / steps` when it is None."""
        return 2.5 * self.epsilon / self.steps if self.step_size is None else self.step_size

    def _input(self, x):
        if not tf.is_tensor(x) and not isinstance(x, np.ndarray):
            fail(
                "x",
                type(x).__name__,
                "one input tensor for adversarial training",
                "give the model a single input.",
            )
        return tf.cast(x, tf.float32)

    def _ascend(self, objective, x, start):
        """Projected gradient ascent of `objective(x_adv) -> [B]` from `start`."""
        low, high = self._low, self._high
        step_size = self.effective_step_size

        def body(i, x_adv):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                value = tf.reduce_sum(objective(x_adv))
            grad = tape.gradient(value, x_adv)
            if grad is None:
                grad = tf.zeros_like(x_adv)
            step = step_size * _common.direction(grad, self.norm)
            return i + 1, _common.project(x_adv + step, x, self.epsilon, self.norm, low, high)

        # An explicit loop: Keras traces the train step without AutoGraph.
        x_adv = _common.project(start, x, self.epsilon, self.norm, low, high)
        _, x_adv = tf.while_loop(lambda i, _: i < self.steps, body, (tf.constant(0), x_adv))
        return tf.stop_gradient(x_adv)

    def get_config(self):
        return {
            "epsilon": self.epsilon,
            "steps": self.steps,
            "step_size": self.step_size,
            "norm": self.norm,
            "clip_min": self.clip_min,
            "clip_max": self.clip_max,
            "random_start": self.random_start,
            "from_logits": self.from_logits,
        }


@keras.saving.register_keras_serializable(package="keras_safe")
class AdversarialExamples(_AdversarialStage):
    """Data stage of PGD adversarial training (Madry et al. 2018).

    Replaces the batch's inputs by PGD adversarial examples of the model's compiled loss:
    from a uniform random point of the ball (`random_start=True`, else from `x`), `steps`
    steps of `step_size` along the sign (linf) or the normalised gradient (l2), each followed
    by the projection onto the epsilon ball and `[clip_min, clip_max]`. The model runs with
    `training=False` during the search.

    Args:
        epsilon: the budget.
        steps: PGD steps per batch.
        step_size: step of each iteration; None: `2.5 * epsilon / steps`.
        norm: `"linf"` or `"l2"`.
        clip_min: lower end of the valid input range, or None.
        clip_max: upper end of the valid input range, or None.
        random_start: start from a random point of the ball.
        from_logits: unused by this stage (the compiled loss is maximised); kept so both
            stages take the same settings.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import AdversarialExamples
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x = np.full((2, 4), 0.5, "float32")
        >>> stage = AdversarialExamples(0.1, steps=3, clip_min=0.0, clip_max=1.0)
        >>> x_adv, _, _ = stage.transform(model, x, np.array([0, 1]), None)
        >>> bool(np.abs(np.asarray(x_adv) - x).max() <= 0.1 + 1e-6)
        True
    """

    def transform(self, model, x, y, sample_weight):
        if y is None:
            fail("y", None, "the targets of the batch", "adversarial training needs labels.")
        x = self._input(x)
        loss = PerExampleLoss(model)

        def objective(x_adv):
            return loss(y, model(x_adv, training=False))

        start = x
        if self.random_start:
            start = x + _uniform_in_ball(x, self.epsilon, self.norm)
        return self._ascend(objective, x, start), y, sample_weight


@keras.saving.register_keras_serializable(package="keras_safe")
class TRADES(_AdversarialStage):
    """Loss stage of TRADES (Zhang et al. 2019): accuracy plus smoothness in the ball.

    Per example, `loss_i = L(y_i, f(x_i)) + beta * KL(p(x_i) || p(x'_i))` (times the sample
    weight), where `L` is the compiled loss, `p` the predicted class probabilities and
    `x'_i` is found by projected gradient ascent of the KL divergence from
    `x_i + 0.001 * N(0, 1)` (`random_start=False`: from `x_i` plus one fixed small offset,
    the same for every example and step, for reproducible runs). The search runs in
    inference mode with the clean probabilities held fixed; the loss differentiates through
    both `f(x_i)` and `f(x'_i)`. `beta` trades clean accuracy (small) for robustness (large;
    the paper uses 1 to 6).

    Args:
        epsilon: the budget.
        beta: weight of the KL term (>= 0).
        steps, step_size, norm, clip_min, clip_max, random_start: as `AdversarialExamples`.
        from_logits: whether the model outputs logits; None reads it from the compiled loss,
            then from the output activation.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import TRADES
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> stage = TRADES(0.1, beta=6.0, steps=3)
        >>> x, y = np.full((5, 4), 0.5, "float32"), np.arange(5) % 3
        >>> losses, _ = stage.losses(model, x, y, None, lambda y, p, w: (
        ...     keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True)))
        >>> tuple(losses.shape)
        (5,)
    """

    overrides_losses = True

    def __init__(self, epsilon, beta=6.0, **kwargs):
        super().__init__(epsilon, **kwargs)
        self.beta = check_number("beta", beta, low=0.0)
        self._pending = None

    def transform(self, model, x, y, sample_weight):
        # The search needs no gradient to the weights: it runs here, before the step's
        # gradient pass, and `losses` picks up its result.
        self._pending = (x, self._search(model, self._input(x)))
        return x, y, sample_weight

    def _search(self, model, x):
        kind = _common.stage_output_kind(model, self.from_logits)
        clean = tf.nn.log_softmax(_common.logits(model(x, training=False), kind))

        def objective(x_adv):
            return _kl(clean, _common.logits(model(x_adv, training=False), kind))

        if self.random_start:
            noise = tf.random.normal(tf.shape(x))
        else:
            noise = tf.random.stateless_normal(tf.shape(x[:1]), [0, 0])
        return self._ascend(objective, x, x + 0.001 * noise)

    def losses(self, model, x, y, sample_weight, per_example_loss):
        pending, self._pending = self._pending, None
        if pending is not None and _same_batch(pending[0], x):
            x_adv = pending[1]
        else:
            x_adv = self._search(model, self._input(x))
        kind = _common.stage_output_kind(model, self.from_logits)
        y_pred = model(x, training=True)
        clean = tf.nn.log_softmax(_common.logits(y_pred, kind))
        adversarial = _common.logits(model(x_adv, training=True), kind)
        kl = _kl(clean, adversarial)
        if sample_weight is not None:
            kl = kl * tf.reshape(tf.cast(sample_weight, kl.dtype), [-1])
        return per_example_loss(y, y_pred, sample_weight) + self.beta * kl, y_pred

    def get_config(self):
        config = super().get_config()
        config["beta"] = self.beta
        return config


def _same_batch(a, b):
    """Whether `b` is the batch `a` that `transform` saw (the step may have wrapped it)."""
    if a is b:
        return True
    if not (tf.is_tensor(a) and tf.is_tensor(b)) or a.shape != b.shape:
        return False
    if tf.executing_eagerly():
        return bool(tf.reduce_all(tf.equal(tf.cast(a, b.dtype), b)))
    return a.graph is b.graph


def _kl(log_p, logits_q):
    """KL(p || q) per example, from p's log-probabilities and q's logits."""
    return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(logits_q)), axis=-1)


def _uniform_in_ball(x, epsilon, norm):
    if norm == "linf":
        return tf.random.uniform(tf.shape(x), -epsilon, epsilon)
    v = tf.random.normal(tf.shape(x))
    axes = list(range(1, len(x.shape)))
    v = v / tf.maximum(tf.sqrt(tf.reduce_sum(v**2, axis=axes, keepdims=True)), 1e-12)
    dim = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), x.dtype)
    radius = tf.random.uniform(tf.concat([tf.shape(x)[:1], tf.ones([len(axes)], tf.int32)], 0))
    return v * radius ** (1.0 / dim) * epsilon


def make_robust(
    model,
    epsilon,
    method="pgd",
    steps=10,
    step_size=None,
    norm="linf",
    clip_min=None,
    clip_max=None,
    beta=6.0,
    random_start=True,
    from_logits=None,
):
    """Makes `fit` train `model` adversarially: PGD adversarial training or TRADES.

    Installs keras_safe's train step (as `make_private` does) and the stage of `method`,
    replacing an adversarial stage installed before and keeping any other stage. It composes
    with `keras_safe.privacy.make_private` in either order (adversarial examples first, then
    per-example clipped, noised gradients of the adversarial loss) and with `GradientClip`;
    with a plain optimizer the model simply trains robustly. The stage is saved with the model.

    Args:
        model: a compiled or not yet compiled `keras.Model` with a single input.
        epsilon: the budget of the adversarial perturbations.
        method: `"pgd"` (Madry et al. 2018) or `"trades"` (Zhang et al. 2019).
        steps: attack steps per batch.
        step_size: attack step; None: `2.5 * epsilon / steps`.
        norm: `"linf"` or `"l2"`.
        clip_min: lower end of the valid input range, or None.
        clip_max: upper end of the valid input range, or None.
        beta: TRADES' weight of the robustness term (ignored by `"pgd"`).
        random_start: start each search from a random point.
        from_logits: for TRADES, whether the model outputs logits (None: from the loss).

    Returns:
        `model`.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import make_robust
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> model = make_robust(model, epsilon=0.1, steps=3, clip_min=0.0, clip_max=1.0)
        >>> x = np.random.default_rng(0).uniform(size=(16, 4)).astype("float32")
        >>> _ = model.fit(x, np.arange(16) % 3, epochs=1, verbose=0)
    """
    check_choice("method", method, METHODS, "use 'pgd' or 'trades'.")
    settings = dict(steps=steps, step_size=step_size, norm=norm, clip_min=clip_min)
    settings.update(clip_max=clip_max, random_start=random_start, from_logits=from_logits)
    if method == "pgd":
        stage = AdversarialExamples(epsilon, **settings)
    else:
        stage = TRADES(epsilon, beta=beta, **settings)
    install(model)
    others = [s for s in get_stages(model) if not isinstance(s, _AdversarialStage)]
    set_stages(model, [*others, stage])
    return model
