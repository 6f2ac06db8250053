"""The callbacks of one stage of a staged run, assembled from the stage and the fit's :class:`~cvkit.fit_spec.FitSpec`.

Each callback is built here with what it needs and nothing else; they share step state through
``runner.run_state`` (the NaN guard's skip flag, whether the optimizer stepped, the EMA's state),
never through references to each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from catalyst import dl
from catalyst.core.callback import Callback, CallbackOrder

from cvkit.callbacks.accumulation import (
    AccumulatingBackwardCallback,
    AccumulatingOptimizerCallback,
    AccumulationWindow,
    WindowSchedulerCallback,
)
from cvkit.callbacks.batchnorm import FreezeBatchNormCallback
from cvkit.callbacks.checkpoint import StageCheckpointCallback
from cvkit.callbacks.console import ConsoleTableCallback, progress_bars_wanted
from cvkit.callbacks.criterion import CriterionCallback
from cvkit.callbacks.early_stopping import EarlyStopping
from cvkit.callbacks.ema import EmaCallback
from cvkit.callbacks.guards import GradientGuardCallback, NaNGuardCallback
from cvkit.callbacks.history import HistoryCallback
from cvkit.callbacks.lr import LRMonitorCallback
from cvkit.callbacks.metrics import MetricsCallback
from cvkit.callbacks.mixup import MixupCallback
from cvkit.callbacks.scheduler import BatchPlateauCallback, plateau_mode
from cvkit.callbacks.state import RunState
from cvkit.fit_spec import FitSpec
from cvkit.perf import ProfileCallback
from cvkit.run_folder import LOG_FILE, resume_file, stage_checkpoints
from cvkit.stages import SmoothedLossPlateau, Stage, ema_options


def _at(callback: Callback, order: int) -> Callback:
    """``callback`` moved to ``order`` (for Catalyst callbacks whose default order is taken)."""
    callback.order = order
    return callback


def stage_callbacks(spec: FitSpec, run: RunState, stage: Stage, frozen_bn: List[str], scheduler: Any,
                    resumed_ema: Optional[Mapping[str, Any]] = None) -> Dict[str, Callback]:
    """The stage's callbacks by name, each at its own ``order`` (checked before the stage runs).

    cvkit's run at 3-5 (channels_last, profile, freeze_bn), 7 (mixup), 11-12 (criterion, metrics),
    29-32 (nan_guard, backward, gradient_guard), 41 (optimizer), 43 (ema), 51-52 (scheduler, lr_monitor) and
    101-121 (early_stopping, progress, history, checkpoint, console); Catalyst's default orders (0, 10,
    20, ..., 100) stay free for the user's callbacks. ``resumed_ema``: the EMA state a resumed stage continues.
    """
    logdir = Path(spec.logdir)
    out: Dict[str, Callback] = {"freeze_bn": FreezeBatchNormCallback(frozen_bn)}
    out["criterion"] = criterion_callback(spec, stage)
    if spec.metrics is not None:
        out["metrics"] = MetricsCallback(spec.metrics(), input_key=spec.output_key, target_key=spec.target_key)
    if stage.mixup is not None:
        out["mixup"] = MixupCallback(stage.mixup, spec.input_key, spec.target_key, f"stage {stage.name!r}: ")
    window = AccumulationWindow(stage.accumulate)
    out["nan_guard"] = NaNGuardCallback(stage.on_nan, loss_key=spec.loss_key)
    out["backward"] = AccumulatingBackwardCallback(spec.loss_key, window)
    out["gradient_guard"] = GradientGuardCallback(stage.on_nan)
    out["optimizer"] = AccumulatingOptimizerCallback(spec.loss_key, window)
    if stage.ema is not None:
        out["ema"] = EmaCallback(ema_options(stage.ema), (spec.valid_loader,), resumed_ema)
    if isinstance(scheduler, SmoothedLossPlateau):
        out["scheduler"] = BatchPlateauCallback(spec.loss_key)
    elif scheduler is not None:
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        loader, metric = monitor(spec, stage)
        out["scheduler"] = _at(WindowSchedulerCallback(
            window, mode=stage.interval, **(dict(loader_key=loader, metric_key=metric) if plateau else {})
        ), CallbackOrder.Scheduler + 1)
    out["lr_monitor"] = LRMonitorCallback()
    if stage.early_stopping:
        es = stage.early_stopping
        metric = es.get("metric", spec.valid_metric)
        out["early_stopping"] = EarlyStopping(
            patience=es["patience"],
            loader_key=es.get("loader", spec.valid_loader),
            metric_key=metric,
            minimize=es.get("minimize", plateau_mode(metric, spec.minimize, spec.loss_key) == "min"),
            min_delta=es.get("min_delta", 1e-6),
        )
    if spec.verbose:
        out["console"] = ConsoleTableCallback(spec.valid_loader, spec.valid_metric)
        if progress_bars_wanted():
            out["progress"] = _at(dl.TqdmCallback(), CallbackOrder.External + 2)
    out["history"] = HistoryCallback(logdir / LOG_FILE)
    out["checkpoint"] = StageCheckpointCallback(stage_checkpoints(logdir, stage.name), resume_file(logdir),
                                                spec.valid_loader, spec.valid_metric, candidate_weights(spec, stage))
    out.update(spec.fast.callbacks(spec.input_key))
    if spec.profile and run.stage_index == 0:
        out["profile"] = ProfileCallback(logdir)
    for i, callback in enumerate(spec.callbacks(stage) if spec.callbacks else ()):
        out[f"extra_{i}_{type(callback).__name__}"] = callback
    return out


def raw_loader_key(valid_loader: str) -> str:
    """The loader key of the raw weights' validation beside the EMA: ``<valid>_raw`` (``log.csv``'s ``valid_raw/*``)."""
    return f"{valid_loader}_raw"


def raw_loader(spec: FitSpec, stage: Stage) -> Optional[str]:
    """:func:`raw_loader_key` when ``stage`` keeps an EMA validated both ways, else None; that loader is the
    valid loader run again, with the raw weights."""
    if stage.ema is not None and ema_options(stage.ema)["validate"] == "both":
        return raw_loader_key(spec.valid_loader)
    return None


def candidate_weights(spec: FitSpec, stage: Stage) -> Dict[str, str]:
    """The weights an epoch of ``stage`` may keep, each with the loader that validates it: the raw
    weights, the EMA, or both when the EMA stage validates both (the better one is kept)."""
    if stage.ema is None:
        return {"raw": spec.valid_loader}
    raw = raw_loader(spec, stage)
    return {"ema": spec.valid_loader, **({"raw": raw} if raw else {})}


def monitor(spec: FitSpec, stage: Stage) -> Tuple[str, str]:
    """``(loader, metric)`` the stage's plateau scheduler watches: the train loss for
    ``plateau_batch``, else ``stage.monitor`` or the run's valid metric."""
    if stage.scheduler == "plateau_batch":
        return "train", spec.loss_key
    return stage.monitor or (spec.valid_loader, spec.valid_metric)


def criterion_callback(spec: FitSpec, stage: Stage) -> Callback:
    """The stage's loss callback: Catalyst's criterion, or the loss-range one when the stage sets ``loss_range``."""
    keys = dict(input_key=spec.output_key, target_key=spec.target_key, metric_key=spec.loss_key)
    if stage.loss_range is None:
        return CriterionCallback(**keys)
    from cvkit.callbacks.loss_range import LossRangeCallback

    options = stage.loss_range if isinstance(stage.loss_range, Mapping) else {"band": tuple(stage.loss_range)}
    return LossRangeCallback(**keys, logdir=Path(spec.logdir) / "loss_range" / stage.name, **options)


__all__ = ["candidate_weights", "criterion_callback", "monitor", "raw_loader", "raw_loader_key", "stage_callbacks"]
