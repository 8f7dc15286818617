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
from keras_safe.security.attacks.base import Attack
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

    def _objective_loss(self):
        return self.loss

    @classmethod
    def _build(cls, static):
        norm, _, restarts, _ = static

        def run(objective, x, low, high, seed, dynamic, start):
            eps = dynamic["epsilon"]
            periods = dynamic["checkpoint_period"]
            shape = [-1] + [1] * (len(x.shape) - 1)

            def rows(mask):
                return tf.reshape(mask, shape)

            batch = tf.shape(x)[:1]
            if start is None:
                start = _common.random_in_ball(x, eps, norm, seed)
            x_cur = _common.project(start, x, eps, norm, low, high)
            zeros = tf.zeros(batch)
            state = {
                "x_cur": x_cur,
                "x_prev": x_cur,
                "eta": tf.fill(batch, 2.0 * eps),
                "f_prev": tf.fill(batch, np.inf),  # no rise counted at the first step
                "f_max": tf.fill(batch, -np.inf),
                "f_max_last": tf.fill(batch, -np.inf),
                "x_max": x_cur,
                "g_max": tf.zeros_like(x),
                "best_adv": x,
                "ever": tf.zeros(batch, tf.bool),
                "count": zeros,
                "reduced_last": tf.zeros(batch, tf.bool),
            }

            def body(k, s):
                s = dict(s)
                f, fooled, g = loss_gradient(objective, s["x_cur"])
                s["best_adv"] = tf.where(rows(fooled & ~s["ever"]), s["x_cur"], s["best_adv"])
                s["ever"] = s["ever"] | fooled
                s["count"] += tf.cast(f > s["f_prev"], tf.float32)
                s["f_prev"] = f
                improved = f > s["f_max"]
                s["x_max"] = tf.where(rows(improved), s["x_cur"], s["x_max"])
                s["g_max"] = tf.where(rows(improved), g, s["g_max"])
                s["f_max"] = tf.where(improved, f, s["f_max"])
                period = periods[k]
                at_mark = period > 0
                stalled = ~s["reduced_last"] & (s["f_max"] <= s["f_max_last"])
                reduce = at_mark & ((s["count"] < _RHO * period) | stalled)
                s["eta"] = tf.where(reduce, s["eta"] / 2.0, s["eta"])
                s["reduced_last"] = tf.where(at_mark, reduce, s["reduced_last"])
                s["f_max_last"] = tf.where(at_mark, s["f_max"], s["f_max_last"])
                s["count"] = tf.where(at_mark, tf.zeros_like(s["count"]), s["count"])
                x_cur = tf.where(rows(reduce), s["x_max"], s["x_cur"])
                x_prev = tf.where(rows(reduce), s["x_max"], s["x_prev"])
                g = tf.where(rows(reduce), s["g_max"], g)
                step = tf.reshape(s["eta"], shape) * _common.direction(g, norm)
                z_next = _common.project(x_cur + step, x, eps, norm, low, high)
                moved = x_cur + _ALPHA * (z_next - x_cur) + (1.0 - _ALPHA) * (x_cur - x_prev)
                x_next = tf.cond(
                    tf.equal(k, 0),
                    lambda: z_next,
                    lambda: _common.project(moved, x, eps, norm, low, high),
                )
                s["x_prev"], s["x_cur"] = x_cur, x_next
                return k + 1, s

            _, state = tf.while_loop(
                lambda k, _: k < dynamic["steps"], body, (tf.constant(0), state)
            )
            x_cur = state["x_cur"]
            f, fooled = objective(x_cur)
            best_adv = tf.where(rows(fooled & ~state["ever"]), x_cur, state["best_adv"])
            ever = state["ever"] | fooled
            x_max = tf.where(rows(f > state["f_max"]), x_cur, state["x_max"])
            return tf.where(rows(ever), best_adv, x_max)

        def search(objective, x, low, high, seed, dynamic, start=None):
            return best_of_restarts(run, restarts, objective, x, low, high, seed, dynamic, start)

        return search

    def get_config(self):
        config = super().get_config()
        config.update(steps=self.steps, restarts=self.restarts, loss=self.loss)
        return config
