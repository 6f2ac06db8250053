"""GPU check: what cvkit's training path delivers on one GPU, in one command under 8 minutes.

Parts (each guarded: a failure or a timeout is a row in the table and the next part runs; a global
time budget skips what no longer fits):
- ``hand_amp``: a hand-written AMP loop (ResNet-50, 224x224, SGD) on in-memory batches, the reference;
- ``runner_amp``: StagedRunner (``engine="amp"``) on the same batches: the framework's overhead;
- ``runner_bf16``: StagedRunner under bf16 autocast, where ``torch.cuda.is_bf16_supported()``;
- ``fast_paths``: ``FastPaths`` channels_last and torch.compile on/off through StagedRunner;
- ``jpeg_loader``: ``make_loader`` over synthetic JPEGs with 0/4/8/15 workers, alone and feeding
  the AMP loop: is the loader keeping up, and with how many workers;
- ``ddp_nccl``: StagedRunner under ``cvkit.distributed.ddp_engine`` (world size 1, NCCL), and inside
  it every registered metric with an example updated, synced on the NCCL group and compared with
  its unsynced statistics and values (``metric_sync`` rows).

    python bench/gpu_check.py                                  # GPU: writes "## GPU check" in bench/RESULTS.md
    python bench/gpu_check.py --dry-run --results /tmp/gpu_check.md   # CPU: every code path, tiny model, < 60 s

The dry run uses timm ``test_resnet`` at 32x32, a few batches, no AMP (bf16 autocast on CPU), gloo
instead of NCCL and the ``eager`` compile backend: it checks the code paths, its numbers are not GPU figures.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import platform
import signal
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from catalyst import dl
from catalyst.core.callback import Callback, CallbackOrder
from torch import nn
from torch.utils.data import DataLoader, Dataset

from results import RESULTS, replace_section

HEADING = "## GPU check"
COMMAND = "python bench/gpu_check.py"
DRY_COMMAND = "python bench/gpu_check.py --dry-run --results PATH"
warnings.filterwarnings("ignore")


@dataclass(frozen=True)
class Plan:
    """Sizes and switches of one run: the GPU check or its CPU dry run."""

    dry_run: bool
    device: str
    arch: str
    size: int
    batch: int
    classes: int
    warmup: int  # batches before timing starts (cuDNN autotune, compile, allocator)
    steps: int  # timed batches
    distinct: int  # distinct in-memory batches, cycled
    source: Tuple[int, int]  # synthetic JPEG width, height
    jpegs: int  # distinct JPEG files (the loader's table repeats them)
    loader_batches: int
    workers: Tuple[int, ...]
    backend: str
    budget: float  # seconds for all parts

    @property
    def amp(self) -> bool:
        return not self.dry_run


def gpu_plan(budget: float) -> Plan:
    return Plan(dry_run=False, device="cuda", arch="resnet50", size=224, batch=128, classes=1000, warmup=5,
                steps=60, distinct=8, source=(500, 375), jpegs=256, loader_batches=12, workers=(0, 4, 8, 15),
                backend="nccl", budget=budget)


def dry_plan(budget: float) -> Plan:
    return Plan(dry_run=True, device="cpu", arch="test_resnet", size=32, batch=8, classes=10, warmup=1, steps=3,
                distinct=2, source=(64, 48), jpegs=8, loader_batches=2, workers=(0, 1), backend="gloo", budget=budget)


@dataclass
class Row:
    part: str
    config: str
    images_s: Optional[float] = None
    versus: str = ""
    result: str = ""


class PartTimeout(BaseException):
    """Raised by the alarm when a part outlives its share of the budget (not an Exception, so nothing swallows it)."""


# ---------------------------------------------------------------- shared pieces


class SyntheticBatches(Dataset):
    """``length`` batches cycling over ``distinct`` random ones; item ``i`` is just ``i`` and
    :meth:`collate` hands out the ready batch, so no per-image copying is measured. The batches are
    built on first use in the process that reads them (a DDP worker builds its own, none is pickled)."""

    def __init__(self, plan: Plan, length: int, seed: int = 0) -> None:
        self.plan, self.length, self.seed = plan, length, seed
        self._batches: Optional[List[Dict[str, torch.Tensor]]] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_batches": None}

    def __len__(self) -> int:
        return self.length * self.plan.batch

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        if self._batches is None:
            g = torch.Generator().manual_seed(self.seed)
            p = self.plan
            self._batches = []
            for _ in range(min(p.distinct, self.length)):
                batch = {"features": torch.randn(p.batch, 3, p.size, p.size, generator=g),
                         "targets": torch.randint(0, p.classes, (p.batch,), generator=g)}
                if torch.cuda.is_available() and not p.dry_run:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self._batches.append(batch)
        return self._batches[(indices[0] // self.plan.batch) % len(self._batches)]


def batch_loader(plan: Plan, batches: int, seed: int = 0) -> DataLoader:
    """A DataLoader yielding ready batches in order: what the model step is measured on."""
    dataset = SyntheticBatches(plan, batches, seed)
    return DataLoader(dataset, batch_size=plan.batch, shuffle=False, drop_last=True, collate_fn=dataset.collate)


def loaders(plan: Plan) -> Dict[str, DataLoader]:
    return {"train": batch_loader(plan, plan.warmup + plan.steps), "valid": batch_loader(plan, 2, seed=1)}


def make_model(plan: Plan) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(plan.arch, pretrained=False, num_classes=plan.classes)
    if plan.dry_run:
        # Dynamo traces as on a GPU; the eager backend skips inductor's C++ build, minutes on 2 cores.
        model.compile = functools.partial(nn.Module.compile, model, backend="eager")
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrainThroughput(Callback):
    """Images/s of the train loader after its first ``warmup`` batches, written as JSON to ``path``
    by the main process (under DDP the runner lives in a spawned worker)."""

    def __init__(self, path: Path, warmup: int) -> None:
        super().__init__(order=CallbackOrder.External + 50)
        self.path, self.warmup = Path(path), warmup
        self.seen, self.images, self.start = 0, 0, 0.0

    def on_loader_start(self, runner: Any) -> None:
        self.seen, self.images, self.start = 0, 0, 0.0

    def on_batch_end(self, runner: Any) -> None:
        if not runner.is_train_loader:
            return
        self.seen += 1
        if self.seen == self.warmup:
            synchronize(runner.engine.device)
            self.start = time.perf_counter()
        elif self.seen > self.warmup:
            self.images += runner.batch_size * runner.engine.num_processes

    def on_loader_end(self, runner: Any) -> None:
        if not runner.is_train_loader or not self.images or not runner.engine.is_main_process:
            return
        synchronize(runner.engine.device)
        seconds = time.perf_counter() - self.start
        self.path.write_text(json.dumps({"images": self.images, "seconds": seconds, "images_s": self.images / seconds}))


class MetricSyncCheck(Callback):
    """At the end of the run, inside the process group: every registered metric with an example is
    updated, synced and compared with its unsynced statistics and values; results as JSON to ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__(order=CallbackOrder.External + 51)
        self.path = Path(path)

    def on_experiment_end(self, runner: Any) -> None:
        import torch.distributed as dist

        results = {"backend": str(dist.get_backend()), "world_size": dist.get_world_size(),
                   "metrics": check_metric_sync(runner.engine.device)}
        if runner.engine.is_main_process:
            self.path.write_text(json.dumps(results))


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def check_metric_sync(device: torch.device) -> Dict[str, str]:
    """``{metric name: "equal ..." or what differed}`` after one synced update of each registered metric."""
    from cvkit.metrics import create_metric, list_metrics, metric_example

    out: Dict[str, str] = {}
    for name in list_metrics():
        try:
            kwargs, outputs, targets = metric_example(name, 4)
        except KeyError:
            out[name] = "no example registered"
            continue
        torch.manual_seed(0)
        metric = create_metric(name, **kwargs)
        metric.update(_to(outputs, device), _to(targets, device))
        state = [t.clone() for t in metric.state_tensors()]
        before = metric.compute()
        metric.sync()
        after_state, after = metric.state_tensors(), metric.compute()
        bad = [i for i, (a, b) in enumerate(zip(state, after_state))
               if a.dtype != b.dtype or a.device != b.device or not torch.equal(a, b)]
        keys = [k for k in before if k not in after or not _same(before[k], after[k])]
        if bad or keys or len(state) != len(after_state):
            out[name] = f"DIFFERS: state tensors {bad}, keys {keys}"
        else:
            dtypes = "/".join(sorted({str(t.dtype).replace("torch.", "") for t in state}))
            out[name] = f"equal after sync ({len(state)} {dtypes} tensor(s) on {state[0].device.type}, {len(before)} keys)"
    return out


