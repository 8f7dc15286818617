"""`evaluate_robustness`: accuracy under attack over a range of epsilons, with masking checks.

A defence can look robust because its gradients are useless to the attacker rather than
because it is robust: saturated or quantised outputs, non-differentiable preprocessing,
randomness (Athalye, Carlini and Wagner 2018, "Obfuscated gradients give a false sense of
security"). Carlini et al. 2019 ("On evaluating adversarial robustness") list the signs this
module looks for:

- `accuracy_not_falling`: a gradient attack's accuracy rises with epsilon, or has not fallen
  from the clean accuracy at the largest epsilon;
- `large_epsilon_not_near_zero`: PGD with a budget that reaches any valid input still leaves
  the model accurate;
- `gradient_free_beats_gradient`: a gradient-free attack (Square) is stronger than every
  gradient attack at some epsilon;
- `single_step_beats_iterative`: FGSM is stronger than an iterative attack (PGD, APGD).

A fired check is a reason to distrust the numbers, not a proof of masking.
"""

import time

import numpy as np
import tensorflow as tf

from keras_safe._validation import check_number, check_probability, fail
from keras_safe.security import _common
from keras_safe.security.attacks.base import Attack
from keras_safe.security.attacks.registry import get_evasion_attack, make_attack
from keras_safe.security.report import WORST, RobustnessReport

__all__ = ["accuracy_under_attack", "evaluate_robustness"]

_ITERATIVE = ("pgd", "apgd")


def _as_arrays(x, y):
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            fail("y", "array", "None when x is a tf.data.Dataset", "put labels in the dataset.")
        xs, ys = [], []
        for xb, yb in _common.batches(x, None, 1):
            if yb is None:
                fail("x", "a dataset of inputs only", "a dataset of (x, y) batches", "add y.")
            xs.append(np.asarray(xb))
            ys.append(np.asarray(yb))
        return np.concatenate(xs), np.concatenate(ys)
    if y is None:
        fail("y", None, "the true labels", "pass the labels of x.")
    return np.asarray(x), np.asarray(y)


def _attack_specs(attacks):
    """`[(name, settings)]` from names, `(name, settings)` pairs or Attack objects."""
    specs = []
    for attack in attacks:
        if isinstance(attack, Attack):
            settings = attack.get_config()
            specs.append((attack.name, settings, type(attack)))
        elif isinstance(attack, (tuple, list)) and len(attack) == 2:
            specs.append((attack[0], dict(attack[1]), get_evasion_attack(attack[0])))
        else:
            specs.append((attack, {}, get_evasion_attack(attack)))
    names = [s[0] for s in specs]
    if len(set(names)) != len(names):
        fail("attacks", names, "a list without repeated names", "list each attack once.")
    return specs


def _predict(model, x, kind, batch_size):
    preds = []
    for start in range(0, len(x), batch_size):
        out = model(tf.constant(x[start : start + batch_size]), training=False)
        z = _common.logits(out, kind)
        preds.append(np.argmax(z.numpy(), axis=-1))
    return np.concatenate(preds)


def _prepare(model, x, y, from_logits, batch_size):
    """Float32 inputs, the output kind, integer labels and which examples are classified right."""
    x = np.asarray(x).astype(np.float32)
    first = model(tf.constant(x[:64]), training=False)
    _common.check_outputs(first)
    kind = _common.output_kind(model, first, from_logits)
    labels = _common.as_labels(y, int(first.shape[-1]))
    clean = _predict(model, x, kind, batch_size) == labels
    return x, kind, labels, clean


