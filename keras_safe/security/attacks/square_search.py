"""Square attack (Andriushchenko et al. 2020): a query-only random search, no gradients.

Andriushchenko, Croce, Flammarion and Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020. It only reads the model's outputs, so
masked or obfuscated gradients do not slow it down: when it beats the gradient attacks, the
gradients are not telling the truth (Athalye et al. 2018), which is what
`evaluate_robustness` checks.
"""

import numpy as np
import tensorflow as tf

from keras_safe._validation import check_number
from keras_safe.security import _common
from keras_safe.security.attacks.base import Attack

__all__ = ["Square"]

# Fractions (in 1/10000 of the queries) after which the changed fraction p is halved
# (the schedule of the paper's reference implementation).
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class Square(Attack):
    """Score-based random search in the epsilon ball; accepts a change only if it helps.

    The search minimises the logit margin (label's logit minus the best other, or the reverse
    for a target) and stops changing an example once it is fooled. (Given another objective,
    in adversarial training, it raises that objective the same way.)

    - `norm="linf"`, image inputs `(batch, height, width, channels)`: the Square attack. It
      starts from vertical stripes of `+-epsilon` and at each query redraws `+-epsilon` (one
      sign per channel) inside a random square covering a fraction `p` of the image.
    - `norm="linf"`, other inputs: the same search on a random fraction `p` of the
      coordinates, each set to `+-epsilon`.
    - `norm="l2"`: a random search step of length `sqrt(p) * epsilon` along a Gaussian
      direction restricted to such a square (or coordinate subset), projected back onto the
      ball; a simplification of the paper's L2 proposal.

    `p` starts at `p_init` and is halved on the paper's schedule as the queries are spent.

    Args:
        epsilon: the budget.
        queries: model evaluations per example (each is a forward pass, no gradient).
        p_init: initial fraction of the input changed per query.
        **kwargs: the arguments of `Attack` (`norm`, `targeted`, `clip_min`, ...).
    """

    name = "square"
    uses_gradients = False

    def __init__(self, epsilon, queries=1000, p_init=None, **kwargs):
        super().__init__(epsilon, **kwargs)
        self.queries = check_number("queries", queries, low=1, integer=True)
        default = 0.05 if self.norm == "linf" else 0.1
        self.p_init = check_number(
            "p_init", default if p_init is None else p_init, low=0.0, high=1.0, low_inclusive=False
        )

    def _dynamic(self):
        out = super()._dynamic()
        out["queries"] = np.int32(self.queries)
        out["p_init"] = np.float32(self.p_init)
        return out

    def _objective_loss(self):
        return "margin"

    @classmethod
    def _build(cls, static):
        norm, _ = static

        def search(objective, x, low, high, seed, dynamic, start=None):
            eps = dynamic["epsilon"]
            image = len(x.shape) == 4
            shape = tf.shape(x)
            batch = shape[0]
            rows = [-1] + [1] * (len(x.shape) - 1)
            seeds = tf.random.experimental.stateless_split(seed, 2)
            if norm == "linf":
                init_shape = tf.stack([batch, 1, shape[2], shape[3]]) if image else shape
                signs = tf.sign(tf.random.stateless_uniform(init_shape, seeds[0], -1.0, 1.0))
                start = x + eps * signs
            else:
                start = _common.random_in_ball(x, eps, norm, seeds[0])
            x_best = _common.project(start, x, eps, norm, low, high)
            v_best, fooled_best = objective(x_best)
            thresholds = tf.constant(_HALVINGS, tf.float32)
            total = tf.cast(dynamic["queries"], tf.float32)

            def body(i, x_best, v_best, fooled_best):
                key = tf.random.experimental.stateless_fold_in(seeds[1], i)
                keys = tf.random.experimental.stateless_split(key, 3)
                progress = tf.cast(i, tf.float32) / total * 10000.0
                halvings = tf.reduce_sum(tf.cast(progress > thresholds, tf.float32))
                p = dynamic["p_init"] / 2.0**halvings
                mask = _window(x, p, keys[0]) if image else _subset(x, p, keys[0])
                delta = x_best - x
                if norm == "linf":
                    if image:
                        sign_shape = tf.stack([batch, 1, 1, shape[3]])
                    else:
                        sign_shape = shape
                    new = eps * tf.sign(tf.random.stateless_uniform(sign_shape, keys[1], -1.0, 1.0))
                    candidate = tf.where(mask, new, delta)
                else:
                    v = tf.random.stateless_normal(shape, keys[1]) * tf.cast(mask, x.dtype)
                    candidate = delta + tf.sqrt(p) * eps * _common.direction(v, "l2")
                candidate = tf.ensure_shape(candidate, x.shape)
                x_new = _common.project(x + candidate, x, eps, norm, low, high)
                v_new, fooled_new = objective(x_new)
                # An example already fooled keeps its point; others take a change that helps.
                accept = ~fooled_best & (v_new > v_best)
                x_best = tf.where(tf.reshape(accept, rows), x_new, x_best)
                v_best = tf.where(accept, v_new, v_best)
                fooled_best = tf.where(accept, fooled_new, fooled_best)
                return i + 1, x_best, v_best, fooled_best

            _, x_best, _, _ = tf.while_loop(
                lambda i, *_: i < dynamic["queries"] - 1,
                body,
                (tf.constant(0), x_best, v_best, fooled_best),
            )
            return x_best

        return search

    def get_config(self):
        config = super().get_config()
        config.update(queries=self.queries, p_init=self.p_init)
        return config


def _window(x, p, seed):
    """Boolean mask `[B, H, W, 1]` of a random square covering about a fraction p of H x W."""
    shape = tf.shape(x)
    height, width = shape[1], shape[2]
    area = tf.cast(height * width, tf.float32)
    side = tf.cast(tf.round(tf.sqrt(p * area)), tf.int32)
    side = tf.clip_by_value(side, 1, tf.minimum(height, width))
    u = tf.random.stateless_uniform(tf.stack([shape[0], 2]), seed)
    top = tf.cast(u[:, 0] * tf.cast(height - side + 1, tf.float32), tf.int32)
    left = tf.cast(u[:, 1] * tf.cast(width - side + 1, tf.float32), tf.int32)
    r = tf.range(height)[None, :, None]
    c = tf.range(width)[None, None, :]
    inside_r = (r >= top[:, None, None]) & (r < top[:, None, None] + side)
    inside_c = (c >= left[:, None, None]) & (c < left[:, None, None] + side)
    return (inside_r & inside_c)[..., None]


def _subset(x, p, seed):
    """Boolean mask of x's shape selecting about a fraction p of each example's coordinates."""
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0], -1])
    dim = tf.shape(flat)[1]
    k = tf.clip_by_value(tf.cast(tf.round(p * tf.cast(dim, tf.float32)), tf.int32), 1, dim)
    u = tf.random.stateless_uniform(tf.shape(flat), seed)
    kth = tf.math.top_k(u, k).values[:, -1:]
    return tf.reshape(u >= kth, shape)