def fit_runner(plan: Plan, engine: Any, fast: Optional[Any] = None, callbacks: Sequence[Callback] = (),
               run_loaders: Optional[Dict[str, DataLoader]] = None) -> Tuple[Dict[str, Any], float, Any]:
    """One StagedRunner epoch on in-memory batches; returns the throughput JSON, the fit's wall seconds, the runner."""
    from cvkit.metrics import ClassificationMetrics
    from cvkit.perf import FastPaths
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    model = make_model(plan)
    with tempfile.TemporaryDirectory() as logdir:
        path = Path(logdir) / "throughput.json"
        extra = [TrainThroughput(path, plan.warmup), *callbacks]
        start = time.perf_counter()
        runner = StagedRunner().fit(
            model, [Stage("check", 1, lr=0.01, optimizer="sgd")], run_loaders or loaders(plan), nn.CrossEntropyLoss(),
            logdir, metrics=lambda: [ClassificationMetrics(plan.classes)], callbacks=lambda stage: list(extra),
            engine=engine, verbose=False, fast=fast or FastPaths(),
        )
        wall = time.perf_counter() - start
        if not path.is_file():
            raise RuntimeError(f"{path.name} was not written: the train loader ran no timed batch")
        measured = json.loads(path.read_text())
        for callback in callbacks:
            if isinstance(callback, MetricSyncCheck):
                measured["sync"] = json.loads(callback.path.read_text()) if callback.path.is_file() else None
        return measured, wall, runner


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, which otherwise keeps the first engine's precision
    ("AcceleratorState has already been initialized") and so forbids fp16, then bf16, in one process.
    Only between parts: an engine built before the reset would lose its state with it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def hand_amp_loop(plan: Plan, batches: Iterator[Dict[str, torch.Tensor]], model: nn.Module,
                  warmup: int) -> Tuple[float, float]:
    """Train on ``batches`` by hand (AMP on a GPU); returns images/s after ``warmup`` batches and the
    share of that time spent waiting for the next batch."""
    device = torch.device(plan.device)
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(device.type, enabled=plan.amp)
    images, waited, start, seen = 0, 0.0, 0.0, 0
    while True:
        before = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        if seen >= warmup:
            waited += time.perf_counter() - before
        x = batch["features"].to(device, non_blocking=True)
        y = batch["targets"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=plan.amp):
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        seen += 1
        if seen == warmup:
            synchronize(device)
            start = time.perf_counter()
        elif seen > warmup:
            images += len(y)
    synchronize(device)
    if not images:
        raise RuntimeError(f"only {seen} batches, none timed after {warmup} warm-up")
    elapsed = time.perf_counter() - start
    return images / elapsed, waited / elapsed


