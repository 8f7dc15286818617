"""Gaussian noise for DP-SGD: fast, with a tail that is not cut where it matters."""

import math
import secrets

import tensorflow as tf

__all__ = ["fresh_seed", "gaussian_noise"]


def fresh_seed():
    """A 62-bit noise seed from the operating system's entropy (`secrets`).

    Not from Python's `random` or Keras's global seed: `keras.utils.set_random_seed` must not make
    DP noise reproducible, since whoever can regenerate the noise can subtract it.
    """
    return secrets.randbits(62)


def gaussian_noise(size, seed):
    """`size` independent standard normal draws (float32) from a counter-based seed `[2]`.

    Box-Muller transform (Box & Muller 1958) of Philox uniforms. The radius comes from a
    float64 uniform, so the tail is cut only beyond 8.5 standard deviations (a float32
    uniform would cut it at 5.6, a bounded noise); about twice as fast on CPU as
    `tf.random.stateless_normal` for the millions of values a step needs.
    """
    half = (size + 1) // 2
    # 1 - u in (0, 1] from a 53-bit uniform; the angle needs no more than float32. The angle's
    # stream sits 2^40 draws ahead on the counter, out of reach of the per-step counter.
    u = tf.random.stateless_uniform([half], seed=seed, dtype=tf.float64)
    v = tf.random.stateless_uniform(
        [half], seed=seed + tf.constant([0, 1 << 40], tf.int64), dtype=tf.float32
    )
    radius = tf.sqrt(-2.0 * tf.math.log(tf.cast(1.0 - u, tf.float32)))
    angle = (2.0 * math.pi) * v
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)[:size]
