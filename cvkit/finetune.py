"""fastai's ``fine_tune`` recipe as one call: train the head, then everything with discriminative LRs."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from torch import nn

from cvkit.models.groups import head_param_names, layer_ids
from cvkit.runners import Loaders, LoaderFactory, StagedRunner
from cvkit.stages import Stage

_STAGE_KEYS = {f.name for f in dataclasses.fields(Stage)} - {"name", "epochs", "trainable", "lr", "layer_decay",
                                                              "scheduler", "init"}


def discriminative_decay(model: nn.Module, low: float, high: float) -> float:
    """``layer_decay`` that spreads the backbone's LRs geometrically from ``high`` (the level just
    below the head) down to ``low`` (the first level), as fastai's ``slice(low, high)``."""
    heads = head_param_names(model)
    levels = len({level for name, level in layer_ids(model).items() if name not in heads})
    return 1.0 if levels < 2 else (low / high) ** (1.0 / (levels - 1))


def fine_tune(
    model: nn.Module,
    loaders: Union[Loaders, LoaderFactory],
    criterion: nn.Module,
    epochs: int,
    base_lr: float = 2e-3,
    freeze_epochs: int = 1,
    logdir: Union[str, Path] = "runs/fine_tune",
    **fit_options: Any,
) -> StagedRunner:
    """Two one-cycle stages and the runner that ran them.

    ``freeze`` (``freeze_epochs`` epochs, skipped when 0): only the head trains, at ``base_lr``.
    ``unfreeze`` (``epochs`` epochs): everything trains from the weights the first stage ended with,
    under one-cycle, with a fresh optimizer and LRs from ``base_lr / 100`` (first level) to
    ``base_lr / 2`` (the head and the level below it), spaced geometrically by depth.
    ``fit_options`` that are :class:`Stage` fields (``ema``, ``mixup``, ``accumulate``, ``optimizer``,
    ``weight_decay``, ``frozen_bn``, ``batch_size``...) go to both stages, except ``cache_features``
    (the frozen stage only); the rest to
    :meth:`StagedRunner.fit` (``metrics``, ``valid_metric``, ``engine``, ``seed``...).
    """
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
        raise ValueError(f"fine_tune: base_lr must be a positive number, got {base_lr!r}")
    if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, int) or freeze_epochs < 0:
        raise ValueError(f"fine_tune: freeze_epochs must be an int >= 0, got {freeze_epochs!r}")
    stage_options, run_options = _split(fit_options)
    cache = stage_options.pop("cache_features", None)
    stages = []
    if freeze_epochs:
        stages.append(Stage("freeze", freeze_epochs, trainable="head", lr=base_lr, scheduler="onecycle",
                            cache_features=cache, **stage_options))
    high = base_lr / 2
    stages.append(Stage(
        "unfreeze", epochs, trainable="all", lr={"head": high, "backbone": high},
        layer_decay=discriminative_decay(model, base_lr / 100, high), scheduler="onecycle",
        init="last" if freeze_epochs else "current", **stage_options,
    ))
    return StagedRunner().fit(model, stages, loaders, criterion, logdir, **run_options)


def _split(options: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    stage = {k: v for k, v in options.items() if k in _STAGE_KEYS}
    return stage, {k: v for k, v in options.items() if k not in _STAGE_KEYS}


__all__ = ["discriminative_decay", "fine_tune"]