def amp_engine(plan: Plan) -> Any:
    return "cpu" if plan.dry_run else "amp"


# ---------------------------------------------------------------- parts


class Context:
    """What parts share: the plan, the rows so far and the reference rates."""

    def __init__(self, plan: Plan) -> None:
        self.plan, self.rows, self.rates = plan, [], {}

    def add(self, row: Row) -> None:
        self.rows.append(row)
        shown = f"{row.images_s:.1f} images/s" if row.images_s is not None else "-"
        print(f"[gpu_check] {row.part} | {row.config} | {shown} | {row.versus} | {row.result}", flush=True)

    def versus(self, rate: float, key: str) -> str:
        base = self.rates.get(key)
        return f"{rate / base:.2f}x {key}" if base else ""


def part_hand_amp(ctx: Context) -> None:
    plan = ctx.plan
    rate, _ = hand_amp_loop(plan, iter(loaders(plan)["train"]), make_model(plan), plan.warmup)
    ctx.rates["hand_amp"] = rate
    precision = "fp16 autocast + GradScaler" if plan.amp else "fp32 (dry run)"
    ctx.add(Row("hand_amp", f"{plan.arch} {plan.size}px batch {plan.batch}, {precision}, in-memory batches", rate,
                "reference", f"{plan.steps} timed steps after {plan.warmup} warm-up"))


