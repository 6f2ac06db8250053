"""The callbacks every StagedRunner stage uses: BN freezing, metrics, LR logging, checkpoints, history.

Each has its own distinct ``order`` so the per-stage callback list reads top to bottom in the
order it runs (STYLE.md: no two callbacks share an order, nothing is added behind the user's back).
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from catalyst.callbacks.backward import BackwardCallback
from catalyst.callbacks.misc import EarlyStoppingCallback
from catalyst.callbacks.optimizer import OptimizerCallback
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
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            for metric in self.metrics:
                if distributed:
                    metric.sync()
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
    """Every epoch: ``resume.pth`` and the stage's ``last.pth``; ``best.pth`` when the valid metric improves.

    The state is serialised once, from ``runner.resume_payload()`` (weights, optimizer,
    scheduler, counters, history), and written atomically; ``last.pth``, ``best.pth`` and
    ``resume.pth`` are hard links to that one file where the filesystem allows, so an epoch costs
    one write. Files hold plain tensors and numbers: ``torch.load(..., weights_only=True)`` reads
    them. Runs after early stopping and history, so the saved state is the epoch's final one.
    """

    def __init__(
        self,
        folder: Path,
        resume_path: Path,
        stage: str,
        loader_key: str,
        metric_key: str,
        minimize: bool,
        best_score: Optional[float] = None,
        best_epoch: Optional[int] = None,
    ) -> None:
        super().__init__(order=CallbackOrder.External + 20)
        self.folder, self.resume_path = Path(folder), Path(resume_path)
        self.stage = stage
        self.loader_key, self.metric_key, self.minimize = loader_key, metric_key, minimize
        self.best_score, self.best_epoch = best_score, best_epoch

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
        better = self.is_better(score)
        if better:
            self.best_score, self.best_epoch = score, int(runner.epoch_step)
            record = getattr(runner, "record_best", None)
            if record is not None:
                record(self.stage, self.folder / "best.pth", score, int(runner.epoch_step))
        if not runner.engine.is_main_process:
            return
        last = self.folder / "last.pth"
        save_checkpoint(last, runner.resume_payload())
        if better:
            link_or_copy(last, self.folder / "best.pth")
        link_or_copy(last, self.resume_path)


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s bytes, atomically: a hard link, or a copy if links fail."""
    tmp = target.with_name(f".{target.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


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


class EarlyStopping(EarlyStoppingCallback):
    """Catalyst's early stopping, with its counters saved for resume and restored at stage start."""

    def __init__(self, *args: Any, resume_state: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_state = resume_state

    def on_experiment_start(self, runner: "IRunner") -> None:
        super().on_experiment_start(runner)
        if self.resume_state:
            self.best_score = self.resume_state["best_score"]
            self.num_no_improvement_epochs = int(self.resume_state["num_no_improvement_epochs"])

    def state_dict(self) -> Dict[str, Any]:
        return {"best_score": self.best_score, "num_no_improvement_epochs": self.num_no_improvement_epochs}


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient and the stage's policy is to stop."""


class NaNGuardCallback(Callback):
    """Stop (or skip the batch) when the train loss or any gradient is NaN/inf.

    Sits between the criterion and the backward pass (loss check) and again right after the
    backward pass (gradient check). With ``policy="skip"`` the guarded backward/optimizer
    callbacks see ``runner.skip_step`` and leave the weights untouched for that batch.
    """

    def __init__(self, policy: str = "stop", loss_key: str = "loss") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"NaN policy must be 'stop' or 'skip', got {policy!r}")
        super().__init__(order=CallbackOrder.Backward - 1)
        self.policy, self.loss_key = policy, loss_key
        self.skipped = 0

    def on_loader_start(self, runner: "IRunner") -> None:
        self.skipped = 0

    def on_batch_start(self, runner: "IRunner") -> None:
        runner.skip_step = False

    def check(self, runner: "IRunner", what: str) -> None:
        where = (
            f"stage {getattr(runner.stage, 'name', '?')!r}, epoch {runner.epoch_step}, "
            f"batch {runner.loader_batch_step} of loader {runner.loader_key!r}"
        )
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite {what} in {where}; the last good weights are in the stage's last.pth "
                "and the run continues from them with resume=True (policy 'skip' skips such batches)"
            )
        runner.skip_step = True
        self.skipped += 1

    def on_batch_end(self, runner: "IRunner") -> None:
        if not runner.is_train_loader:
            return
        loss = runner.batch_metrics.get(self.loss_key)
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            self.check(runner, f"loss ({float(torch.as_tensor(loss).float().mean())})")

    def on_loader_end(self, runner: "IRunner") -> None:
        if runner.is_train_loader and self.policy == "skip":
            runner.loader_metrics["nan_skipped_batches"] = float(self.skipped)


class GradientGuardCallback(Callback):
    """Right after backward: a NaN/inf gradient is handled like a NaN loss (see NaNGuardCallback)."""

    def __init__(self, guard: NaNGuardCallback) -> None:
        super().__init__(order=CallbackOrder.Backward + 1)
        self.guard = guard

    def on_batch_end(self, runner: "IRunner") -> None:
        if not runner.is_train_loader or runner.skip_step:
            return
        if not _grads_finite(runner.engine.unwrap_model(runner.model).parameters()):
            self.guard.check(runner, "gradient")


def _grads_finite(params: Iterable[torch.nn.Parameter]) -> bool:
    """True when every gradient is finite, with one host sync per device.

    A NaN or inf anywhere makes its tensor's sum non-finite, and summing is ~9x cheaper on CPU than
    ``isfinite(...).all()`` or a max-abs norm per parameter (those cost ~8% of a ResNet-18 epoch).
    """
    sums: Dict[torch.device, List[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            sums.setdefault(grad.device, []).append(grad.sum(dtype=torch.float32))
    return all(bool(torch.isfinite(torch.stack(parts)).all()) for parts in sums.values())


class GuardedBackwardCallback(BackwardCallback):
    """Catalyst's backward step, skipped for a batch the NaN guard marked."""

    def on_batch_end(self, runner: "IRunner") -> None:
        if not getattr(runner, "skip_step", False):
            super().on_batch_end(runner)


class GuardedOptimizerCallback(OptimizerCallback):
    """Catalyst's optimizer step; for a batch the NaN guard marked, gradients are dropped instead."""

    def on_batch_end(self, runner: "IRunner") -> None:
        if runner.is_train_loader and getattr(runner, "skip_step", False):
            self.optimizer.zero_grad()
            return
        super().on_batch_end(runner)


class BatchPlateauCallback(Callback):
    """Step a :class:`cvkit.stages.SmoothedLossPlateau` with every train batch's loss."""

    def __init__(self, loss_key: str = "loss") -> None:
        super().__init__(order=CallbackOrder.Scheduler)
        self.loss_key = loss_key

    def on_batch_end(self, runner: "IRunner") -> None:
        if runner.is_train_loader and not getattr(runner, "skip_step", False):
            runner.scheduler.update(float(runner.batch_metrics[self.loss_key]))
