"""Gaussian noise for DP-SGD: no atoms, no gaps, the tail not cut where it matters.

A floating-point sampler is a discrete distribution; what DP needs is that it has no atom, gap
or lattice that the release of a neighbouring dataset would not share (Mironov 2012, "On
Significance of the Least Significant Bits for Differential Privacy"; Jin et al. 2022, "Are We
There Yet? Timing and Floating-Point Attacks on Differential Privacy Systems"). A value drawn
exactly 0, radii that cannot fall below some float32 step, or angles taken from a float32
uniform (2^23 directions) would let an attacker tell datasets apart at every coordinate of
every step.

`gaussian_noise` is a Box-Muller transform (Box & Muller 1958) of two 52-bit uniforms per pair
of values, arranged so that nothing a float32 rounding could collapse is ever rounded:

- the radius `sqrt(-2 log u)`, with the logarithm in float64 (so radii near 0 and in the tail
  are resolved as finely as the uniform allows) and cast to float32 once;
- the angle `pi g` with `g` uniform in `[-1/2, 1/2]`, exact in float64, and a random half-turn:
  the pair is `(+-sin(pi (1/2 - |g|)), sin(pi g))`, both sines taken of arguments that carry
  full float32 precision near 0 (a coordinate near 0 is as finely resolved as one near 1), and
  `g` offset by 2^-53 so that neither sine is ever exactly 0.

Tail: the radius reaches `sqrt(2 * 52 ln 2) = 8.49` standard deviations (the smallest uniform is
2^-52; 0 is clamped to 2^-60), beyond which the sampler has no mass (probability 2e-16 for a
pair); its last few radii, beyond 8 standard deviations, lie a few hundredths of a standard
deviation apart. Resolution: every value is the float32 rounding of a Gaussian value whose
radius and angle come from 52-bit uniforms; values near 0 are resolved down to about 1e-15
standard deviations. What remains is of the order of 1e-15 per value: for a guarantee that does
not rest on it, use `DPOptimizer(secure_noise=True)`, whose release is snapped to a
power-of-two grid (`snapped_gaussian_sum`).
"""

import math
import secrets

import tensorflow as tf

__all__ = ["fresh_seed", "gaussian_noise", "noise_key", "snapped_gaussian_sum"]

_HALF_MASK = (1 << 31) - 1

_TINY = 2.0**-60


def fresh_seed():
    """A 62-bit noise seed from the operating system's entropy (`secrets`).

    Not from Python's `random` or Keras's global seed: `keras.utils.set_random_seed` must not make
    DP noise reproducible, since whoever can regenerate the noise can subtract it.
    """
    return secrets.randbits(62)


def noise_key(seed, *indices):
    """The key of one noise stream: the 62-bit `seed` folded with `indices` (ints or int
    tensors, each below 2^31: replica, update, variable...).

    Every key element stays usable whatever reads it: under XLA, stateless random ops read only
    the low 32 bits of each seed element, so the seed enters as two 31-bit halves and each index
    is folded in by a counter-based hash (`tf.random.experimental.stateless_fold_in`), never
    added to a seed element.

    Example:

    >>> import tensorflow as tf
    >>> a, b = noise_key(7, 0, 1), noise_key(7 + 2**32, 0, 1)
    >>> bool(tf.reduce_any(a != b))
    True
    """
    key = tf.constant([int(seed) & _HALF_MASK, int(seed) >> 31], tf.int64)
    for index in indices:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))
    return key


def _uniforms(half, key, streams):
    """`streams` independent float64 uniform vectors of `half` values, one per fold of `key`."""
    return [
        tf.random.stateless_uniform(
            [half], seed=tf.random.experimental.stateless_fold_in(key, stream), dtype=tf.float64
        )
        for stream in range(streams)
    ]


def gaussian_noise(size, seed, stddev=1.0):
    """`size` independent normal draws of standard deviation `stddev` (float32).

    Args:
        size: the number of values (a Python int).
        seed: the stream's key, int64 `[2]` (`noise_key`).
        stddev: the standard deviation (a Python float or scalar tensor).

    Example:

    >>> import tensorflow as tf
    >>> x = gaussian_noise(100000, noise_key(3, 0))
    >>> abs(float(tf.math.reduce_std(x)) - 1.0) < 0.02, int(tf.reduce_sum(tf.cast(x == 0, "int32")))
    (True, 0)
    """
    half = (size + 1) // 2
    u, v = _uniforms(half, seed, 2)
    log_u = tf.cast(tf.math.log(tf.maximum(u, _TINY)), tf.float32)
    radius = tf.sqrt(log_u * (-2.0 * tf.square(tf.cast(stddev, tf.float32))))
    # The angle pi * g, g uniform in [-1/2, 1/2] (k = round(2 v) odd: the left half-circle).
    w = 2.0 * v
    k = tf.round(w)
    g = (w - k) + 2.0**-53
    arguments = tf.cast(tf.concat([0.5 - tf.abs(g), g], axis=0), tf.float32) * math.pi
    signed = tf.concat([tf.where(k == 1.0, -radius, radius), radius], axis=0)
    values = tf.sin(arguments) * signed
    return values if size == 2 * half else values[:size]


def _normal64(size, seed):
    """Standard normal draws computed in float64 throughout (for the snapped release).

    The radius's uniform is refined below 2^-26 by a second 52-bit uniform, so the tail is
    resolved as finely as the body out to `sqrt(2 * 78 ln 2) = 10.4` standard deviations.
    """
    half = (size + 1) // 2
    u, v, fine = _uniforms(half, seed, 3)
    u = tf.where(u < 2.0**-26, fine * 2.0**-26, u)
    radius = tf.sqrt(-2.0 * tf.math.log(tf.maximum(u, 2.0**-78)))
    angle = (2.0 * math.pi) * v
    return tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)[:size]


def snapped_gaussian_sum(total, stddev, grid, seed):
    """The release `grid * (round(total / grid) + round(N(0, (stddev / grid)^2)))`, exactly.

    `total` (float32 or float64, any shape) is rounded to the power-of-two `grid` (exact in
    float64), and the noise is a Gaussian rounded to whole grid steps. Both are integers held
    exactly in float64, so the release is a deterministic function of an integer vector plus
    a rounded Gaussian: the Gaussian mechanism on `round(total / grid)` followed by rounding,
    whose guarantee does not depend on how the floats of the sampler fall (the snapping idea
    of Mironov 2012 with the Gaussian; see Canonne, Kamath & Steinke 2020 for the discrete
    Gaussian). Rounding `total` moves each coordinate by at most `grid / 2`, so the sensitivity
    grows by at most `grid * sqrt(d)`: the caller accounts for it.

    Returns:
        The release as float64, with `total`'s shape.
    """
    shape = tf.shape(total)
    flat = tf.reshape(tf.cast(total, tf.float64), [-1])
    steps = tf.round(flat / grid)
    size = int(total.shape.num_elements())
    noise = tf.round(_normal64(size, seed) * (stddev / grid))
    return tf.reshape((steps + noise) * grid, shape)
