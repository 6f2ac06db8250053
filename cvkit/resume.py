"""The resume payload of a staged run: what ``checkpoints/resume.pth`` and every ``last.pth``/``best.pth`` hold,
how it is written after an epoch and read back to continue a killed run.

A payload holds plain tensors and numbers: counters, history, the best epoch, the optimizer and
scheduler, and the weights side by side (timm's checkpoint layout): ``model`` the raw weights training
continues from, ``model_ema`` the moving average when the stage keeps one (``ema`` its update count),
and ``weights`` which of the two the epoch kept (``"ema"`` or ``"raw"``). Readers of a checkpoint's
weights (:func:`cvkit.io.state_dict_of`) take the kept ones.

Older run folders swapped the payloads instead: with ``weights: "ema"`` their ``model`` holds the EMA,
``train_model`` the raw weights and ``ema`` the average with its weights; :func:`train_weights` and
:func:`ema_state` read both layouts.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Union

import torch

from cvkit.callbacks.state import RunState
from cvkit.io import CheckpointError, load_checkpoint, state_dict_of
from cvkit.run_folder import LAST_FILE, resume_file, stage_checkpoints

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner
    from torch import nn

    from cvkit.stages import Stage

FORMAT = "cvkit-resume-1"


def resume_payload(runner: "IRunner", stage_names: Sequence[str], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """Everything needed to continue after the epoch that just ended (plain data only).

    ``model`` holds the raw weights, ``model_ema`` the EMA's (``run_state.ema_state``, None without
    one); the checkpoint callback records in ``weights`` which ones the epoch kept. ``extra``: the
    loggers' own state (an MLflow run id...).
    """
    run: RunState = runner.run_state
    model = runner.engine.unwrap_model(runner.model)
    ema = run.ema_state
    return {
        "format": FORMAT,
        "stage": run.stage_name,
        "metrics": {k: dict(v) for k, v in runner.epoch_metrics.items()},
        "stages": list(stage_names),
        "stage_index": run.stage_index,
        "stage_start_epoch": run.stage_start_epoch,
        "epoch": int(runner.epoch_step),
        "stage_finished": bool(runner.need_early_stop or runner.epoch_step >= runner.num_epochs),
        "stopped_early": bool(runner.need_early_stop),
        "schedule": run.stage.schedule_settings(),
        "batch_step": int(runner.batch_step),
        "sample_step": int(runner.sample_step),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_ema": ema["weights"] if ema is not None else None,
        "ema": {"updates": int(ema["updates"])} if ema is not None else None,
        **extra,
        "optimizer": runner.optimizer.state_dict(),
        "scheduler": runner.scheduler.state_dict() if runner.scheduler is not None else None,
        "early_stopping": run.early_stopping,
        "stage_best": {"best_score": run.stage_best_score, "best_epoch": run.stage_best_epoch},
        "run_best": dict(run.best),
        "history": list(run.history),
    }


def train_weights(state: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The raw weights a resumed stage trains on from (``train_model`` in the old swapped layout)."""
    return state.get("train_model") or state["model"]