def part_runner_amp(ctx: Context) -> None:
    plan = ctx.plan
    measured, wall, _ = fit_runner(plan, amp_engine(plan))
    rate = measured["images_s"]
    ctx.rates["runner_amp"] = rate
    hand = ctx.rates.get("hand_amp")
    overhead = f"framework overhead {1 - rate / hand:+.1%} of hand loop" if hand else "no hand-loop reference"
    ctx.add(Row("runner_amp", f"StagedRunner engine={amp_engine(plan)!r}, same batches, metrics on", rate,
                ctx.versus(rate, "hand_amp"), f"{overhead}; fit {wall:.0f} s incl. valid + checkpoints"))


def part_runner_bf16(ctx: Context) -> None:
    plan = ctx.plan
    if plan.dry_run:
        engine, label = dl.CPUEngine(mixed_precision="bf16"), "CPUEngine bf16 autocast"
    elif not torch.cuda.is_bf16_supported():
        ctx.add(Row("runner_bf16", "GPUEngine(mixed_precision='bf16')", None, "",
                    f"skipped: bf16 not supported on {torch.cuda.get_device_name(0)}"))
        return
    else:
        engine, label = dl.GPUEngine(mixed_precision="bf16"), "GPUEngine(mixed_precision='bf16')"
    measured, wall, runner = fit_runner(plan, engine)
    rate = measured["images_s"]
    loss = runner.history[-1].get("train/loss", float("nan")) if runner.history else float("nan")
    ctx.add(Row("runner_bf16", f"StagedRunner {label}, same batches", rate, ctx.versus(rate, "runner_amp"),
                f"train loss {loss:.3f} (finite: {math.isfinite(loss)}); fit {wall:.0f} s"))


def fast_part(channels_last: bool, compile_: bool) -> Callable[[Context], None]:
    def part(ctx: Context) -> None:
        from cvkit.perf import FastPaths

        plan = ctx.plan
        measured, wall, _ = fit_runner(plan, amp_engine(plan), FastPaths(channels_last=channels_last, compile=compile_))
        rate = measured["images_s"]
        backend = " (eager backend, dry run)" if compile_ and plan.dry_run else ""
        ctx.add(Row("fast_paths", f"StagedRunner channels_last={channels_last}, compile={compile_}{backend}", rate,
                    ctx.versus(rate, "runner_amp"),
                    f"fit {wall:.0f} s incl. {'compile, ' if compile_ else ''}valid, checkpoints"))

    return part


