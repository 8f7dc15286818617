"""Opacus's DP-SGD epochs against plain PyTorch epochs, measured side by side in one process.

An anchor for keras_safe's ``benchmarks/dp_overhead.py``: how much a DP-SGD epoch costs over a
plain one in the most used PyTorch DP library, on the same models and batch sizes. Opacus needs
PyTorch, so this script runs in its own virtual environment (see ``benchmarks/opacus/README.md``),
never in the keras_safe environment.

Models (synthetic data of the right shapes; speed does not depend on the values), the same as
``benchmarks/dp_models.py``'s:
- cnn: TF Privacy's tutorial CNN on 1x28x28, batch 250: Conv2d(16, 8, stride 2, padding 3, the
  output size of Keras's "same"), MaxPool2d(2, 1), Conv2d(32, 4, stride 2), MaxPool2d(2, 1),
  Flatten, Linear(32), Linear(10).
- mlp: Linear 784-512-512-10, batch 256.

Trainers (SGD, learning rate 0.05, cross-entropy averaged over the batch):
- plain: a fixed-size batch per step from a shuffling ``DataLoader``, ``loss.backward()``,
  ``optimizer.step()``.
- hooks: ``PrivacyEngine(accountant="rdp").make_private(noise_multiplier=1.1,
  max_grad_norm=1.0)`` with its defaults: Poisson sampling (each example joins a step's batch
  with probability 1 / steps), per-example gradients from module hooks
  (``grad_sample_mode="hooks"``), flat clipping of the whole per-example gradient (Abadi et al.
  2016, "Deep Learning with Differential Privacy").
- ghost: the same with ``grad_sample_mode="ghost"``: per-example gradient norms without the
  per-example gradients where Opacus has a norm sampler (Linear: ghost clipping, Li et al. 2022,
  "Large Language Models Can Be Strong Differentially Private Learners"; Conv2d has none in
  Opacus 1.6, so its per-example gradients are still made) and a second backward pass with the
  per-example loss reweighted by the clipping factors (Lee & Kifer 2021, "Scaling up
  Differentially Private Deep Learning with Fast Per-Example Gradient Clipping").

Each round times one epoch (``--steps`` steps) of every trainer in turn (plain, hooks, ghost,
plain, ...), so a change of the machine's load hits all of them, after one warm-up epoch each.
Both clocks are kept: CPU seconds of the process (``time.process_time``, all threads; it varies
far less with the load of a shared machine than wall time) and wall seconds
(``time.perf_counter``). The summary per model and DP trainer: the median and range of the
per-round ratios of DP seconds over plain seconds, on each clock (2.0: a DP epoch takes twice as
long; its inverse is the speed ratio ``dp_overhead.py --sampling`` reports).

Usage:
    benchmarks/opacus/.venv/bin/python benchmarks/opacus/bench.py \
        [--steps 20] [--rounds 5] [--threads 2] [--models cnn,mlp] [--modes hooks,ghost] \
        [--results benchmarks/results/opacus_anchor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
import warnings

import numpy as np
import opacus
import torch
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results" / "opacus_anchor.json"
L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.1
LEARNING_RATE = 0.05
MODES = ("hooks", "ghost")


def cnn():
    """TF Privacy's tutorial CNN on 1x28x28 inputs, 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def mlp():
    """A 784-512-512-10 multilayer perceptron, 10 logits."""
    return nn.Sequential(
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


# name: (model factory, batch size, input shape)
MODELS = {"cnn": (cnn, 250, (1, 28, 28)), "mlp": (mlp, 256, (784,))}


def _paths(model, mode):
    """How each trainable layer's per-example gradient norm is obtained under ``mode``."""
    if mode == "plain":
        return "-"
    kinds = []
    for layer in model.modules():
        if not any(p.requires_grad for p in layer.parameters(recurse=False)):
            continue
        # Read only, to report which of Opacus's two ghost-mode paths each layer takes.
        ghost = (
            mode == "ghost" and type(layer) in GradSampleModuleFastGradientClipping.NORM_SAMPLERS
        )
        kinds.append(f"{type(layer).__name__}: {'ghost norm' if ghost else 'per-example grads'}")
    return ", ".join(dict.fromkeys(kinds))


class Trainer:
    """One model, its optimizer, loss and data loader, plain or made private by Opacus."""

    def __init__(self, factory, mode, dataset, batch_size):
        torch.manual_seed(0)
        model = factory()
        self.path = _paths(model, mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        criterion = nn.CrossEntropyLoss()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
        if mode == "plain":
            self.parts = model, optimizer, criterion, loader
            return
        engine = PrivacyEngine(accountant="rdp")
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=L2_NORM_CLIP,
            grad_sample_mode=mode,
        )
        if mode == "ghost":  # also returns a criterion that runs the two backward passes
            self.parts = private
        else:
            model, optimizer, loader = private
            self.parts = model, optimizer, criterion, loader

    def epoch(self):
        """Trains one epoch; returns its CPU, system-CPU and wall seconds, steps and examples."""
        model, optimizer, criterion, loader = self.parts
        steps = examples = 0
        cpu, system, wall = time.process_time(), os.times().system, time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
            examples += len(y)
        return {
            "cpu_s": time.process_time() - cpu,
            "system_cpu_s": os.times().system - system,
            "wall_s": time.perf_counter() - wall,
            "steps": steps,
            "examples": examples,
        }


def _uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load():
    return {"loadavg": list(os.getloadavg()), "uptime": _uptime()}


def _summary(values):
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}


