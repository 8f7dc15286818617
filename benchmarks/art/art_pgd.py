"""PGD throughput of the Adversarial Robustness Toolbox next to keras_safe, on one Keras model.

Runs in `benchmarks/art/.venv` (see README.md): ART's `ProjectedGradientDescent` through its
`TensorFlowV2Classifier`, keras_safe's `pgd` and the hand-written `tf.function` loop of
`benchmarks/attack_speed.py`, on the same trained digits model and inputs, in one process.

    benchmarks/art/.venv/bin/python benchmarks/art/art_pgd.py --models mlp,cnn
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from art.attacks.evasion import ProjectedGradientDescent  # noqa: E402
from art.estimators.classification import TensorFlowV2Classifier  # noqa: E402
from attack_speed import accuracy, build, digits, hand_written  # noqa: E402

from keras_safe.security import pgd  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat-data", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import art

    x, y = digits(args.repeat_data)
    step = 2.5 * args.epsilon / args.steps
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, art {art.__version__}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(
        f"PGD-{args.steps}, linf eps={args.epsilon:g}, step {step:.4f}, batch {args.batch}, "
        f"{len(x):,} examples, random start, best of {args.repeats}"
    )
    header = f"{'model':5} {'attack':22} {'examples/s':>11} {'vs hand':>8} {'adv acc':>8}"
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        model = build(name)
        model.fit(x[:1500], y[:1500], epochs=5, batch_size=64, verbose=0)
        reference = hand_written(model, args.epsilon, step, args.steps)
        batches = [
            (tf.constant(x[i : i + args.batch]), tf.constant(y[i : i + args.batch]))
            for i in range(0, len(x), args.batch)
        ]
        classifier = TensorFlowV2Classifier(
            model=model,
            nb_classes=10,
            input_shape=x.shape[1:],
            loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            clip_values=(0.0, 1.0),
        )
        art_pgd = ProjectedGradientDescent(
            classifier,
            norm=np.inf,
            eps=args.epsilon,
            eps_step=step,
            max_iter=args.steps,
            num_random_init=1,
            batch_size=args.batch,
            verbose=False,
        )
        settings = dict(epsilon=args.epsilon, step_size=step, steps=args.steps)
        settings.update(clip_min=0.0, clip_max=1.0, batch_size=args.batch, from_logits=True)
        runners = {
            "hand-written loop": lambda b=batches, r=reference: np.concatenate(
                [r(xb, yb).numpy() for xb, yb in b]
            ),
            "keras_safe pgd": lambda m=model, s=settings: pgd(m, x, y, **s),
            "ART PGD": lambda a=art_pgd: a.generate(x, y=y),
        }
        best = dict.fromkeys(runners, np.inf)
        outputs = {label: runner() for label, runner in runners.items()}  # warm-up
        for _ in range(args.repeats):
            for label, runner in runners.items():
                start = time.perf_counter()
                outputs[label] = runner()
                best[label] = min(best[label], time.perf_counter() - start)
        base = len(x) / best["hand-written loop"]
        for label in runners:
            rate = len(x) / best[label]
            adv = accuracy(model, outputs[label].astype("float32"), y)
            print(f"{name:5} {label:22} {rate:11,.0f} {rate / base:8.2f} {adv:8.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
