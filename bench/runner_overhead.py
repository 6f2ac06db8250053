"""Runner overhead: the same model, data, optimizer and steps trained by five loops.

(a) a hand-written PyTorch loop, (b) Catalyst's SupervisedRunner, (c) cvkit's StagedRunner with
its logging (TensorBoard, CSV) and checkpoints (best, last, resume) on, (d) PyTorch Lightning and
(e) fastai when installed (``pip install -e .[bench]``). Each arm trains and validates for the
same epochs; arms are interleaved and repeated, and the median seconds per epoch is reported with
its ratio to (a).

    python bench/runner_overhead.py --repeats 3 --epochs 3 --write
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from results import replace_section

warnings.filterwarnings("ignore")


class Synthetic(Dataset):
    def __init__(self, n: int, size: int, classes: int = 10, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"features": self.x[i], "targets": self.y[i]}


def make_model(arch: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(arch, num_classes=10)


def loaders(args) -> Dict[str, DataLoader]:
    return {
        "train": DataLoader(Synthetic(args.train, args.size), args.batch, shuffle=True),
        "valid": DataLoader(Synthetic(args.valid, args.size, seed=1), args.batch * 2),
    }


def hand_loop(args) -> float:
    model, data = make_model(args.arch), loaders(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for batch in data["train"]:
            opt.zero_grad()
            loss = loss_fn(model(batch["features"]), batch["targets"])
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for batch in data["valid"]:
                correct += (model(batch["features"]).argmax(1) == batch["targets"]).sum().item()
    return (time.perf_counter() - start) / args.epochs


def catalyst_runner(args) -> float:
    from catalyst import dl

    model, data = make_model(args.arch), loaders(args)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    dl.SupervisedRunner().train(
        model=model, criterion=nn.CrossEntropyLoss(), optimizer=opt, loaders=data, num_epochs=args.epochs,
        engine=dl.CPUEngine(), verbose=False,
        callbacks=[dl.CriterionCallback("logits", "targets", "loss"), dl.BackwardCallback("loss"),
                   dl.OptimizerCallback("loss"), dl.AccuracyCallback("logits", "targets", topk=(1,))],
        loggers={},
    )
    return (time.perf_counter() - start) / args.epochs


def cvkit_runner(args) -> float:
    from cvkit.metrics import ClassificationMetrics
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    model, data = make_model(args.arch), loaders(args)
    with tempfile.TemporaryDirectory() as logdir:
        start = time.perf_counter()
        StagedRunner().fit(
            model, [Stage("s", args.epochs, lr=0.01, optimizer="sgd")], data, nn.CrossEntropyLoss(), logdir,
            metrics=lambda: [ClassificationMetrics(10)], verbose=False, engine="cpu",
        )
        elapsed = time.perf_counter() - start
    return elapsed / args.epochs


def lightning_loop(args) -> float:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.loss = make_model(args.arch), nn.CrossEntropyLoss()

        def training_step(self, batch, _):
            return self.loss(self.model(batch["features"]), batch["targets"])

        def validation_step(self, batch, _):
            acc = (self.model(batch["features"]).argmax(1) == batch["targets"]).float().mean()
            self.log("acc", acc)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    data = loaders(args)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(Module(), data["train"], data["valid"])
    return (time.perf_counter() - start) / args.epochs


def fastai_loop(args) -> float:
    import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastai.optimizer import SGD

    class Pairs(Dataset):
        def __init__(self, base: Synthetic) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int):
            return self.base.x[i], self.base.y[i]

    dls = DataLoaders(DataLoader(Pairs(Synthetic(args.train, args.size)), args.batch, shuffle=True),
                      DataLoader(Pairs(Synthetic(args.valid, args.size, seed=1)), args.batch * 2))
    learn = Learner(dls, make_model(args.arch), loss_func=nn.CrossEntropyLoss(), opt_func=SGD, lr=0.01,
                    metrics=accuracy, cbs=[])
    with learn.no_bar(), learn.no_logging():
        start = time.perf_counter()
        learn.fit(args.epochs, lr=0.01)
    return (time.perf_counter() - start) / args.epochs


ARMS: Dict[str, Callable] = {
    "(a) hand-written loop": hand_loop,
    "(b) Catalyst SupervisedRunner": catalyst_runner,
    "(c) cvkit StagedRunner (logs + checkpoints)": cvkit_runner,
    "(d) PyTorch Lightning": lightning_loop,
    "(e) fastai": fastai_loop,
}


def available(name: str) -> bool:
    module = {"(d) PyTorch Lightning": "lightning", "(e) fastai": "fastai"}.get(name)
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train", type=int, default=1024)
    p.add_argument("--valid", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    arms = {k: v for k, v in ARMS.items() if available(k)}
    times: Dict[str, List[float]] = {k: [] for k in arms}
    names = list(arms)
    for repeat in range(args.repeats):
        # rotate the order so that no arm always runs first (cold) or last (after the others' allocations)
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            times[name].append(arms[name](args))
            print(f"repeat {repeat + 1}: {name}: {times[name][-1]:.3f} s/epoch", flush=True)
    base = statistics.median(times["(a) hand-written loop"])
    lines = ["| loop | median s/epoch | all repeats | ratio to (a) |", "|---|---|---|---|"]
    for name, values in times.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.3f} | {', '.join(f'{v:.3f}' for v in values)} | {med / base:.3f} |")
    skipped = [k for k in ARMS if k not in arms]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args, table, skipped)


def write_section(args, table: str, skipped: List[str]) -> None:
    import platform

    import catalyst

    section = (
        "## Runner overhead\n\n"
        f"Command: `python bench/runner_overhead.py --repeats {args.repeats} --epochs {args.epochs} --write` "
        f"({args.arch} at {args.size}x{args.size}, batch {args.batch}, {args.train} train / {args.valid} valid "
        f"images in memory, SGD, {args.threads} CPU threads; torch {torch.__version__}, catalyst {catalyst.__version__}, "
        f"{platform.processor() or platform.machine()}). Each arm trains and validates every epoch; arms interleaved, the order rotated each repeat.\n\n"
        f"{table}\n"
        + (f"\nNot installed, skipped: {', '.join(skipped)}.\n" if skipped else "")
    )
    replace_section("## Runner overhead", section)


if __name__ == "__main__":
    main()