def part_jpeg_loader(ctx: Context) -> None:
    import pandas as pd
    from data_throughput import make_jpegs

    from cvkit.data.augment import create_preset
    from cvkit.data.datasets import ClassificationDataset
    from cvkit.data.loaders import make_loader

    plan = ctx.plan
    reference = ctx.rates.get("hand_amp")
    model = make_model(plan)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), plan.jpegs, *plan.source)
        for workers in plan.workers:
            # Enough batches that every worker delivers several: start-up is not what is measured.
            rows = plan.batch * max(plan.loader_batches, 3 * workers)
            frame = pd.DataFrame({"path": [paths[i % len(paths)].name for i in range(rows)],
                                  "label": [str(i % plan.classes) for i in range(rows)]})
            dataset = ClassificationDataset(frame, root=tmp, transform=create_preset("medium", plan.size))
            loader = make_loader(dataset, plan.batch, train=True, workers=workers)
            start, count = time.perf_counter(), 0
            for batch in loader:
                count += len(batch["targets"])
            alone = count / (time.perf_counter() - start)
            rate, waiting = hand_amp_loop(plan, iter(loader), model, warmup=1)
            share = f"{rate / reference:.0%} of in-memory" if reference else "no in-memory reference"
            verdict = "keeps up" if reference and rate >= 0.9 * reference else "loader-bound"
            ctx.add(Row("jpeg_loader", f"make_loader workers={workers}, {plan.source[0]}x{plan.source[1]} JPEG -> "
                        f"medium {plan.size}px, {rows // plan.batch} batches", rate, ctx.versus(rate, "hand_amp"),
                        f"loader alone {alone:.0f} images/s; loop waits {waiting:.0%} of its time; {verdict} ({share})"))


def part_ddp(ctx: Context) -> None:
    from cvkit.distributed import ddp_engine

    plan = ctx.plan
    engine = ddp_engine(port=free_port(), workers=1, backend=plan.backend, cpu=plan.dry_run,
                        mixed_precision="no" if plan.dry_run else "fp16")
    with tempfile.TemporaryDirectory() as tmp:
        check = MetricSyncCheck(Path(tmp) / "metric_sync.json")
        measured, wall, runner = fit_runner(plan, engine, callbacks=[check])
    rate = measured["images_s"]
    sync = measured.get("sync")
    if sync is None:
        raise RuntimeError("the DDP worker wrote no metric_sync.json")
    logged = sorted(k for k in (runner.history[-1] if runner.history else {}) if k.startswith("valid/"))
    precision = ", fp16" if not plan.dry_run else ""
    ctx.add(Row("ddp", f"StagedRunner DistributedDataParallelEngine world size {sync['world_size']}, "
                f"{sync['backend']}{precision}", rate, ctx.versus(rate, "runner_amp"),
                f"valid metrics synced and logged: {', '.join(logged) or 'none'}; fit {wall:.0f} s incl. spawn"))
    for name, result in sync["metrics"].items():
        ctx.add(Row("metric_sync", f"{name} on a {sync['backend']} group (world size {sync['world_size']})", None, "",
                    result))


PARTS: List[Tuple[str, Callable[[Context], None], float, float]] = [
    # name, function, seconds it needs at least to start on a GPU, cap on its seconds
    ("hand_amp", part_hand_amp, 15, 60),
    ("runner_amp", part_runner_amp, 20, 60),
    ("runner_bf16", part_runner_bf16, 20, 60),
    ("fast_paths channels_last", fast_part(True, False), 20, 60),
    ("jpeg_loader", part_jpeg_loader, 40, 120),
    ("ddp", part_ddp, 40, 120),
    ("fast_paths compile", fast_part(False, True), 60, 150),
    ("fast_paths channels_last+compile", fast_part(True, True), 60, 150),
]


def _alarm(signum: int, frame: Any) -> None:
    raise PartTimeout()


