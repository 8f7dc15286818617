"""One-call forms of the attacks: `fgsm`, `pgd`, `apgd`, `square`, `random_noise`.

Each builds the attack object with the given settings and returns `attack.generate(model, x,
y)`: the adversarial inputs, as a numpy array (a `tf.Tensor` when `x` is one). Compiled graphs
are kept with the model, so calling again with another epsilon, step size or step count does
not compile again.
"""

from keras_safe.security.attacks.auto_pgd import APGD
from keras_safe.security.attacks.gradient import FGSM, PGD, RandomNoise
from keras_safe.security.attacks.square_search import Square

__all__ = ["apgd", "fgsm", "pgd", "random_noise", "square"]


def fgsm(model, x, y=None, epsilon=0.1, **settings):
    """Fast gradient sign method (Goodfellow et al. 2015); see `FGSM` and `Attack`.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import fgsm
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.default_rng(0).uniform(size=(8, 4)).astype("float32")
        >>> x_adv = fgsm(model, x, epsilon=0.1, clip_min=0.0, clip_max=1.0)
        >>> bool(np.abs(x_adv - x).max() <= 0.1 + 1e-6), x_adv.shape
        (True, (8, 4))
    """
    return FGSM(epsilon, **settings).generate(model, x, y)


def pgd(
    model,
    x,
    y=None,
    epsilon=0.1,
    step_size=None,
    steps=20,
    norm="linf",
    random_start=True,
    restarts=1,
    **settings,
):
    """Projected gradient descent (Madry et al. 2018); see `PGD` and `Attack`.

    Args:
        model: a Keras classifier (logits or probabilities, detected or `from_logits=`).
        x: numpy array, tensor or `tf.data.Dataset` of `(x, y)` batches.
        y: labels (untargeted) or targets (`targeted=True`); None: the model's predictions.
        epsilon: the budget of `norm`.
        step_size: step per iteration; None: `2.5 * epsilon / steps`.
        steps: iterations per restart.
        norm: `"linf"` or `"l2"`.
        random_start: start from a random point of the ball.
        restarts: runs from new random points; the best is kept per example.
        **settings: `targeted`, `from_logits`, `clip_min`, `clip_max`, `batch_size`, `seed`,
            `loss`, `jit_compile`.

    Returns:
        The adversarial inputs.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import pgd
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.default_rng(0).uniform(size=(8, 4)).astype("float32")
        >>> x_adv = pgd(model, x, epsilon=0.5, norm="l2", steps=5, seed=0)
        >>> bool(np.linalg.norm(x_adv - x, axis=1).max() <= 0.5 + 1e-5)
        True
    """
    attack = PGD(
        epsilon,
        step_size=step_size,
        steps=steps,
        norm=norm,
        random_start=random_start,
        restarts=restarts,
        **settings,
    )
    return attack.generate(model, x, y)


def apgd(model, x, y=None, epsilon=0.1, steps=100, norm="linf", restarts=1, **settings):
    """APGD-CE (Croce & Hein 2020), no step size to tune; see `APGD` and `Attack`.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import apgd
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> x = np.random.default_rng(0).uniform(size=(8, 4)).astype("float32")
        >>> x_adv = apgd(model, x, epsilon=0.1, steps=10, seed=0)
        >>> bool(np.abs(x_adv - x).max() <= 0.1 + 1e-6)
        True
    """
    return APGD(epsilon, steps=steps, norm=norm, restarts=restarts, **settings).generate(
        model, x, y
    )


def square(model, x, y=None, epsilon=0.1, queries=1000, norm="linf", **settings):
    """Square attack (Andriushchenko et al. 2020), gradient-free; see `Square` and `Attack`."""
    return Square(epsilon, queries=queries, norm=norm, **settings).generate(model, x, y)


def random_noise(model, x, y=None, epsilon=0.1, norm="linf", **settings):
    """Random sign noise of norm epsilon: the baseline; see `RandomNoise` and `Attack`."""
    return RandomNoise(epsilon, norm=norm, **settings).generate(model, x, y)
