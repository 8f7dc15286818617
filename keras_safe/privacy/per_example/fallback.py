"""The fallback for variables without a rule: per-example gradients from a Jacobian.

`vectorized` runs the Jacobian of the per-example losses with `pfor` over the batch's forward
pass; `loop` computes one example's gradient after another (slow, but it differentiates exactly
the ops of the forward pass). `pfor` is not trusted blindly: it gets some gradients wrong (it
mixed the examples of grouped convolutions), so `verify` compares the fallback with the
one-example-at-a-time reference on real examples before training and picks the mode that agrees.
"""

import tensorflow as tf

from keras_safe._validation import check_choice

__all__ = ["FALLBACKS", "jacobian"]

FALLBACKS = ("vectorized", "loop")


def jacobian(tape, unit_losses, variables, fallback="vectorized"):
    """Per-example gradients `[B, *v.shape]` of `unit_losses` (`[B]`) for each variable.

    Args:
        tape: a persistent `tf.GradientTape` that recorded the losses.
        unit_losses: `[B]` per-example (or per-microbatch) losses.
        variables: the variables.
        fallback: "vectorized" (`pfor`; a loop where `pfor` cannot convert an op) or "loop".

    Returns:
        One tensor per variable (zeros for a variable the losses do not depend on).
    """
    check_choice("fallback", fallback, FALLBACKS)
    rows = tf.shape(unit_losses)[:1]

    def zeros():
        return [tf.zeros(tf.concat([rows, v.shape], axis=0), v.dtype) for v in variables]

    def rows_of_jacobian():
        jac = None
        if fallback == "vectorized":
            try:
                jac = tape.jacobian(unit_losses, variables, experimental_use_pfor=True)
            except (ValueError, NotImplementedError, TypeError, tf.errors.OpError):
                jac = None
        if jac is None:
            jac = tape.jacobian(unit_losses, variables, experimental_use_pfor=False)
        return [z if j is None else j for j, z in zip(jac, zeros())]

    # A Poisson batch can be empty: the vectorized Jacobian of no examples fails at run time
    # (matrices of size 0 in its products), so a batch of unknown size takes it only with rows.
    count = unit_losses.shape[0]
    if count is not None:
        return rows_of_jacobian() if count else zeros()
    return tf.cond(rows[0] > 0, rows_of_jacobian, zeros)