def run_parts(plan: Plan, only: Sequence[str] = ()) -> List[Row]:
    """Every part (or those whose name starts with one of ``only``) in order, each under an alarm;
    failures, timeouts and skips become rows."""
    ctx = Context(plan)
    deadline = time.monotonic() + plan.budget
    signal.signal(signal.SIGALRM, _alarm)
    for name, part, needs, cap in PARTS:
        if only and not name.startswith(tuple(only)):
            continue
        left = deadline - time.monotonic()
        if not plan.dry_run and left < needs:
            ctx.add(Row(name.split()[0], name, None, "", f"skipped: {left:.0f} s of the budget left, needs ~{needs:.0f} s"))
            continue
        allowed = max(1, int(min(cap, left) if not plan.dry_run else left))
        reset_accelerate()
        children = set(multiprocessing.active_children())
        start = time.monotonic()
        signal.alarm(allowed)
        try:
            part(ctx)
        except PartTimeout:
            ctx.add(Row(name.split()[0], name, None, "", f"timed out after {allowed} s"))
            for child in set(multiprocessing.active_children()) - children:
                child.kill()
        except Exception as exc:  # noqa: BLE001  (one part's failure is recorded, the others still run)
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            message = (lines[-1] if lines else "")[:200]  # a worker's traceback ends with its error
            ctx.add(Row(name.split()[0], name, None, "", f"FAILED: {type(exc).__name__}: {message}"))
        finally:
            signal.alarm(0)
        print(f"[gpu_check] {name}: {time.monotonic() - start:.0f} s", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return ctx.rows


# ---------------------------------------------------------------- report


def table(rows: Sequence[Row]) -> str:
    lines = ["| part | configuration | images/s | vs | result |", "|---|---|---:|---|---|"]
    for r in rows:
        rate = f"{r.images_s:.1f}" if r.images_s is not None else "-"
        lines.append(f"| {r.part} | {r.config} | {rate} | {r.versus} | {r.result} |")
    return "\n".join(lines)


def environment(plan: Plan) -> str:
    import catalyst
    import timm

    device = torch.cuda.get_device_name(0) if plan.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    cuda = f", CUDA {torch.version.cuda}" if plan.device == "cuda" else ""
    return (f"{device}, torch {torch.__version__}{cuda}, timm {timm.__version__}, catalyst {catalyst.__version__}, "
            f"Python {platform.python_version()}, {torch.get_num_threads()} torch threads")


def section(plan: Plan, rows: Sequence[Row], seconds: float) -> str:
    setup = (f"{plan.arch} at {plan.size}x{plan.size}, batch {plan.batch}, {plan.classes} classes, SGD momentum 0.9; "
             f"{plan.steps} timed train batches after {plan.warmup} warm-up ({plan.distinct} distinct in-memory "
             f"batches cycled); StagedRunner rates come from a callback timing its train loader (validation and "
             f"checkpoints excluded) and include its per-batch metrics; JPEG parts: {plan.jpegs} synthetic "
             f"{plan.source[0]}x{plan.source[1]} JPEGs, `medium` preset, {plan.loader_batches} batches per pass.")
    if plan.dry_run:
        return (f"{HEADING}\n\n**GPU figures pending**: no GPU run has been recorded yet. On a machine with one CUDA "
                f"GPU run `{COMMAND}` (under 8 minutes; it replaces this section with its table).\n\n"
                f"Below: the **CPU dry run** (`{DRY_COMMAND}`), which only checks that every part's code path runs "
                f"(tiny model, no AMP, gloo instead of NCCL, eager compile backend); its numbers are not GPU "
                f"figures. {environment(plan)}; {seconds:.0f} s.\n\n{setup}\n\n{table(rows)}\n")
    return (f"{HEADING}\n\nCommand: `{COMMAND}` ({seconds:.0f} s, budget {plan.budget:.0f} s). {environment(plan)}.\n\n"
            f"{setup}\n\n{table(rows)}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, every code path; needs --results")
    p.add_argument("--results", type=Path, default=None, help=f"markdown file to write the section into (default {RESULTS})")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 420 on a GPU, 50 dry)")
    p.add_argument("--only", default="", help="comma-separated part names to run (default all): "
                   + ", ".join(name for name, *_ in PARTS))
    args = p.parse_args()
    if args.dry_run and args.results is None:
        sys.exit("gpu_check.py: --dry-run needs --results PATH (its CPU numbers must not stand for GPU figures)")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA GPU visible; for the CPU code-path check run: " + DRY_COMMAND)
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        plan = dry_plan(args.budget or 50)
    else:
        plan = gpu_plan(args.budget or 420)
    start = time.monotonic()
    rows = run_parts(plan, [n for n in args.only.split(",") if n])
    seconds = time.monotonic() - start
    print(table(rows))
    replace_section(HEADING, section(plan, rows, seconds), args.results or RESULTS)
    print(f"[gpu_check] wrote {HEADING!r} to {args.results or RESULTS} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
