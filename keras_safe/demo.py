"""The main job: plain versus DP-SGD training on bundled data, audited side by side.

`python -m keras_safe demo` trains the same small classifier on scikit-learn's bundled digits
(8x8 images, 1,797 examples, no download) twice, plainly and with DP-SGD calibrated to a target
epsilon, and a third time with PGD adversarial training; it runs membership inference attacks
and a PGD evasion attack on all three and prints one table: test accuracy, accuracy under PGD,
(epsilon, delta), attack AUC and true-positive rate at 1% false positives. It writes the
figures to `<output>/report.json` and, when matplotlib is installed, the attacks' ROC curves to
`<output>/roc.png`.
"""

import json
import os
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

from keras_safe.audit import membership_inference
from keras_safe.callbacks import PrivacyBudget
from keras_safe.optimizers import DPSGD
from keras_safe.preprocessing import train_val_test_split
from keras_safe.privacy import poisson_batches
from keras_safe.security import PGD, accuracy_under_attack, make_robust
from keras_safe.training.private_model import make_private

__all__ = ["run"]

# The L-inf budget of the evasion attack (inputs in [0, 1]) and of the adversarial training.
ROBUST_EPSILON = 0.1
# The batch size of the three models' training, and the delta of the DP model and the audits.
BATCH_SIZE, DELTA = 64, 1e-4


def _data(seed):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    # Half of the data trains the models (members), the other half is held out (non-members):
    # a small training set makes the plain model memorise, which the attack can see.
    (x_train, y_train), _, (x_test, y_test) = train_val_test_split(
        x, y, val=0.0, test=0.5, stratify=True, seed=seed
    )
    return np.asarray(x_train), np.asarray(y_train), np.asarray(x_test), np.asarray(y_test)


def _model():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def run(epochs=60, target_epsilon=3.0, output="demo_output", seed=0, verbose=True):
    """Trains plain and DP models on digits, audits both and prints the comparison.

    Args:
        epochs: training epochs of both models.
        target_epsilon: epsilon of the DP model (delta below).
        output: folder for `report.json` and `roc.png`.
        seed: seed of the split and the initial weights. The DP noise and the Poisson
            sampling never follow it: they come from the operating system's entropy, so the
            stated epsilon holds (noise anyone can regenerate would void it).
        verbose: print the table.

    Returns:
        0 (the process exit code). The figures are written to `<output>/report.json`.
    """
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = _data(seed)
    n = len(x_train)
    results = _train(x_train, y_train, epochs, target_epsilon, seed)
    rows, reports = [], {}
    for name, entry in results.items():
        row, reports[name] = _audit(name, entry, (x_train, y_train), (x_test, y_test))
        rows.append(row)
    os.makedirs(output, exist_ok=True)
    seconds = time.perf_counter() - started
    table = _table_lines(rows, n, len(x_test), epochs)
    with open(os.path.join(output, "report.json"), "w") as handle:
        json.dump(
            {
                "num_train": n,
                "num_test": len(x_test),
                "epochs": epochs,
                "seconds": round(seconds, 1),
                "rows": rows,
                "table": table,
            },
            handle,
            indent=2,
        )
    plot = _plot(reports, os.path.join(output, "roc.png"))
    if verbose:
        print("\n".join(table))
        print(
            "MIA: the stronger of the loss and confidence threshold attacks (AUC 0.5 = guessing)."
        )
        print(f"PGD acc: accuracy under a 20-step L-inf PGD attack at epsilon {ROBUST_EPSILON}.")
        report = os.path.join(output, "report.json")
        print(f"report: {report}" + (f", ROC plot: {plot}" if plot else ""))
        print(f"done in {seconds:.0f} s")
    return 0