def accuracy_under_attack(model, x, y, attack, from_logits=None, batch_size=256):
    """Clean accuracy and accuracy under one attack.

    An example counts as robust when the model classifies it correctly both clean and on the
    attack's output.

    Args:
        model: a Keras classifier.
        x: inputs (numpy, tensor) or a `tf.data.Dataset` of `(x, y)` batches.
        y: the true labels; None for a dataset.
        attack: an `Attack` object (e.g. `PGD(0.1)`), or a registered name with its settings
            as `(name, settings)`.
        from_logits: whether the model outputs logits; None detects it.
        batch_size: batch size of the predictions.

    Returns:
        A dict with `clean_accuracy` and `adversarial_accuracy` (floats).

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import PGD, accuracy_under_attack
        >>> x = np.random.default_rng(0).uniform(size=(32, 4)).astype("float32")
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> result = accuracy_under_attack(model, x, model.predict(x, verbose=0).argmax(1),
        ...                                PGD(0.5, steps=5, seed=0))
        >>> result["clean_accuracy"], result["adversarial_accuracy"] < 1.0
        (1.0, True)
    """
    if isinstance(attack, (tuple, list)):
        attack = make_attack(attack[0], **attack[1])
    elif not isinstance(attack, Attack):
        fail("attack", attack, "an Attack object or a (name, settings) pair", "e.g. PGD(0.1).")
    x, y = _as_arrays(x, y)
    x, kind, labels, clean = _prepare(model, x, y, from_logits, batch_size)
    x_adv = attack.generate(model, x, labels)
    correct = clean & (_predict(model, x_adv, kind, batch_size) == labels)
    return {"clean_accuracy": float(clean.mean()), "adversarial_accuracy": float(correct.mean())}