def ema_state(state: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The EMA's ``{"weights", "updates"}`` to continue from, in either layout; None without an EMA."""
    if state.get("model_ema") is not None:
        return {"weights": state["model_ema"], "updates": int(state["ema"]["updates"])}
    return state.get("ema")


def load_state(model: "nn.Module", state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Weights this run wrote (``path``), or one line saying they belong to another model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} holds weights of another model than {type(model).__name__} (architecture "
                         f"or sizes changed since the run started): {' '.join(str(exc).split())[:200]}") from None


def load_stage_start(model: "nn.Module", stage: "Stage", previous: Optional[Path]) -> None:
    """The weights ``stage`` starts from: the previous stage's ``best``/``last`` checkpoint (the weights it
    kept), a file, or the model as it is (``current`` as the first stage)."""
    if stage.init == "current" and previous is None:
        return
    if stage.init in ("best", "last", "current"):
        path = previous / f"{'last' if stage.init == 'current' else stage.init}.pth"
    else:
        path = Path(stage.init)
    load_state(model, state_dict_of(load_checkpoint(path), path), path)


def read_resume(logdir: Path, stage_names: Sequence[str], resume: Union[bool, str, Path]) -> Optional[Dict[str, Any]]:
    """The state to continue from: ``resume.pth``, else (deleted or cut off) the newest intact
    ``checkpoints/<stage>/last.pth`` (the same payload); None when no epoch ever finished."""
    if resume is True:
        path = resume_file(logdir)
        state = _try_read(path)
        if state is None:
            state = newest_last(logdir, stage_names)
        if state is None:
            if path.exists():
                raise CheckpointError(f"cannot resume {logdir}: {path} and every checkpoints/<stage>/last.pth "
                                      "are missing or unreadable; start the run again in a new logdir")
            warnings.warn(f"{logdir}: no epoch of this run finished; starting from the beginning", stacklevel=3)
            return None
    else:
        path = Path(resume)
        state = load_checkpoint(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cvkit resume file (format {state.get('format')!r})")
    names = list(stage_names)
    if state["stages"] != names:
        raise ValueError(f"{path} was written by a run with stages {state['stages']}, not {names}")
    return state


def resume_point(logdir: Union[str, Path], stages: Sequence["Stage"]) -> Optional[Dict[str, Any]]:
    """``{"stage", "epoch"}``: the last completed epoch ``fit(resume=True)`` continues ``logdir`` from,
    or None when no epoch finished (errors as ``fit``'s, its warnings left to it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = read_resume(Path(logdir), [s.name for s in stages], True)
    return None if state is None else {"stage": state["stage"], "epoch": int(state["epoch"])}


def _try_read(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        warnings.warn(f"{exc}; looking for the newest intact last.pth instead", stacklevel=4)
        return None


def newest_last(logdir: Path, stage_names: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The latest-epoch resume payload among the stages' ``last.pth`` files, if any is intact."""
    best: Optional[Dict[str, Any]] = None
    for name in stage_names:
        state = _try_read(stage_checkpoints(logdir, name) / LAST_FILE)
        if state is not None and state.get("format") == FORMAT and (best is None or state["epoch"] > best["epoch"]):
            best = state
    return best


def has_more_epochs(state: Mapping[str, Any], stage: "Stage") -> bool:
    """Whether a stage that had run all its epochs when ``state`` was saved has more now (``--resume-changed``)."""
    return not state.get("stopped_early", True) and int(state["epoch"]) - int(state["stage_start_epoch"]) < stage.epochs


def restore_run(run: RunState, state: Mapping[str, Any], stages: Sequence["Stage"]) -> int:
    """Put the saved history, best epoch and counters into ``run``; return the index of the stage to run first."""
    run.history, run.best = list(state["history"]), dict(state["run_best"])
    finished = state["stage_finished"] and not has_more_epochs(state, stages[state["stage_index"]])
    run.stage_start_epoch = state["epoch"] if finished else state["stage_start_epoch"]
    run.batch_offset, run.sample_offset = state["batch_step"], state["sample_step"]
    return state["stage_index"] + (1 if finished else 0)


def sync_run(run: RunState, logdir: Path) -> int:
    """Take counters, history and best from the last ``resume.pth``; return its global epoch.

    Under DDP a stage runs in spawned processes whose runner state never comes back; reading what
    rank 0 wrote keeps the parent right (and is a no-op otherwise).
    """
    state = load_checkpoint(resume_file(logdir))
    run.history[:] = state["history"]
    run.best = dict(state["run_best"])
    run.stage_start_epoch = int(state["epoch"])
    run.batch_offset, run.sample_offset = int(state["batch_step"]), int(state["sample_step"])
    return run.stage_start_epoch


def restore_schedule(state: Mapping[str, Any], stage: "Stage", optimizer: torch.optim.Optimizer, scheduler: Any,
                     steps_per_epoch: int) -> None:
    """Continue the interrupted stage's optimizer and scheduler from the resume ``state``.

    Unchanged settings (or a resume file that does not record them): both as saved. Changed
    :data:`~cvkit.stages.SCHEDULE_KEYS`: the saved optimizer's moments (when the optimizer kind is the
    same) under the new settings' hyperparameters and LRs, and the new scheduler stepped through the
    optimizer steps (epochs, for a per-epoch one) the stage already ran, so the LRs from here on are
    those an uninterrupted run with the new settings has; a plateau scheduler starts afresh at the new LRs.
    """
    saved = state.get("schedule")
    if saved is None or saved == stage.schedule_settings():
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        return
    if saved["optimizer"] == stage.optimizer:
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])  # the moments (torch checks the groups' sizes)
        for group, settings in zip(optimizer.param_groups, fresh):
            group.update(settings)  # the new settings' values, the new scheduler's included
    if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return
    done = min(int(state["epoch"]) - int(state["stage_start_epoch"]), stage.epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(done * (steps_per_epoch if stage.interval == "batch" else 1)):
            scheduler.step()


__all__ = ["FORMAT", "ema_state", "has_more_epochs", "load_stage_start", "load_state", "newest_last", "read_resume", "restore_run", "restore_schedule",
           "resume_payload", "resume_point", "sync_run", "train_weights"]
