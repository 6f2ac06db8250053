"""cvkit's default transfer recipe as one call: the new head on cached features, then everything.

It is the recipe ``examples/configs/classification_demo.yaml`` and ``examples/stl10_train.py`` spell
out, measured in bench/transfer.py against a linear probe and fastai's ``fine_tune`` with the same
ImageNet weights and data (bench/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from torch import nn

from cvkit.runners import Loaders, LoaderFactory, StagedRunner
from cvkit.stages import Stage

_STAGE_KEYS = {f.name for f in dataclasses.fields(Stage)} - {"name", "epochs", "trainable", "lr", "layer_decay",
                                                              "scheduler", "init"}
BACKBONE_LR_FACTOR = 0.3  # the top backbone level's LR in the unfreeze stage, times base_lr
LAYER_DECAY = 0.8  # each backbone level further down: times this
HEAD_PATIENCE = 4  # head-stage epochs without a lower valid loss before it ends


def fine_tune(
    model: nn.Module,
    loaders: Union[Loaders, LoaderFactory],
    criterion: nn.Module,
    epochs: int,
    base_lr: float = 1e-3,
    freeze_epochs: int = 40,
    logdir: Union[str, Path] = "runs/fine_tune",
    **fit_options: Any,
) -> StagedRunner:
    """Two stages and the runner that ran them.

    ``freeze`` (at most ``freeze_epochs`` epochs, skipped when 0): only the head trains (AdamW at
    ``base_lr``), on the frozen backbone's features cached for two augmented copies of the train set
    (``cache_features=2``; pass ``cache_features=None`` for a model whose head cannot be split off,
    such as a ViT's class token), until the valid loss has not fallen for 4 epochs (the loss, not the
    valid metric: on a few valid images accuracy moves in steps and ties); its last epoch is handed
    on. ``unfreeze`` (``epochs`` epochs): everything trains with a fresh AdamW (weight decay
    0.01), the head at ``base_lr``, the backbone's top level at ``0.3 * base_lr`` and each level below
    at 0.8 times the one above, BatchNorm statistics frozen (``train_bn=False``: a few hundred images
    move them away from what the backbone learnt), cosine to zero.
    ``fit_options`` that are :class:`Stage` fields (``ema``, ``mixup``, ``accumulate``, ``optimizer``,
    ``weight_decay``, ``train_bn``, ``early_stopping``, ``batch_size``...) override these choices in both
    stages, except ``cache_features`` (the freeze stage's); the rest go to :meth:`StagedRunner.fit`
    (``metrics``, ``valid_metric``, ``engine``, ``seed``...).
    """
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
        raise ValueError(f"fine_tune: base_lr must be a positive number, got {base_lr!r}")
    if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, int) or freeze_epochs < 0:
        raise ValueError(f"fine_tune: freeze_epochs must be an int >= 0, got {freeze_epochs!r}")
    stage_options, run_options = _split(fit_options)
    cache = stage_options.pop("cache_features", 2)
    stages = []
    if freeze_epochs:
        head = {"early_stopping": {"patience": HEAD_PATIENCE, "metric": "loss"}, **stage_options}
        stages.append(Stage("freeze", freeze_epochs, trainable="head", lr=base_lr,
                            cache_features=cache, **head))
    tune = {"train_bn": False, "weight_decay": 0.01, **stage_options}
    stages.append(Stage(
        "unfreeze", epochs, trainable="all", lr={"head": base_lr, "backbone": BACKBONE_LR_FACTOR * base_lr},
        layer_decay=LAYER_DECAY, scheduler="cosine", init="last" if freeze_epochs else "current", **tune,
    ))
    return StagedRunner().fit(model, stages, loaders, criterion, logdir, **run_options)


def _split(options: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    stage = {k: v for k, v in options.items() if k in _STAGE_KEYS}
    return stage, {k: v for k, v in options.items() if k not in _STAGE_KEYS}


__all__ = ["fine_tune"]