def evaluate_robustness(
    model,
    x,
    y=None,
    epsilons=(0.01, 0.03, 0.1),
    attacks=("fgsm", "pgd"),
    norm="linf",
    clip_min=None,
    clip_max=None,
    from_logits=None,
    batch_size=256,
    masking_checks=True,
    gradient_free="square",
    large_epsilon=None,
    tolerance=0.03,
    near_zero=0.05,
    seed=None,
    verbose=0,
):
    """Accuracy under each attack at each epsilon, and the signs of gradient masking.

    Args:
        model: a Keras classifier (one output: logits or probabilities).
        x: inputs (numpy, tensor) or a `tf.data.Dataset` of `(x, y)` batches.
        y: the true labels (integers or one-hot rows); None for a dataset.
        epsilons: the budgets to evaluate (> 0).
        attacks: registered names (`"fgsm"`, `"pgd"`, `"apgd"`, `"square"`, `"noise"`),
            `(name, settings)` pairs (e.g. `("pgd", {"steps": 50})`) or `Attack` objects
            (their settings are kept, their epsilon replaced).
        norm: `"linf"` or `"l2"`, for every attack.
        clip_min: lower end of the valid input range, or None.
        clip_max: upper end of the valid input range, or None.
        from_logits: whether the model outputs logits; None detects it.
        batch_size: examples per compiled attack call.
        masking_checks: run the gradient-masking checks (adds the gradient-free attack at
            every epsilon and one PGD run at `large_epsilon`).
        gradient_free: the gradient-free attack of the checks (`"square"` or `"noise"`, a
            `(name, settings)` pair, or None to skip that check).
        large_epsilon: the budget of the large-epsilon check; None: the whole input range
            (`clip_max - clip_min`, times `sqrt(dim)` for l2) when the range is a scalar pair,
            else 10 times the largest epsilon.
        tolerance: accuracy difference (fraction of examples) that a check must exceed.
        near_zero: the accuracy the large-epsilon attack must get below.
        seed: seed of the attacks' random draws (None: from the OS).
        verbose: 1 prints one line per attack and epsilon.

    Returns:
        A `RobustnessReport`.

    Example:
        >>> import keras, numpy as np
        >>> from keras_safe.security import evaluate_robustness
        >>> rng = np.random.default_rng(0)
        >>> x = rng.uniform(size=(64, 8)).astype("float32")
        >>> y = (x[:, 0] > 0.5).astype("int64")
        >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
        >>> report = evaluate_robustness(model, x, y, epsilons=[0.1, 0.3], attacks=["pgd"],
        ...                              clip_min=0.0, clip_max=1.0, seed=0)
        >>> report.epsilons, report.attacks
        ([0.1, 0.3], ['pgd', 'square', 'worst'])
    """
    x, y = _as_arrays(x, y)
    _common.check_norm(norm)
    low, high = _common.check_range(clip_min, clip_max)
    epsilons = sorted(_common.check_epsilon(e, "epsilons") for e in epsilons)
    if not epsilons or epsilons[0] <= 0:
        fail("epsilons", epsilons, "a non-empty list of budgets > 0", "e.g. [0.01, 0.03, 0.1].")
    tolerance = check_probability("tolerance", tolerance, allow_zero=True)
    near_zero = check_probability("near_zero", near_zero, allow_zero=True)
    batch_size = check_number("batch_size", batch_size, low=1, integer=True)
    specs = _attack_specs(attacks)
    if masking_checks and gradient_free is not None:
        extra = _attack_specs([gradient_free])[0]
        if extra[2].uses_gradients:
            fail("gradient_free", gradient_free, "an attack that needs no gradient", "'square'.")
        if extra[0] not in [s[0] for s in specs]:
            specs.append(extra)
    base = dict(norm=norm, clip_min=clip_min, clip_max=clip_max, from_logits=from_logits)
    base.update(batch_size=batch_size)
    x, kind, labels, clean = _prepare(model, x, y, from_logits, batch_size)
    rng = np.random.default_rng(seed)

    def run(cls, settings, epsilon):
        attack = cls(**{**settings, **base, "epsilon": epsilon, "seed": int(rng.integers(2**31))})
        start = time.perf_counter()
        x_adv = attack.generate(model, x, labels)
        seconds = time.perf_counter() - start
        correct = clean & (_predict(model, x_adv, kind, batch_size) == labels)
        norms = _common.perturbation_norms(x_adv, x, norm)
        return correct, norms, seconds

    rows, correct_at = [], {}
    for name, settings, cls in specs:
        for epsilon in epsilons:
            correct, norms, seconds = run(cls, settings, epsilon)
            correct_at[name, epsilon] = correct
            rows.append(_row(name, epsilon, correct, clean, norms, seconds, cls.uses_gradients))
            if verbose:
                print(f"{name:>8} eps={epsilon:g}: accuracy {rows[-1]['accuracy']:.3f}")
    if len(specs) > 1:
        for epsilon in epsilons:
            worst = np.logical_and.reduce([correct_at[s[0], epsilon] for s in specs])
            rows.append(_row(WORST, epsilon, worst, clean, None, None, False))
    checks, metadata = [], {"norm": norm, "n": len(x), "tolerance": tolerance}
    metadata.update(clip_min=_plain(clip_min), clip_max=_plain(clip_max))
    if masking_checks:
        if large_epsilon is None:
            large_epsilon = _default_large_epsilon(low, high, norm, x, epsilons)
        large_epsilon = _common.check_epsilon(large_epsilon, "large_epsilon")
        pgd_settings = next((s[1] for s in specs if s[0] == "pgd"), {})
        settings = {**pgd_settings, "random_start": False}
        settings["steps"] = max(settings.get("steps", 20), 50)
        settings.pop("step_size", None)
        correct, _, _ = run(get_evasion_attack("pgd"), settings, large_epsilon)
        large_accuracy = float(correct.mean())
        metadata.update(large_epsilon=large_epsilon, large_epsilon_accuracy=large_accuracy)
        large = (large_epsilon, large_accuracy, near_zero)
        checks = _masking_checks(rows, float(clean.mean()), specs, epsilons, tolerance, large)
    return RobustnessReport(rows, float(clean.mean()), checks, metadata)


