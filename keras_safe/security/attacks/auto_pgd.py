"""APGD (Croce & Hein 2020): projected gradient ascent with momentum and its own step size.

Croce and Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. The step size starts at `2 * epsilon` and is halved, per
example, at checkpoints where the loss has not risen in at least `rho` of the steps since the
last checkpoint, or where the best loss did not improve and the step size was not just halved;
a halved example restarts from its best point. The result is the best point of the run (one
that fools the model, else the one with the highest loss), so no step size needs tuning.
"""

import math

import numpy as np
import tensorflow as tf

from keras_safe._validation import check_choice, check_number, fail
from keras_safe.security import _common
from keras_safe.security.attacks.base import Attack, register_attack
from keras_safe.security.attacks.gradient import best_of_restarts, loss_gradient

__all__ = ["APGD", "checkpoints"]

_ALPHA = 0.75  # momentum weight of the new step
_RHO = 0.75  # fraction of rising steps below which the step size is halved


def checkpoints(steps):
    """The iterations `w_1 < w_2 < ...` (< `steps`) where APGD may halve its step size.

    `p_0 = 0`, `p_1 = 0.22`, `p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)` and
    `w_j = ceil(p_j * steps)` (Croce & Hein 2020, section 3.2).

    Example:
        >>> from keras_safe.security.attacks.auto_pgd import checkpoints
        >>> checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
    """
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    points = sorted({math.ceil(round(q * steps, 6)) for q in p[1:]})
    return [w for w in points if 0 < w < steps]


@register_attack
class APGD(Attack):
    """Auto-PGD with the cross-entropy (APGD-CE) or the DLR loss (APGD-DLR, untargeted only).

    Args:
        epsilon: the budget.
        steps: gradient steps per restart (the paper uses 100).
        restarts: number of runs from random starting points; the best is kept per example.
        loss: `"ce"` or `"dlr"` (difference of logits ratio, insensitive to the logits' scale;
            needs three or more classes).
        **kwargs: the arguments of `Attack` (`norm`, `targeted`, `clip_min`, ...).
    """

    name = "apgd"

    def __init__(self, epsilon, steps=100, restarts=1, loss="ce", **kwargs):
        super().__init__(epsilon, **kwargs)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.restarts = check_number("restarts", restarts, low=1, integer=True)
        self.loss = check_choice("loss", loss, ("ce", "dlr"), "use 'ce' or 'dlr'.")
        if self.loss == "dlr" and self.targeted:
            fail("loss", loss, "'ce' when targeted=True", "use loss='ce' for targeted APGD.")

    def _static(self):
        return (self.norm, self.targeted, self.restarts, self.loss)

    def _dynamic(self):
        out = super()._dynamic()
        marks = np.zeros(self.steps, np.float32)  # period (w_j - w_{j-1}) at checkpoints, else 0
        previous = 0
        for w in checkpoints(self.steps):
            marks[w] = w - previous
            previous = w
        out["steps"] = np.int32(self.steps)
        out["checkpoint_period"] = marks
        return out

    @classmethod
    def _build(cls, call, static):
        norm, targeted, restarts, loss = static

        def run(x, labels, low, high, seed, dynamic):
            eps = dynamic["epsilon"]
            periods = dynamic["checkpoint_period"]
            shape = [-1] + [1] * (len(x.shape) - 1)

            def rows(mask):
                return tf.reshape(mask, shape)

            batch = tf.shape(x)[:1]
            x_cur = _common.project(
                _common.random_in_ball(x, eps, norm, seed), x, eps, norm, low, high
            )
            x_prev = x_cur
            eta = tf.fill(batch, 2.0 * eps)
            f_prev = tf.fill(batch, np.inf)  # no rise counted at the first step
            f_max = tf.fill(batch, -np.inf)
            f_max_last = f_max
            x_max, g_max = x_cur, tf.zeros_like(x)
            best_adv, ever = x, tf.zeros(batch, tf.bool)
            count = tf.zeros(batch)
            reduced_last = tf.zeros(batch, tf.bool)
            for k in tf.range(dynamic["steps"]):
                f, z, g = loss_gradient(call, x_cur, labels, targeted, loss)
                fooled = _common.fooled(z, labels, targeted)
                best_adv = tf.where(rows(fooled & ~ever), x_cur, best_adv)
                ever = ever | fooled
                count += tf.cast(f > f_prev, tf.float32)
                f_prev = f
                improved = f > f_max
                x_max = tf.where(rows(improved), x_cur, x_max)
                g_max = tf.where(rows(improved), g, g_max)
                f_max = tf.where(improved, f, f_max)
                period = periods[k]
                at_mark = period > 0
                stalled = ~reduced_last & (f_max <= f_max_last)
                reduce = at_mark & ((count < _RHO * period) | stalled)
                eta = tf.where(reduce, eta / 2.0, eta)
                reduced_last = tf.where(at_mark, reduce, reduced_last)
                f_max_last = tf.where(at_mark, f_max, f_max_last)
                count = tf.where(at_mark, tf.zeros_like(count), count)
                x_cur = tf.where(rows(reduce), x_max, x_cur)
                x_prev = tf.where(rows(reduce), x_max, x_prev)
                g = tf.where(rows(reduce), g_max, g)
                step = tf.reshape(eta, shape) * _common.direction(g, norm)
                z_next = _common.project(x_cur + step, x, eps, norm, low, high)
                moved = x_cur + _ALPHA * (z_next - x_cur) + (1.0 - _ALPHA) * (x_cur - x_prev)
                x_next = tf.cond(
                    tf.equal(k, 0),
                    lambda z_next=z_next: z_next,
                    lambda moved=moved: _common.project(moved, x, eps, norm, low, high),
                )
                x_prev, x_cur = x_cur, x_next
            z = call(x_cur)
            f = _common.objective(z, labels, targeted, loss)
            fooled = _common.fooled(z, labels, targeted)
            best_adv = tf.where(rows(fooled & ~ever), x_cur, best_adv)
            ever = ever | fooled
            x_max = tf.where(rows(f > f_max), x_cur, x_max)
            return tf.where(rows(ever), best_adv, x_max)

        def fn(x, labels, low, high, seed, dynamic):
            return best_of_restarts(
                run, call, restarts, targeted, loss, x, labels, low, high, seed, dynamic
            )

        return fn

    def get_config(self):
        config = super().get_config()
        config.update(steps=self.steps, restarts=self.restarts, loss=self.loss)
        return config
