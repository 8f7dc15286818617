"""FGSM and PGD, the classic gradient attacks, and random sign noise as their baseline."""

import numpy as np
import tensorflow as tf

from keras_safe._validation import check_choice, check_number
from keras_safe.security import _common
from keras_safe.security.attacks.base import Attack

__all__ = ["FGSM", "PGD", "RandomNoise", "best_of_restarts", "loss_gradient"]


def loss_gradient(objective, x):
    """`(value [B], fooled [B], gradient of the value w.r.t. x)`; zeros where no gradient."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        value, fooled = objective(x)
    grad = tape.gradient(value, x)
    if grad is None:  # an output with no gradient path (for example rounded outputs)
        grad = tf.zeros_like(x)
    return value, fooled, grad


def best_of_restarts(run, restarts, objective, x, low, high, seed, dynamic, start=None):
    """Runs `run` `restarts` times (new seeds) and keeps, per example, the best result.

    Best: fools the model, else has the highest objective.
    """
    if restarts == 1:
        return run(objective, x, low, high, seed, dynamic, start)
    best, best_fooled, best_value = None, None, None
    for r in range(restarts):
        x_adv = run(objective, x, low, high, seed + tf.constant([0, r + 1]), dynamic, start)
        value, fooled = objective(x_adv)
        if best is None:
            best, best_fooled, best_value = x_adv, fooled, value
            continue
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (value > best_value))
        best = tf.where(tf.reshape(better, [-1] + [1] * (len(x.shape) - 1)), x_adv, best)
        best_fooled = best_fooled | fooled
        best_value = tf.where(better, value, best_value)
    return best


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size epsilon.

    `x + epsilon * sign(g)` for `norm="linf"`, `x + epsilon * g / ||g||_2` for `norm="l2"`,
    where `g` is the gradient of the cross-entropy (of minus the cross-entropy to the target
    when targeted), clipped to `[clip_min, clip_max]`. Arguments: see `Attack`.
    """

    name = "fgsm"

    @classmethod
    def _build(cls, static):
        norm, _ = static

        def search(objective, x, low, high, seed, dynamic, start=None):
            _, _, grad = loss_gradient(objective, x)
            step = dynamic["epsilon"] * _common.direction(grad, norm)
            return _common.project(x + step, x, dynamic["epsilon"], norm, low, high)

        return search


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018).

    From a uniform random point of the ball (`random_start=True`), `steps` times: a step of
    `step_size` along `sign(g)` (linf) or `g / ||g||_2` (l2), then the projection onto the
    epsilon ball and the input range. With `restarts > 1` it runs again from new random
    points and keeps, per example, the run that fools the model (else the one with the
    highest loss).

    Args:
        epsilon: the budget.
        step_size: the step; None uses `2.5 * epsilon / steps` (Madry et al.).
        steps: gradient steps per restart.
        random_start: start from a random point of the ball instead of `x`.
        restarts: number of runs.
        loss: `"ce"` (cross-entropy) or `"margin"` (Carlini & Wagner's logit margin).
        **kwargs: the arguments of `Attack` (`norm`, `targeted`, `clip_min`, ...).
    """

    name = "pgd"

    def __init__(
        self,
        epsilon,
        step_size=None,
        steps=20,
        random_start=True,
        restarts=1,
        loss="ce",
        **kwargs,
    ):
        super().__init__(epsilon, **kwargs)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.step_size = check_number("step_size", step_size, low=0.0, allow_none=True)
        self.random_start = bool(random_start)
        self.restarts = check_number("restarts", restarts, low=1, integer=True)
        self.loss = check_choice(
            "loss", loss, ("ce", "margin"), "use 'ce' (cross-entropy) or 'margin'."
        )

    def _step(self):
        return 2.5 * self.epsilon / self.steps if self.step_size is None else self.step_size

    def _static(self):
        return (self.norm, self.targeted, self.random_start, self.restarts, self.loss)

    def _dynamic(self):
        out = super()._dynamic()
        out["step_size"] = np.float32(self._step())
        out["steps"] = np.int32(self.steps)
        return out

    def _objective_loss(self):
        return self.loss

    @classmethod
    def _build(cls, static):
        norm, _, random_start, restarts, _ = static

        def run(objective, x, low, high, seed, dynamic, start):
            eps, step = dynamic["epsilon"], dynamic["step_size"]
            x_adv = x
            if start is not None:
                x_adv = _common.project(start, x, eps, norm, low, high)
            elif random_start:
                x_adv = _common.project(
                    _common.random_in_ball(x, eps, norm, seed), x, eps, norm, low, high
                )

            def body(i, x_adv):
                _, _, grad = loss_gradient(objective, x_adv)
                x_adv = x_adv + step * _common.direction(grad, norm)
                return i + 1, _common.project(x_adv, x, eps, norm, low, high)

            _, x_adv = tf.while_loop(
                lambda i, _: i < dynamic["steps"], body, (tf.constant(0), x_adv)
            )
            return x_adv

        def search(objective, x, low, high, seed, dynamic, start=None):
            return best_of_restarts(run, restarts, objective, x, low, high, seed, dynamic, start)

        return search

    def get_config(self):
        config = super().get_config()
        config.update(
            step_size=self.step_size,
            steps=self.steps,
            random_start=self.random_start,
            restarts=self.restarts,
            loss=self.loss,
        )
        return config


class RandomNoise(Attack):
    """Random sign noise of the attack's norm: the baseline every real attack must beat.

    linf: `x + epsilon * s` with independent random signs `s`; l2: the same signs scaled to
    Euclidean norm epsilon. Clipped to the input range. Needs no gradient. Arguments: see
    `Attack`.
    """

    name = "noise"
    uses_gradients = False

    @classmethod
    def _build(cls, static):
        norm, _ = static

        def search(objective, x, low, high, seed, dynamic, start=None):
            signs = tf.sign(tf.random.stateless_uniform(tf.shape(x), seed, -1.0, 1.0))
            step = dynamic["epsilon"] * _common.direction(signs, norm)
            return _common.project(x + step, x, dynamic["epsilon"], norm, low, high)

        return search
