"""A training stage: what is trainable, with which BatchNorm policy, LRs, optimizer and schedule.

Stages are plain data (a dataclass), checked when built, so a typo fails before any training.
Optimizers and schedulers come from small registries users extend with a decorator.
"""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from cvkit.registry import Registry, RegistryError

LRSpec = Union[float, Dict[str, float]]

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULERS: Registry[Callable[..., Any]] = Registry("scheduler")


def register_optimizer(
    fn: Optional[Callable[..., torch.optim.Optimizer]] = None, *, name: str = "", override: bool = False
) -> Any:
    """Decorator: ``fn(param_groups, **kwargs) -> Optimizer`` becomes usable as ``Stage(optimizer=name)``.

    ``name`` defaults to the function's name; a taken name raises
    :class:`cvkit.registry.RegistryError` unless ``override=True``. Works bare or with arguments.
    """

    def wrap(factory: Callable[..., torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
        return OPTIMIZERS.register(factory, name=name, override=override)

    return wrap(fn) if fn is not None else wrap


def register_scheduler(
    interval: str, *, name: str = "", override: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(optimizer, stage, steps_per_epoch, **kwargs)`` becomes a scheduler kind.

    ``interval`` ("epoch" or "batch") is the default stepping of that kind, kept as the entry's
    ``interval`` metadata. ``name`` defaults to the function's name; a taken name raises
    :class:`cvkit.registry.RegistryError` unless ``override=True``.
    """
    if interval not in ("epoch", "batch"):
        raise ValueError(f"interval must be 'epoch' or 'batch', got {interval!r}")

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        return SCHEDULERS.register(fn, name=name, override=override, interval=interval)

    return wrap


def list_optimizers(pattern: str = "*") -> List[str]:
    """Registered optimizer names matching a shell-style ``pattern``."""
    return OPTIMIZERS.list(pattern)


def create_optimizer(name: str, groups: List[dict], **kwargs: Any) -> torch.optim.Optimizer:
    """A registered optimizer over parameter ``groups``; unknown names list the close ones."""
    return OPTIMIZERS.get(name)(groups, **kwargs)


def list_schedulers(pattern: str = "*") -> List[str]:
    """Registered scheduler names matching a shell-style ``pattern``."""
    return SCHEDULERS.list(pattern)


@register_optimizer
def sgd(groups: List[dict], momentum: float = 0.9, nesterov: bool = False, **kwargs: Any) -> torch.optim.Optimizer:
    """SGD with momentum (0.9 by default)."""
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=nesterov, **kwargs)


@register_optimizer
def adam(groups: List[dict], **kwargs: Any) -> torch.optim.Optimizer:
    """Adam; weight decay per group as set by :func:`cvkit.models.groups.param_groups`."""
    return torch.optim.Adam(groups, lr=groups[0]["lr"], **kwargs)


@register_optimizer
def adamw(groups: List[dict], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], **kwargs)


@register_scheduler("epoch")
def plateau(optimizer: torch.optim.Optimizer, stage: "Stage", steps_per_epoch: int, minimize: bool = True, **kwargs: Any) -> Any:
    """ReduceLROnPlateau on the stage's monitored metric (default: the run's valid metric).

    ``minimize`` is the direction of that monitored metric (StagedRunner decides it with
    :func:`cvkit.callbacks.plateau_mode`), not necessarily the run's; ``mode`` overrides it.
    """
    kwargs.setdefault("mode", "min" if minimize else "max")
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)


@register_scheduler("epoch")
def step(optimizer: torch.optim.Optimizer, stage: "Stage", steps_per_epoch: int, step_size: int = 1, gamma: float = 0.1, **kwargs: Any) -> Any:
    """StepLR: multiply every group's LR by ``gamma`` every ``step_size`` steps."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma, **kwargs)


@register_scheduler("epoch")
def cosine(optimizer: torch.optim.Optimizer, stage: "Stage", steps_per_epoch: int, eta_min: float = 0.0, **kwargs: Any) -> Any:
    """Cosine annealing over the whole stage (epochs, or batches when stepped per batch)."""
    per_batch = stage.interval == "batch"
    kwargs.setdefault("T_max", stage.epochs * (steps_per_epoch if per_batch else 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, eta_min=eta_min, **kwargs)


@register_scheduler("batch")
def onecycle(optimizer: torch.optim.Optimizer, stage: "Stage", steps_per_epoch: int, **kwargs: Any) -> Any:
    """One-cycle over the stage; each group peaks at the LR the stage gave it."""
    per_batch = stage.interval == "batch"
    kwargs.setdefault("max_lr", [g["lr"] for g in optimizer.param_groups])
    kwargs.setdefault("total_steps", stage.epochs * (steps_per_epoch if per_batch else 1))
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, **kwargs)


# What a stage's optimizer hyperparameters and LR schedule are built from (steps per epoch included).
SCHEDULE_KEYS = ("lr", "layer_decay", "weight_decay", "optimizer", "optimizer_kwargs", "scheduler", "scheduler_kwargs",
                 "interval", "epochs", "batch_size", "accumulate")
_EARLY_STOPPING_KEYS = {"patience", "min_delta", "metric", "loader", "minimize"}
SAMPLERS = (None, "balanced")
_EMA_KEYS = ("decay", "min_decay", "update_after_step", "use_warmup", "warmup_gamma", "warmup_power",
             "exclude_buffers", "foreach", "validate")
_MIXUP_KEYS = ("mixup_alpha", "cutmix_alpha", "cutmix_minmax", "prob", "switch_prob", "mode", "correct_lam",
               "label_smoothing", "num_classes")


def ema_options(ema: Union[float, Mapping[str, Any]], where: str = "stage") -> Dict[str, Any]:
    """A stage's ``ema`` as ModelEmaV3 keyword arguments plus ``validate``; ValueError naming the bad key."""
    if isinstance(ema, bool) or not isinstance(ema, (int, float, Mapping)):
        raise ValueError(f"{where}: ema must be a decay in (0, 1) or a dict of ModelEmaV3 options, got {ema!r}")
    options = dict(ema) if isinstance(ema, Mapping) else {"decay": float(ema)}
    unknown = sorted(set(options) - set(_EMA_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown ema keys {unknown}; valid: {list(_EMA_KEYS)}")
    options.setdefault("decay", 0.9998)
    options.setdefault("validate", "ema")
    decay = options["decay"]
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ValueError(f"{where}: ema decay must be in (0, 1), got {decay!r}")
    if options["validate"] not in ("ema", "both"):
        raise ValueError(f"{where}: ema validate must be 'ema' or 'both', got {options['validate']!r}")
    return options


def mixup_options(mixup: Mapping[str, Any], where: str = "stage") -> Dict[str, Any]:
    """A stage's ``mixup`` dict checked against timm's ``Mixup`` (known keys, sane ranges)."""
    if not isinstance(mixup, Mapping):
        raise ValueError(f"{where}: mixup must be a dict of timm Mixup options (mixup_alpha, cutmix_alpha, ...), got {mixup!r}")
    options = dict(mixup)
    unknown = sorted(set(options) - set(_MIXUP_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown mixup keys {unknown}; valid: {list(_MIXUP_KEYS)}")
    for key in ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob", "label_smoothing"):
        value = options.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{where}: mixup {key} must be a number >= 0, got {value!r}")
    for key in ("prob", "switch_prob", "label_smoothing"):
        if options.get(key, 0.0) > 1:
            raise ValueError(f"{where}: mixup {key} must be at most 1, got {options[key]!r}")
    if options.get("mode", "batch") not in ("batch", "pair", "elem"):
        raise ValueError(f"{where}: mixup mode must be 'batch', 'pair' or 'elem', got {options['mode']!r}")
    if options.get("mixup_alpha", 1.0) == 0 and options.get("cutmix_alpha", 0.0) == 0 and options.get("cutmix_minmax") is None:
        raise ValueError(f"{where}: mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
    classes = options.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
        raise ValueError(f"{where}: mixup num_classes must be an int >= 2, got {classes!r}")
    return options


@dataclass
class Stage:
    """One stage of a staged run.

    Args:
        name: unique within the run; names the checkpoint folder.
        epochs: maximum epochs (early stopping may end sooner).
        trainable: ``"head"``, ``"all"``, or a block name (``"layer3"``, ``"blocks.5"``):
            everything from that block to the head trains, the rest is frozen.
        train_bn: BatchNorm in the trainable part trains (True) or stays frozen (eval mode, no
            grads). Frozen parts always keep their BN statistics.
        lr: one LR, or per group: ``{"head": 1e-2, "backbone": 1e-3}``, any block name as a key
            overrides the group for that block.
        layer_decay: split the backbone by depth; each level down multiplies the LR by this.
        optimizer / optimizer_kwargs: a registered optimizer (sgd, adam, adamw) and its arguments.
        weight_decay: applied to weights, not to biases and norm parameters.
        scheduler / scheduler_kwargs: a registered scheduler (plateau, step, cosine, onecycle,
            plateau_batch: plateau on the smoothed train loss, patience in optimizer steps) or None.
        interval: step the scheduler per ``"epoch"`` or per ``"batch"`` (default: the kind's own).
        monitor: ``(loader, metric)`` the plateau scheduler watches; default the run's valid metric.
        early_stopping: ``{"patience": int, "min_delta": float, "metric": str, "loader": str}``.
        batch_size / image_size: handed to the loader factory, so each stage can change them.
        init: weights that start the stage: ``"best"`` or ``"last"`` of the previous stage,
            ``"current"`` (whatever the model holds), or a checkpoint path.
        loss_range: band of per-sample loss ranks to learn from (see cvkit.callbacks.loss_range).
        on_nan: a NaN/inf loss or gradient ``"stop"``s the run with a message naming stage,
            epoch and batch, or ``"skip"``s that batch (counted as ``nan_skipped_batches``).
        ema: keep an exponential moving average of the weights (timm's ``ModelEmaV3``), updated
            after every optimizer step: a decay (``0.9998``) or a dict of ModelEmaV3 options
            (``decay``, ``use_warmup``, ``warmup_power``, ``update_after_step``, ...) plus
            ``validate``: ``"ema"`` (default: validation, best epoch and checkpoints use the
            EMA weights) or ``"both"`` (the raw weights are validated too, as loader ``<valid>_raw``).
        mixup: timm ``Mixup`` options for classification train batches (``mixup_alpha``,
            ``cutmix_alpha``, ``prob``, ``switch_prob``, ``mode``, ``label_smoothing``,
            ``num_classes``); targets become soft, so the criterion must accept probabilities.
        accumulate: optimizer step every ``accumulate`` train batches (gradient accumulation);
            the loss is divided by the window's size, per-batch schedulers count optimizer steps.
        sampler: ``"balanced"``: the loader factory draws train samples with inverse class
            frequency (:class:`cvkit.data.samplers.BalancedSampler`); None: the loader's own order.
        frozen_bn: BatchNorm layers of frozen blocks stay in eval mode (``"eval"``, statistics and
            affine parameters fixed) or keep training (``"train"``, fastai's default).
        cache_features: a head stage (``trainable="head"``) on cached features: the frozen backbone
            runs once over the train set per augmented copy (this many copies, epoch ``e`` of the
            stage trains on copy ``e mod N``) and once over the other loaders, and only the head
            trains on what it gave (:mod:`cvkit.feature_cache`). The same head weights as the slow
            path when the train transform is deterministic, in a fraction of the time.
    """

    name: str
    epochs: int
    trainable: str = "all"
    train_bn: bool = True
    lr: LRSpec = 1e-3
    layer_decay: Optional[float] = None
    optimizer: str = "adamw"
    optimizer_kwargs: Dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 0.0
    scheduler: Optional[str] = None
    scheduler_kwargs: Dict[str, Any] = field(default_factory=dict)
    interval: Optional[str] = None
    monitor: Optional[Tuple[str, str]] = None
    early_stopping: Optional[Dict[str, Any]] = None
    batch_size: Optional[int] = None
    image_size: Optional[int] = None
    init: str = "best"
    loss_range: Optional[Any] = None
    on_nan: str = "stop"
    ema: Union[None, float, Dict[str, Any]] = None
    mixup: Optional[Dict[str, Any]] = None
    accumulate: int = 1
    sampler: Optional[str] = None
    frozen_bn: str = "eval"
    cache_features: Optional[int] = None

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"stage name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ValueError(f"{where}: epochs must be an int >= 1, got {self.epochs!r}")
        if not isinstance(self.trainable, str) or not self.trainable:
            raise ValueError(f"{where}: trainable must be 'head', 'all' or a block name, got {self.trainable!r}")
        lrs = self.lr.values() if isinstance(self.lr, Mapping) else [self.lr]
        for value in lrs:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{where}: every learning rate must be a positive number, got lr={self.lr!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"{where}: layer_decay must be in (0, 1], got {self.layer_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise RegistryError(f"{where}: {OPTIMIZERS.unknown(self.optimizer)}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise RegistryError(f"{where}: {SCHEDULERS.unknown(self.scheduler)}")
        if self.interval is None and self.scheduler is not None:
            self.interval = SCHEDULERS.meta(self.scheduler)["interval"]
        if self.interval not in (None, "epoch", "batch"):
            raise ValueError(f"{where}: interval must be 'epoch' or 'batch', got {self.interval!r}")
        if self.scheduler == "plateau_batch" and self.interval != "batch":
            raise ValueError(f"{where}: plateau_batch watches the train loss every batch; use interval='batch'")
        if self.scheduler == "plateau" and self.interval == "batch":
            raise ValueError(
                f"{where}: a plateau scheduler steps on a validation metric once per epoch; "
                "use interval='epoch', or scheduler='plateau_batch' for a plateau on the smoothed train loss per batch"
            )
        if self.early_stopping is not None:
            unknown = set(self.early_stopping) - _EARLY_STOPPING_KEYS
            if unknown:
                raise KeyError(f"{where}: unknown early_stopping keys {sorted(unknown)}; valid: {sorted(_EARLY_STOPPING_KEYS)}")
            if "patience" not in self.early_stopping:
                raise KeyError(f"{where}: early_stopping needs 'patience'")
            self._check_early_stopping()
        if not isinstance(self.init, str) or (self.init not in ("best", "last", "current")
                                              and not Path(self.init).is_file()):
            raise ValueError(f"{where}: init must be 'best', 'last', 'current' or an existing checkpoint file, "
                             f"got {self.init!r}")
        if self.on_nan not in ("stop", "skip"):
            raise ValueError(f"{where}: on_nan must be 'stop' or 'skip', got {self.on_nan!r}")
        for key in ("batch_size", "image_size"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
        if self.monitor is not None:
            self.monitor = tuple(self.monitor)
            if len(self.monitor) != 2:
                raise ValueError(f"{where}: monitor must be (loader, metric), got {self.monitor!r}")

        if self.loss_range is not None:
            self._check_loss_range()
        if not isinstance(self.accumulate, int) or isinstance(self.accumulate, bool) or self.accumulate < 1:
            raise ValueError(f"{where}: accumulate must be an int >= 1 (batches per optimizer step), got {self.accumulate!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"{where}: sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.frozen_bn not in ("eval", "train"):
            raise ValueError(f"{where}: frozen_bn must be 'eval' or 'train', got {self.frozen_bn!r}")
        if self.cache_features is not None:
            self._check_cache_features()
        if self.ema is not None:
            ema_options(self.ema, where)
        if self.mixup is not None:
            mixup_options(self.mixup, where)
        self._check_builds()

    def _check_cache_features(self) -> None:
        """Cached features need a head stage whose frozen part cannot change: no mixup, frozen BN in eval mode."""
        where, copies = f"stage {self.name!r}: cache_features", self.cache_features
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"{where} must be an int >= 1 (augmented copies of the train set), got {copies!r}")
        if self.trainable != "head":
            raise ValueError(f"{where} needs trainable='head' (the backbone must be frozen), got {self.trainable!r}")
        if self.mixup is not None:
            raise ValueError(f"{where} cannot mix images it never sees again; drop mixup from this stage")
        if self.frozen_bn != "eval":
            raise ValueError(f"{where} needs frozen_bn='eval': with 'train' the frozen BatchNorm statistics move every batch")

    def _check_loss_range(self) -> None:
        """``loss_range`` is a band ``(lo, hi)`` or a dict of LossRangeCallback options; check it now."""
        from cvkit.callbacks.loss_range import LossRangeCallback

        options = self.loss_range if isinstance(self.loss_range, Mapping) else {"band": self.loss_range}
        try:
            LossRangeCallback(**options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stage {self.name!r}: loss_range={self.loss_range!r}: {exc}") from None

    def _check_early_stopping(self) -> None:
        """Types and ranges of ``early_stopping`` now, not epochs later inside Catalyst."""
        es, where = self.early_stopping, f"stage {self.name!r}: early_stopping"
        patience = es["patience"]
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"{where}.patience must be an integer >= 1 (epochs without improvement), got {patience!r}")
        delta = es.get("min_delta", 0.0)
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
            raise ValueError(f"{where}.min_delta must be a number >= 0, got {delta!r}")
        for key in ("metric", "loader"):
            if key in es and not isinstance(es[key], str):
                raise ValueError(f"{where}.{key} must be a name, got {es[key]!r}")
        if "minimize" in es and not isinstance(es["minimize"], bool):
            raise ValueError(f"{where}.minimize must be true or false, got {es['minimize']!r}")

    def _check_builds(self) -> None:
        """Build the optimizer and scheduler on a dummy parameter and step them once, so bad
        kwargs and values (a ``step_size`` of 0...) fail now, not once training has started."""
        dummy = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-3, "name": "check"}]
        try:
            optimizer = OPTIMIZERS.get(self.optimizer)(dummy, **self.optimizer_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stage {self.name!r}: bad optimizer_kwargs {self.optimizer_kwargs} for "
                             f"{self.optimizer!r}: {exc}") from None
        scheduler = self.build_scheduler(optimizer, steps_per_epoch=2, minimize=True)
        if scheduler is None:
            return
        try:
            optimizer.step()
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(1.0)
            else:
                scheduler.step()
        except (ArithmeticError, TypeError, ValueError) as exc:
            raise ValueError(f"stage {self.name!r}: scheduler {self.scheduler!r} with {self.scheduler_kwargs} "
                             f"fails when stepped: {type(exc).__name__}: {exc}") from None

    def to_dict(self) -> Dict[str, Any]:
        """Plain-data form for config.json."""
        return asdict(self)

    def schedule_settings(self) -> Dict[str, Any]:
        """The :data:`SCHEDULE_KEYS` settings (a resumed stage whose settings differ rebuilds its schedule)."""
        return {key: getattr(self, key) for key in SCHEDULE_KEYS}

    def build_optimizer(self, groups: List[dict]) -> torch.optim.Optimizer:
        """The stage's optimizer over ``groups`` (already carrying per-group ``lr``/``weight_decay``)."""
        if not groups:
            raise ValueError(f"stage {self.name!r} has no trainable parameters (trainable={self.trainable!r})")
        return OPTIMIZERS.get(self.optimizer)(groups, **self.optimizer_kwargs)

    def build_scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, minimize: bool) -> Optional[Any]:
        """The stage's scheduler, or None."""
        if self.scheduler is None:
            return None
        kwargs = dict(self.scheduler_kwargs)
        if self.scheduler in ("plateau", "plateau_batch"):
            kwargs["minimize"] = minimize
        try:
            return SCHEDULERS.get(self.scheduler)(optimizer, self, steps_per_epoch, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stage {self.name!r}: bad scheduler_kwargs for {self.scheduler!r}: {exc}") from None


class SmoothedLossPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau fed per batch with an exponential moving average of the train loss.

    The keypoints project cut the LR when the train loss stalled for 10-25% of an epoch;
    Catalyst steps plateau schedulers once per epoch only, so cvkit steps this one from
    :class:`cvkit.callbacks.BatchPlateauCallback` after every optimizer step. ``patience`` counts
    optimizer steps (batches, unless the stage accumulates gradients).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, smoothing: float = 0.9, **kwargs: Any) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        super().__init__(optimizer, **kwargs)
        self.smoothing = smoothing
        self.smoothed: Optional[float] = None

    def update(self, loss: float) -> None:
        """Fold one batch's loss into the moving average and step on it."""
        loss = float(loss)
        if not math.isfinite(loss):
            return
        self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
        self.step(self.smoothed)


@register_scheduler("batch")
def plateau_batch(optimizer: torch.optim.Optimizer, stage: "Stage", steps_per_epoch: int, minimize: bool = True, **kwargs: Any) -> Any:
    """Plateau on the smoothed train loss, checked every optimizer step; ``patience`` in optimizer steps.

    ``minimize`` is the direction of the train loss by :func:`cvkit.callbacks.plateau_mode`
    (always down); ``mode`` in the kwargs overrides it.
    """
    kwargs.setdefault("patience", max(1, steps_per_epoch // 5))
    kwargs.setdefault("mode", "min" if minimize else "max")
    return SmoothedLossPlateau(optimizer, **kwargs)
