"""Loss-range study: does learning from a band of per-sample losses help under label noise?

Data: scikit-learn's handwritten digits (1797 8x8 images, ships with the package), one fixed
stratified held-out test split (30 %) that is never noised. A symmetric label noise (each training
label moved, with probability ``rate``, to a uniformly drawn *other* class) is injected into the
training split only. Every arm trains the same small CNN with the same seeds, epochs, optimizer
and batch order; only the criterion callback differs. Reported: clean test accuracy after the last
epoch (mean ± std over seeds), seconds per epoch, and for noisy runs how many of the samples the
callback dropped as top-loss most often were really mislabelled (precision at n = #flipped).
Then the callback's overhead per train step against Catalyst's plain ``CriterionCallback``.

    python bench/loss_range_noise.py --seeds 3 --epochs 12 --write
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from catalyst import dl
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvkit.callbacks.loss_range import LossRangeCallback
from results import replace_section

warnings.filterwarnings("ignore")
HEADING = "## Loss-range study"
BATCH = 32

# arm name -> LossRangeCallback options (None: Catalyst's plain CriterionCallback)
ARMS: Dict[str, Optional[Dict[str, Any]]] = {
    "plain CE": None,
    "drop top 20%": dict(drop_top=0.2, warmup_epochs=2),
    "drop top 40%": dict(drop_top=0.4, warmup_epochs=2),
    "band 10-70%": dict(band=(0.1, 0.7), warmup_epochs=2),
    "drop top 20%, quantile": dict(drop_top=0.2, warmup_epochs=2, quantile_window=1024),
    "hardest 8 of 32": dict(hardest_k=8, warmup_epochs=2),
}


class Digits(Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.5
        self.y = torch.tensor(y, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"features": self.x[i], "targets": self.y[i], "index": i}


def split() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    return train_test_split(digits.images, digits.target, test_size=0.3, random_state=0, stratify=digits.target)


def add_noise(y: np.ndarray, rate: float, seed: int, classes: int = 10) -> np.ndarray:
    """Symmetric noise: with probability ``rate`` a label becomes a uniformly drawn other class."""
    rng = np.random.default_rng(1000 + seed)
    noisy = y.copy()
    flip = rng.random(len(y)) < rate
    noisy[flip] = (y[flip] + rng.integers(1, classes, flip.sum())) % classes
    return noisy


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 10),
    )


def criterion_callback(options: Optional[Dict[str, Any]]) -> dl.Callback:
    keys = dict(input_key="logits", target_key="targets", metric_key="loss")
    return dl.CriterionCallback(**keys) if options is None else LossRangeCallback(**keys, **options)


def train(train_set: Dataset, options: Optional[Dict[str, Any]], seed: int, epochs: int) -> Tuple[nn.Module, dl.Callback, float]:
    """Train one arm; returns the model, its criterion callback and seconds per epoch."""
    torch.manual_seed(seed)
    model = make_model()
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    callback = criterion_callback(options)
    runner = dl.SupervisedRunner(input_key="features", output_key="logits", target_key="targets", loss_key="loss")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # Catalyst always adds a console logger
        runner.train(
            model=model, criterion=nn.CrossEntropyLoss(), optimizer=torch.optim.Adam(model.parameters(), lr=2e-3),
            loaders={"train": loader}, num_epochs=epochs, engine=dl.CPUEngine(), seed=seed, verbose=False,
            logdir=None, callbacks=[callback, dl.BackwardCallback(metric_key="loss"), dl.OptimizerCallback(metric_key="loss")],
        )
    return model, callback, (time.perf_counter() - start) / epochs


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    model.eval()
    return float((model(data.x).argmax(1) == data.y).float().mean())


def mislabel_precision(callback: dl.Callback, flipped: np.ndarray) -> Optional[float]:
    """Of the n most often dropped-as-top samples (n = #flipped), the fraction really flipped."""
    if not isinstance(callback, LossRangeCallback) or not flipped.any() or callback.hardest_k is not None:
        return None
    rows = callback.most_dropped(int(flipped.sum()))
    return sum(bool(flipped[i]) for i, *_ in rows) / int(flipped.sum())


def study(args: argparse.Namespace) -> List[Dict[str, Any]]:
    x_train, x_test, y_train, y_test = split()
    test = Digits(x_test, y_test)
    rows = []
    for rate in args.noise:
        for arm, options in ARMS.items():
            accs, secs, precs = [], [], []
            for seed in range(args.seeds):
                noisy = add_noise(y_train, rate, seed)
                model, callback, sec = train(Digits(x_train, noisy), options, seed, args.epochs)
                accs.append(accuracy(model, test))
                secs.append(sec)
                prec = mislabel_precision(callback, noisy != y_train)
                if prec is not None:
                    precs.append(prec)
            row = dict(noise=rate, arm=arm, acc=accs, sec=statistics.median(secs), prec=precs)
            rows.append(row)
            print(f"noise {rate:.0%} {arm:24s} acc {np.mean(accs):.4f} ± {np.std(accs):.4f} "
                  f"{row['sec']:.2f} s/epoch" + (f" mislabel precision {np.mean(precs):.2f}" if precs else ""), flush=True)
    return rows


def step_overhead(rounds: int, block: int = 25) -> Dict[str, Dict[str, float]]:
    """Per arm: median seconds of a full train step and of the criterion callback's own part.

    Full step: forward, criterion callback, backward, Adam on one batch of 32. The arms alternate in
    blocks of ``block`` steps on identical batches, so a change of machine load hits all of them.
    Callback part: ``on_batch_end`` plus the loss's own backward on fixed logits (the extra work the
    callback does, independent of the model's size).
    """
    x_train, _, y_train, _ = split()
    data = Digits(x_train, y_train)
    batches = [next(iter(DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(i))))
               for i in range(8)]
    arms = {"plain CriterionCallback": None, "drop top 20%": dict(drop_top=0.2),
            "drop top 20%, quantile": dict(drop_top=0.2, quantile_window=1024), "hardest 8 of 32": dict(hardest_k=8)}
    runners = {}
    for name, options in arms.items():
        torch.manual_seed(0)
        runners[name] = _StepRunner(make_model(), criterion_callback(options))
    full: Dict[str, List[float]] = {k: [] for k in arms}
    own: Dict[str, List[float]] = {k: [] for k in arms}
    logits = torch.randn(BATCH, 10, requires_grad=True)
    for r in range(rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            for i in range(block):
                runner.step(batches[(r * block + i) % len(batches)])
            full[name].append((time.perf_counter() - start) / block)
            start = time.perf_counter()
            for i in range(block):
                runner.loss_only(logits, batches[i % len(batches)])
            own[name].append((time.perf_counter() - start) / block)
    return {k: {"step": statistics.median(full[k]), "callback": statistics.median(own[k])} for k in arms}


class _StepRunner:
    """The pieces of a Catalyst train step, driven by hand so only the step is timed."""

    def __init__(self, model: nn.Module, callback: dl.Callback) -> None:
        self.model, self.callback = model, callback
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.criterion = nn.CrossEntropyLoss()
        self.engine = dl.CPUEngine()
        self.is_train_loader, self.is_valid_loader, self.is_infer_loader = True, False, False
        self.epoch_step, self.batch_metrics, self.loader_metrics = 1, {}, {}
        callback.on_experiment_start(self)
        callback.on_loader_start(self)

    def step(self, batch: Dict[str, torch.Tensor]) -> None:
        self.batch = dict(batch)
        self.batch_size = len(batch["targets"])
        self.batch_metrics = {}
        self.batch["logits"] = self.model(batch["features"])
        self.callback.on_batch_end(self)
        self.optimizer.zero_grad()
        self.batch_metrics["loss"].backward()
        self.optimizer.step()

    def loss_only(self, logits: torch.Tensor, batch: Dict[str, torch.Tensor]) -> None:
        self.batch = {"logits": logits, "targets": batch["targets"], "index": batch["index"]}
        self.batch_size, self.batch_metrics = len(batch["targets"]), {}
        self.callback.on_batch_end(self)
        self.batch_metrics["loss"].backward()
        self.callback.on_loader_start(self)  # drop the per-batch records so memory stays flat


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| label noise | arm | clean test accuracy | s / epoch | mislabel precision |", "|---|---|---|---|---|"]
    for r in rows:
        prec = f"{np.mean(r['prec']):.2f}" if r["prec"] else "–"
        lines.append(f"| {r['noise']:.0%} | {r['arm']} | {np.mean(r['acc']):.4f} ± {np.std(r['acc']):.4f} | {r['sec']:.2f} | {prec} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    p.add_argument("--overhead-rounds", type=int, default=40)
    p.add_argument("--write", action="store_true", help=f"write the section '{HEADING}' of bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    began = time.time()
    rows = study(args)
    overhead = step_overhead(args.overhead_rounds)
    plain = overhead["plain CriterionCallback"]
    for name, t in overhead.items():
        print(f"{name}: step {t['step'] * 1e3:.3f} ms ({t['step'] / plain['step'] - 1:+.1%}), "
              f"callback {t['callback'] * 1e6:.0f} us ({(t['callback'] - plain['callback']) / plain['step']:+.1%} of a step)")
    print(f"total {time.time() - began:.0f} s")
    if args.write:
        write(args, rows, overhead, time.time() - began)


def write(args: argparse.Namespace, rows: List[Dict[str, Any]], overhead: Dict[str, Dict[str, float]], total: float) -> None:
    plain = overhead["plain CriterionCallback"]
    section = (
        f"{HEADING}\n\n"
        f"`python bench/loss_range_noise.py --seeds {args.seeds} --epochs {args.epochs} "
        f"--noise {' '.join(str(n) for n in args.noise)} --threads {args.threads} --write` "
        f"({total / 60:.1f} min, torch {torch.__version__}, CPU, {args.threads} thread; the 2-core machine was "
        "shared with other jobs, so s / epoch is only a rough guide).\n\n"
        f"Digits (sklearn, 1257 train / 540 test, stratified, `random_state=0`), 3-conv CNN without BN, Adam 2e-3, "
        f"batch {BATCH}, {args.epochs} epochs, seeds 0..{args.seeds - 1} (same init and batch order in every arm). "
        "Symmetric noise on the training labels only; test labels are clean. Accuracy is after the last "
        "epoch (no selection on the test set), mean ± std over seeds; s / epoch is the median. Band arms "
        "warm up 2 epochs on every sample. *Mislabel precision*: of the n samples dropped as top-loss most "
        "often (n = number of flipped labels), the fraction that really was flipped (chance = the noise rate).\n\n"
        f"{table(rows)}\n\n"
        f"Step-time overhead (batch {BATCH}; arms alternate in blocks of 25 steps, median over {args.overhead_rounds} "
        "blocks). *Callback* is the criterion callback's own work plus the loss's backward on fixed logits; "
        "its extra cost over the plain callback is a fixed time per step, whatever the model:\n\n"
        "| criterion callback | full step, ms | vs plain | callback, µs | extra / plain step |\n|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {t['step'] * 1e3:.3f} | {t['step'] / plain['step'] - 1:+.1%} | {t['callback'] * 1e6:.0f} | "
            f"{(t['callback'] - plain['callback']) / plain['step']:+.1%} |"
            for name, t in overhead.items()
        )
        + "\n"
    )
    replace_section(HEADING, section)


if __name__ == "__main__":
    main()