def _train(x_train, y_train, epochs, target_epsilon, seed):
    """The three models, each from the same initial weights: `{name: {"model", "epsilon",
    "noise_multiplier"}}` for the plain, the DP-SGD and the PGD-trained model."""
    n = len(x_train)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}

    plain = _model()
    plain.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    plain.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    results["plain"] = {"model": plain, "epsilon": None, "noise_multiplier": None}

    keras.utils.set_random_seed(seed)
    private = _model()
    optimizer = DPSGD(
        learning_rate=0.25,
        l2_norm_clip=0.5,
        target_epsilon=target_epsilon,
        num_examples=n,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        delta=DELTA,
    )
    private.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    make_private(private)
    batches = poisson_batches(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs)
    budget = PrivacyBudget(delta=DELTA, verbose=0)
    private.fit(batches, epochs=1, callbacks=[budget], shuffle=False, verbose=0)
    results["DP-SGD"] = {
        "model": private,
        "epsilon": budget.epsilon,
        "noise_multiplier": optimizer.noise_multiplier,
    }

    # PGD adversarial training (Madry et al. 2018) at the evaluation budget, fewer epochs: each
    # step also runs the attack.
    keras.utils.set_random_seed(seed)
    robust = _model()
    robust.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    make_robust(robust, ROBUST_EPSILON, steps=5, clip_min=0.0, clip_max=1.0)
    robust.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=max(1, epochs // 3), verbose=0)
    results["PGD-AT"] = {"model": robust, "epsilon": None, "noise_multiplier": None}
    return results


def _audit(name, entry, train, test):
    """One model's row of the table (test accuracy, accuracy under PGD, the stronger of the
    loss and confidence attacks) and its membership-inference report."""
    model = entry["model"]
    x_test, y_test = test
    accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    attack = PGD(ROBUST_EPSILON, steps=20, clip_min=0.0, clip_max=1.0)
    robust_accuracy = accuracy_under_attack(model, x_test, y_test, attack)
    robust_accuracy = robust_accuracy["adversarial_accuracy"]
    report = membership_inference(
        model,
        members=train,
        non_members=test,
        attacks=("loss", "confidence"),
        slices=False,
        delta=DELTA,
    )
    summary = report.summary()
    best = max(summary.values(), key=lambda figures: figures["auc"])
    row = {
        "model": name,
        "test_accuracy": accuracy,
        "pgd_accuracy": robust_accuracy,
        "epsilon": entry["epsilon"],
        "delta": DELTA if entry["epsilon"] is not None else None,
        "noise_multiplier": entry["noise_multiplier"],
        "mia_auc": best["auc"],
        "mia_tpr_at_1%_fpr": best["tpr_at_1%_fpr"],
        "mia_epsilon_lower_bound": best["epsilon_lower_bound"],
        "attacks": summary,
    }
    return row, report


def _plot(reports, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(reports), figsize=(5 * len(reports), 4), squeeze=False)
    for ax, (name, report) in zip(axes[0], reports.items()):
        report.plot_roc(ax=ax)
        ax.set_title(f"membership inference: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table_lines(rows, n_train, n_test, epochs):
    """The comparison table, as printed (and stored in `report.json`), one string per line."""
    header = (
        f"{'model':8} {'test acc':>8} {'PGD acc':>8} {'epsilon':>8} {'delta':>7} "
        f"{'MIA AUC':>8} {'TPR@1%FPR':>10} {'eps lower bd':>12}"
    )
    lines = [
        f"digits: {n_train} training examples (members), {n_test} held out (non-members), "
        f"{epochs} epochs",
        header,
        "-" * len(header),
    ]
    for row in rows:
        eps = "inf" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
        delta = "-" if row["delta"] is None else f"{row['delta']:.0e}"
        lines.append(
            f"{row['model']:8} {row['test_accuracy']:8.3f} {row['pgd_accuracy']:8.3f} "
            f"{eps:>8} {delta:>7} "
            f"{row['mia_auc']:8.3f} {row['mia_tpr_at_1%_fpr']:10.3f} "
            f"{row['mia_epsilon_lower_bound']:12.2f}"
        )
    return lines