def _row(name, epsilon, correct, clean, norms, seconds, uses_gradients):
    fooled = clean & ~correct
    return {
        "attack": name,
        "epsilon": float(epsilon),
        "accuracy": float(correct.mean()),
        "success_rate": float(fooled.sum() / max(clean.sum(), 1)),
        "mean_perturbation": None if norms is None else float(norms.mean()),
        "max_perturbation": None if norms is None else float(norms.max()),
        "n": int(len(correct)),
        "seconds": None if seconds is None else float(seconds),
        "uses_gradients": bool(uses_gradients),
    }


def _plain(value):
    return np.asarray(value).tolist() if value is not None else None


def _default_large_epsilon(low, high, norm, x, epsilons):
    if low is not None and low.size == 1 and high.size == 1:
        width = float(high - low)
        return width if norm == "linf" else width * float(np.sqrt(np.prod(x.shape[1:])))
    return 10.0 * epsilons[-1]


def _masking_checks(rows, clean, specs, epsilons, tolerance, large):
    acc = {(r["attack"], r["epsilon"]): r["accuracy"] for r in rows}
    gradient = [s[0] for s in specs if s[2].uses_gradients]
    free = [s[0] for s in specs if not s[2].uses_gradients]
    large_epsilon, large_accuracy, near_zero = large

    flat = []
    for name in gradient:
        curve = [acc[name, e] for e in epsilons]
        rises = [
            (a, b)
            for a, b, c, d in zip(epsilons, epsilons[1:], curve, curve[1:])
            if d > c + tolerance
        ]
        if rises:
            flat.append(f"{name} accuracy rises from eps={rises[0][0]:g} to eps={rises[0][1]:g}")
        elif curve[-1] >= clean - tolerance:
            flat.append(
                f"{name} accuracy {curve[-1]:.3f} at eps={epsilons[-1]:g} vs {clean:.3f} clean"
            )
    checks = [
        _check(
            "accuracy_not_falling",
            flat,
            "accuracy falls with epsilon for every gradient attack",
            "; either the epsilons are too small to matter or the gradients are masked",
        ),
        _check(
            "large_epsilon_not_near_zero",
            [f"PGD leaves accuracy {large_accuracy:.3f} > {near_zero:g} at eps={large_epsilon:g}"]
            if large_accuracy > near_zero
            else [],
            f"PGD at eps={large_epsilon:g} leaves accuracy {large_accuracy:.3f}",
            ", a budget that should reach near-zero accuracy: gradients do not lead the attack",
        ),
    ]
    beaten = []
    for name in free:
        for e in epsilons:
            best = min((acc[g, e] for g in gradient), default=None)
            if best is not None and acc[name, e] < best - tolerance:
                beaten.append(f"{name} {acc[name, e]:.3f} < {best:.3f} at eps={e:g}")
    checks.append(
        _check(
            "gradient_free_beats_gradient",
            beaten,
            "the gradient attacks are at least as strong as the gradient-free one"
            if free and gradient
            else "not run (needs a gradient-free and a gradient attack)",
            ": the gradients mislead the attacks",
        )
    )
    single = []
    iterative = [g for g in gradient if g in _ITERATIVE]
    if "fgsm" in gradient and iterative:
        for e in epsilons:
            best = min(acc[g, e] for g in iterative)
            if acc["fgsm", e] < best - tolerance:
                single.append(f"fgsm {acc['fgsm', e]:.3f} < {best:.3f} at eps={e:g}")
    checks.append(
        _check(
            "single_step_beats_iterative",
            single,
            "iterative attacks are at least as strong as FGSM"
            if "fgsm" in gradient and iterative
            else "not run (needs fgsm and pgd or apgd)",
            ": the loss surface is not smooth enough for iterative steps",
        )
    )
    return checks


def _check(name, findings, quiet, suffix):
    if findings:
        return {"check": name, "fired": True, "detail": "; ".join(findings) + suffix}
    return {"check": name, "fired": False, "detail": quiet}
