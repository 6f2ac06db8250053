"""The callbacks every StagedRunner stage uses: BN freezing, metrics, LR logging, checkpoints, history.

Each has its own distinct ``order`` so the per-stage callback list reads top to bottom in the
order it runs (STYLE.md: no two callbacks share an order, nothing is added behind the user's back).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from catalyst.core.callback import Callback, CallbackOrder

from cvkit.io import atomic_write_bytes, save_checkpoint
from cvkit.metrics import Metric
from cvkit.models.groups import set_bn_eval

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class FreezeBatchNormCallback(Callback):
    """Keep frozen BatchNorm modules in eval mode, so their running statistics never move.

    Catalyst calls ``model.train()`` at every loader start; this runs right after it.
    """

    def __init__(self, bn_names: Sequence[str]) -> None:
        super().__init__(order=CallbackOrder.Internal)
        self.bn_names = list(bn_names)

    def on_loader_start(self, runner: "IRunner") -> None:
        if runner.is_train_loader and self.bn_names:
            set_bn_eval(runner.engine.unwrap_model(runner.model), self.bn_names)


class MetricsCallback(Callback):
    """Feed ``runner.batch[output_key]`` and ``[target_key]`` to cvkit metrics; write them at loader end."""

    def __init__(
        self,
        metrics: Iterable[Metric],
        input_key: str = "logits",
        target_key: str = "targets",
        loaders: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Metric + 1)
        self.metrics = list(metrics)
        self.input_key, self.target_key = input_key, target_key
        self.loaders = loaders

    def _active(self, runner: "IRunner") -> bool:
        return self.loaders is None or runner.loader_key in self.loaders

    def on_loader_start(self, runner: "IRunner") -> None:
        for metric in self.metrics:
            metric.reset()

    def on_batch_end(self, runner: "IRunner") -> None:
        if self._active(runner):
            for metric in self.metrics:
                metric.update(runner.batch[self.input_key], runner.batch[self.target_key])

    def on_loader_end(self, runner: "IRunner") -> None:
        if self._active(runner):
            for metric in self.metrics:
                runner.loader_metrics.update(metric.compute())


class LRMonitorCallback(Callback):
    """Log the learning rate (and momentum) of every named parameter group as ``lr/<group>``.

    Catalyst logs group 0 only; cvkit's groups carry a ``name`` (head, backbone, a block).
    Values are taken at the end of each train loader, i.e. the LR the epoch trained with
    (for per-batch schedules, the LR of its last batch).
    """

    GROUP0_KEYS = ("lr", "momentum")  # what Catalyst's optimizer/scheduler callbacks log for group 0 only

    def __init__(self) -> None:
        super().__init__(order=CallbackOrder.Scheduler + 2)

    @staticmethod
    def group_values(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
        """``{"lr/<name>": lr, "momentum/<name>": m}`` for each named group (momentum omitted when None)."""
        out: Dict[str, float] = {}
        for i, group in enumerate(optimizer.param_groups):
            name = group.get("name", f"group{i}")
            out[f"lr/{name}"] = float(group["lr"])
            momentum = group.get("momentum", group.get("betas", (None,))[0])
            if momentum is not None:
                out[f"momentum/{name}"] = float(momentum)
        return out

    def on_loader_end(self, runner: "IRunner") -> None:
        for key in self.GROUP0_KEYS:
            runner.loader_metrics.pop(key, None)
        if runner.is_train_loader and runner.optimizer is not None:
            runner.epoch_metrics["_epoch_"].update(self.group_values(runner.optimizer))

    def on_epoch_end(self, runner: "IRunner") -> None:
        for key in self.GROUP0_KEYS:
            runner.epoch_metrics["_epoch_"].pop(key, None)


class StageCheckpointCallback(Callback):
    """Save ``last.pth`` every epoch and ``best.pth`` when the valid metric improves, atomically.

    Files hold plain tensors and numbers, so ``torch.load(..., weights_only=True)`` reads them.
    """

    def __init__(
        self,
        folder: Path,
        stage: str,
        loader_key: str,
        metric_key: str,
        minimize: bool,
        on_best: Optional[Callable[[float, int], None]] = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Checkpoint + 1)
        self.folder = Path(folder)
        self.stage = stage
        self.loader_key, self.metric_key, self.minimize = loader_key, metric_key, minimize
        self.best_score: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.on_best = on_best

    def is_better(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score < self.best_score if self.minimize else score > self.best_score

    def on_epoch_end(self, runner: "IRunner") -> None:
        metrics = runner.epoch_metrics.get(self.loader_key)
        if not metrics or self.metric_key not in metrics:
            have = {k: sorted(v) for k, v in runner.epoch_metrics.items() if k != "_epoch_"}
            raise KeyError(
                f"valid metric {self.loader_key}/{self.metric_key} was not computed; "
                f"metrics this epoch: {have}"
            )
        score = float(metrics[self.metric_key])
        model = runner.engine.unwrap_model(runner.model)
        payload = {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "stage": self.stage,
            "epoch": int(runner.epoch_step),
            "metrics": {k: dict(v) for k, v in runner.epoch_metrics.items()},
        }
        if runner.engine.is_main_process:
            save_checkpoint(self.folder / "last.pth", payload)
        if self.is_better(score):
            self.best_score, self.best_epoch = score, int(runner.epoch_step)
            if runner.engine.is_main_process:
                save_checkpoint(self.folder / "best.pth", payload)
            if self.on_best is not None:
                self.on_best(score, int(runner.epoch_step))


class HistoryCallback(Callback):
    """One row per epoch (stage, global epoch, every loader metric, every group's LR) in ``log.csv``.

    The whole file is rewritten atomically each epoch: a crash never leaves half a row.
    """

    def __init__(self, path: Path, stage: str, stage_index: int, rows: List[Dict[str, object]]) -> None:
        super().__init__(order=CallbackOrder.External + 10)
        self.path = Path(path)
        self.stage, self.stage_index = stage, stage_index
        self.rows = rows

    def on_epoch_end(self, runner: "IRunner") -> None:
        row: Dict[str, object] = {
            "stage": self.stage,
            "stage_index": self.stage_index,
            "epoch": int(runner.epoch_step),
            "epoch_in_stage": int(runner.epoch_step - runner.stage_start_epoch),
        }
        for loader, values in runner.epoch_metrics.items():
            for key, value in values.items():
                row[key if loader == "_epoch_" else f"{loader}/{key}"] = float(value)
        self.rows.append(row)
        if runner.engine.is_main_process:
            write_csv(self.path, self.rows)


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    """Write dict rows (columns = union of keys, first-seen order) to CSV atomically."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