def run_model(name, modes, steps, rounds, rng):
    """Alternating timed epochs of plain and each DP mode on one model; returns its JSON row."""
    factory, batch, shape = MODELS[name]
    n = batch * steps
    x = torch.from_numpy(rng.normal(size=(n, *shape)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, n))
    dataset = TensorDataset(x, y)
    trainers = {mode: Trainer(factory, mode, dataset, batch) for mode in ("plain", *modes)}
    for trainer in trainers.values():  # warm-up: allocator, hooks, first-call costs
        trainer.epoch()
    figures = {mode: {} for mode in trainers}
    for _ in range(rounds):
        for mode, trainer in trainers.items():
            for key, value in trainer.epoch().items():
                figures[mode].setdefault(key, []).append(value)
    row = {"model": name, "batch": batch, "examples_per_epoch": n, "trainers": {}}
    plain = figures["plain"]
    for mode, trainer in trainers.items():
        entry = {"path": trainer.path, **figures[mode]}
        if mode != "plain":
            for clock in ("cpu_s", "wall_s"):
                ratios = [d / p for d, p in zip(figures[mode][clock], plain[clock])]
                entry[f"{clock[:-2]}_ratio_dp_over_plain"] = ratios
                entry[f"{clock[:-2]}_ratio_summary"] = _summary(ratios)
                entry[f"{clock[:-2]}_speed_plain_over_dp"] = _summary([1 / r for r in ratios])
        row["trainers"][mode] = entry
    return row


def _line(row, mode):
    entry = row["trainers"][mode]
    cpu, wall = statistics.median(entry["cpu_s"]), statistics.median(entry["wall_s"])
    text = f"{row['model']:5} {row['batch']:5d} {mode:6} {cpu:8.3f} {wall:8.3f}"
    if mode == "plain":
        return text + f"  {'1.00':>18}  {'1.00':>18}  {entry['path']}"
    c, w = entry["cpu_ratio_summary"], entry["wall_ratio_summary"]
    return (
        text
        + f"  {c['median']:5.2f} ({c['min']:.2f}-{c['max']:.2f})"
        + f"  {w['median']:5.2f} ({w['min']:.2f}-{w['max']:.2f})  {entry['path']}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--models", default="cnn,mlp", help=f"comma-separated, from {','.join(MODELS)}"
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"DP modes, from {','.join(MODES)}"
    )
    parser.add_argument("--results", default=str(RESULTS), help="JSON file for the figures")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if [m for m in models if m not in MODELS] or not models:
        parser.error(
            f"--models={args.models!r}: use a comma-separated subset of {','.join(MODELS)}."
        )
    if [m for m in modes if m not in MODES] or not modes:
        parser.error(f"--modes={args.modes!r}: use a comma-separated subset of {','.join(MODES)}.")
    for flag in ("steps", "rounds", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}.")

    # Opacus warns that its noise comes from a non-cryptographic generator (secure_mode=False);
    # that is the setting being measured, so the warning is left out of the table.
    warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
    # PyTorch warns that the full backward hooks Opacus adds fire on the first layer although the
    # inputs need no gradient; the per-example gradients are taken from the layer's own input.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "torch_parallel": torch.__config__.parallel_info().splitlines(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": {
            "torch": torch.__version__,
            "opacus": opacus.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "steps_per_epoch": args.steps,
            "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(),
            "learning_rate": LEARNING_RATE,
            "l2_norm_clip": L2_NORM_CLIP,
            "noise_multiplier": NOISE_MULTIPLIER,
            "clipping": "flat",
            "sampling": "Poisson (Opacus's DPDataLoader); plain: shuffled fixed-size batches",
            "clocks": "cpu_s: time.process_time (all threads); wall_s: time.perf_counter",
            "ratio": "DP seconds / plain seconds per round (higher: DP slower)",
            "speed": "plain seconds / DP seconds per round, the README's DP / plain speed",
            "system_cpu_s": "the part of cpu_s spent in the kernel (os.times().system)",
        },
        "load_start": _load(),
        "rows": [],
    }
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, opacus "
        f"{opacus.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"
    )
    print(f"load at start: {results['load_start']['uptime']}")
    header = (
        f"{'model':5} {'batch':>5} {'mode':6} {'cpu s':>8} {'wall s':>8}  "
        f"{'cpu DP/plain':>18}  {'wall DP/plain':>18}  path"
    )
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    for name in models:
        row = run_model(name, modes, args.steps, args.rounds, rng)
        for mode in row["trainers"]:
            print(_line(row, mode), flush=True)
        results["rows"].append(row)
    results["load_end"] = _load()
    print(f"load at end: {results['load_end']['uptime']}")
    path = pathlib.Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
