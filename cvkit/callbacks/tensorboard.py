"""TensorBoard logging for staged runs (the ``tensorboard`` logger): every stage's events kept, on one
global-epoch timeline, and the run's hyperparameters with its final scores in the HParams tab."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Union

from catalyst.loggers.tensorboard import TensorboardLogger
from tensorboardX import SummaryWriter

from cvkit.loggers import LoggerRun, RunLogger, final_scores

if TYPE_CHECKING:
    from cvkit.stages import Stage


class StageTensorboardLogger(TensorboardLogger):
    """Catalyst's TensorBoard logger with a suffix on every event file it opens.

    tensorboardX names an event file by the second it was opened and the host, and opens it for
    writing: a stage that starts within the same second as the previous one (short stages, tiny
    data) would truncate that stage's file. A suffix unique to the stage and process keeps every
    file; TensorBoard merges the files of a folder by step, and steps are global epochs.
    """

    def __init__(self, logdir: str, filename_suffix: str, **kwargs: object) -> None:
        super().__init__(logdir=logdir, **kwargs)
        self.filename_suffix = filename_suffix

    def _check_loader_key(self, loader_key: str) -> None:
        if loader_key not in self.loggers:
            path = os.path.join(self.logdir, loader_key)
            self.loggers[loader_key] = SummaryWriter(path, filename_suffix=self.filename_suffix)


def stage_suffix(stage_index: int) -> str:
    """Event-file suffix for a stage: its index and this process, so neither a later stage nor a
    resumed run in the same second reuses a name."""
    return f".{os.getpid()}.stage{stage_index:03d}"


def _scalar(value: object) -> Optional[Union[int, float, str, bool]]:
    if isinstance(value, (bool, int, float, str)):
        return value
    return None if value is None else str(value)


def run_hparams(stages: Sequence[Any], facts: Mapping[str, Any]) -> Dict[str, Union[int, float, str, bool]]:
    """The hyperparameters that tell runs apart: seed, model, and each stage's epochs, batch and image
    size, optimizer, scheduler, weight decay and every group's LR (keys ``<stage>/<name>``)."""
    out: Dict[str, Union[int, float, str, bool]] = {}
    model = facts.get("model")
    if isinstance(model, Mapping):
        for key in ("name", "arch", "encoder"):
            if model.get(key) is not None:
                out[f"model/{key}"] = str(model[key])
    elif model is not None:
        out["model"] = str(model)
    if facts.get("seed") is not None:
        out["seed"] = facts["seed"]
    for stage in stages:
        for key in ("epochs", "batch_size", "image_size", "optimizer", "scheduler", "weight_decay", "trainable",
                    "accumulate", "ema"):
            value = _scalar(getattr(stage, key, None))
            if value is not None:
                out[f"{stage.name}/{key}"] = value
        lrs = stage.lr if isinstance(stage.lr, Mapping) else {"all": stage.lr}
        out.update({f"{stage.name}/lr/{group}": float(lr) for group, lr in lrs.items()})
    return out


def write_hparams(logdir: Union[str, os.PathLike], hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Put the run's hyperparameters and final metrics in TensorBoard's HParams tab (``tensorboard/hparams``),
    so runs compare side by side."""
    finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    with SummaryWriter(os.path.join(str(logdir), "hparams"), filename_suffix=f".{os.getpid()}.hparams") as writer:
        writer.add_hparams(dict(hparams), finite, name=".")


class TensorboardRunLogger(RunLogger):
    """The ``tensorboard`` logger: a :class:`StageTensorboardLogger` per stage under ``<logdir>/tensorboard``,
    and at the finish the HParams tab (``tensorboard/hparams``) with the valid and test scores."""

    def __init__(self) -> None:
        self.run: Optional[LoggerRun] = None

    @property
    def folder(self) -> Path:
        """``<logdir>/tensorboard``."""
        assert self.run is not None, "start() first"
        return Path(self.run.logdir) / "tensorboard"

    def start(self, run: LoggerRun) -> None:
        self.run = run

    def stage(self, stage: "Stage", index: int) -> StageTensorboardLogger:
        return StageTensorboardLogger(str(self.folder), stage_suffix(index))

    def finish(self, result: Mapping[str, Any]) -> None:
        scores = {f"hparam/{key}": value for key, value in final_scores(result).items()}
        write_hparams(self.folder, self.run.hparams if self.run else {}, scores)


__all__ = ["StageTensorboardLogger", "TensorboardRunLogger", "run_hparams", "stage_suffix", "write_hparams"]
