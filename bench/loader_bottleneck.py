"""Loader end to end vs the model step, at the examples' real-data settings.

For each example (model, image size and batch size from its real-data command line), three
numbers on this machine, with cvkit's ``make_loader`` defaults (workers = cores - 1, prefetch 4,
pinned memory when a GPU is present) over ``ClassificationDataset`` + ``medium`` preset on JPEGs
of that competition's typical size:
(a) the loader alone: batches pulled and dropped (decode, augment, collate, workers), images/s;
(b) the model step alone: forward + backward + SGD step, again and again on one loaded batch, images/s;
(c) the training loop: (b) fed by (a), images/s, and the share of its time spent waiting for a batch.
The loader is not the bottleneck when (c) waits for under 10 % of its time. On a CPU-only machine
the workers also take cores from the step, which (c) / (b) shows.

    python bench/loader_bottleneck.py --write
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, NamedTuple, Tuple

import pandas as pd
import timm
import torch
from data_throughput import make_jpegs
from torch import nn

HEADING = "## Loader vs model step"


class Setting(NamedTuple):
    example: str
    arch: str
    size: int
    batch: int
    source: str  # typical source JPEG, WxH


SETTINGS = [
    Setting("stl10", "resnet50", 96, 32, "96x96"),
    Setting("facial_keypoints", "resnet34", 96, 16, "96x96"),
    Setting("localization", "resnet34", 224, 16, "500x375"),
    Setting("sports", "efficientnet_b0", 224, 32, "224x224"),
    Setting("ford_vs_ferrari", "efficientnet_b0", 320, 24, "640x480"),
]


def loader_for(setting: Setting, folder: Path, batches: int, workers: int) -> torch.utils.data.DataLoader:
    from cvkit.data.augment import create_preset
    from cvkit.data.datasets import ClassificationDataset
    from cvkit.data.loaders import make_loader

    width, height = (int(v) for v in setting.source.split("x"))
    paths = make_jpegs(folder, setting.batch * batches, width, height)
    frame = pd.DataFrame({"path": [p.name for p in paths], "label": [str(i % 10) for i in range(len(paths))]})
    dataset = ClassificationDataset(frame, root=folder, transform=create_preset("medium", setting.size))
    return make_loader(dataset, setting.batch, train=True, workers=workers)


def started(loader: torch.utils.data.DataLoader, skip: int) -> Iterator[dict]:
    """An iterator over ``loader`` whose first ``skip`` batches (worker start-up) are already taken."""
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    return iterator


def timed(iterator: Iterator[dict]) -> Iterator[Tuple[dict, float]]:
    """Yield (batch, seconds waited for it)."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def measure(setting: Setting, folder: Path, batches: int, workers: int) -> Dict[str, float]:
    """Images/s of the loader alone, the step alone and the loop, and the loop's share spent waiting."""
    torch.manual_seed(0)
    model = timm.create_model(setting.arch, pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    loader = loader_for(setting, folder, batches + 2, workers)
    waited, count = 0.0, 0
    for batch, wait in timed(started(loader, skip=2)):
        waited, count = waited + wait, count + len(batch["targets"])
    loader_rate = count / waited

    x, y = batch["features"].clone(), batch["targets"].clone()
    step(x, y)
    start = time.perf_counter()
    for _ in range(batches):
        step(x, y)
    step_rate = setting.batch * batches / (time.perf_counter() - start)

    iterator = started(loader, skip=2)
    waited, count, start = 0.0, 0, time.perf_counter()
    for batch, wait in timed(iterator):
        step(batch["features"], batch["targets"])
        waited, count = waited + wait, count + len(batch["targets"])
    total = time.perf_counter() - start
    return {"loader": loader_rate, "step": step_rate, "loop": count / total, "wait": waited / total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=6, help="timed batches per measurement (after 2 warm-up)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: make_loader's)")
    p.add_argument("--only", default=None, help="comma-separated example names to run")
    p.add_argument("--write", action="store_true", help="replace this bench's section of bench/RESULTS.md")
    args = p.parse_args()
    from cvkit.data.loaders import default_workers

    workers = default_workers() if args.workers is None else args.workers
    chosen = [s for s in SETTINGS if args.only is None or s.example in args.only.split(",")]
    lines = ["| example | model, size, batch | source JPEG | loader alone img/s | step alone img/s "
             "| loop img/s (loop / step) | loop waiting for data |",
             "|---|---|---|---:|---:|---:|---:|"]
    for setting in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(setting, Path(tmp), args.batches, workers)
        lines.append(f"| {setting.example} | {setting.arch}, {setting.size}, {setting.batch} | {setting.source} "
                     f"| {r['loader']:.0f} | {r['step']:.1f} | {r['loop']:.1f} ({r['loop'] / r['step']:.0%}) "
                     f"| {r['wait']:.1%} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args, workers, table)


def write_section(args: argparse.Namespace, workers: int, table: str) -> None:
    """Replace (or append) this bench's section of RESULTS.md, leaving every other section as it is."""
    from results import replace_section

    command = f"python bench/loader_bottleneck.py --batches {args.batches} --write"
    device = "CPU only" if not torch.cuda.is_available() else torch.cuda.get_device_name(0)
    section = (
        f"{HEADING}\n\n"
        f"{device}, {torch.get_num_threads()} torch threads, {workers} DataLoader worker(s) "
        f"(`make_loader` defaults), {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"timm {timm.__version__}. Real-data settings of each example; random-init models; "
        f"{args.batches} timed batches after 2 warm-up.\n\n{table}\n\nCommand: `{command}`\n"
    )
    replace_section(HEADING, section)


if __name__ == "__main__":
    main()
