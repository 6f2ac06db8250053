"""Catalyst callbacks cvkit adds, one concern per module, all importable from here.

batchnorm (frozen BN stays in eval), criterion (the loss, keys declared), metrics (cvkit metrics
per loader), lr (LR/momentum of every named group), scheduler (plateau direction, per-batch
plateau), guards (NaN/inf loss and gradient), early_stopping, history (``log.csv``), checkpoint
(last/best/resume), loss_range (learn from a band of per-sample losses), worst (worst
predictions to TensorBoard), tensorboard (event files of every stage kept), state (the
``RunState`` shared by a StagedRunner and its callbacks) and checks (distinct orders; every key
read is written first), accumulation (gradient accumulation windows), ema (moving average of the
weights), mixup (timm Mixup/CutMix of train batches) and console (one table row per epoch).
``cvkit.stage_callbacks`` builds a stage's list.
"""
from cvkit.callbacks.accumulation import (
    AccumulatingBackwardCallback,
    AccumulatingOptimizerCallback,
    AccumulationWindow,
    WindowSchedulerCallback,
)
from cvkit.callbacks.batchnorm import FreezeBatchNormCallback
from cvkit.callbacks.checkpoint import StageCheckpointCallback, link_or_copy
from cvkit.callbacks.checks import check_callbacks, check_keys, check_orders
from cvkit.callbacks.console import ConsoleTableCallback, progress_bars_wanted
from cvkit.callbacks.criterion import CriterionCallback
from cvkit.callbacks.early_stopping import EarlyStopping
from cvkit.callbacks.ema import EmaCallback
from cvkit.callbacks.guards import (
    GradientGuardCallback,
    GuardedBackwardCallback,
    GuardedOptimizerCallback,
    NaNGuardCallback,
    NonFiniteLossError,
)
from cvkit.callbacks.history import HistoryCallback, write_csv
from cvkit.callbacks.loss_range import LossRangeCallback, rank_masks
from cvkit.callbacks.lr import LRMonitorCallback
from cvkit.callbacks.metrics import MetricsCallback
from cvkit.callbacks.mixup import MixupCallback, mix_batch
from cvkit.callbacks.scheduler import BatchPlateauCallback, plateau_mode
from cvkit.callbacks.state import RunState
from cvkit.callbacks.tensorboard import StageTensorboardLogger, stage_suffix
from cvkit.callbacks.worst import WorstPredictionsCallback
from cvkit.data.draw import draw_keypoints, draw_label, to_uint8

__all__ = [
    "ConsoleTableCallback",
    "progress_bars_wanted",
    "AccumulatingBackwardCallback",
    "AccumulatingOptimizerCallback",
    "AccumulationWindow",
    "BatchPlateauCallback",
    "CriterionCallback",
    "EarlyStopping",
    "EmaCallback",
    "FreezeBatchNormCallback",
    "GradientGuardCallback",
    "GuardedBackwardCallback",
    "GuardedOptimizerCallback",
    "HistoryCallback",
    "LRMonitorCallback",
    "LossRangeCallback",
    "MetricsCallback",
    "MixupCallback",
    "NaNGuardCallback",
    "NonFiniteLossError",
    "RunState",
    "StageCheckpointCallback",
    "StageTensorboardLogger",
    "WindowSchedulerCallback",
    "WorstPredictionsCallback",
    "check_callbacks",
    "check_keys",
    "check_orders",
    "draw_keypoints",
    "draw_label",
    "link_or_copy",
    "mix_batch",
    "plateau_mode",
    "rank_masks",
    "stage_suffix",
    "to_uint8",
    "write_csv",
]
