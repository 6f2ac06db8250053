"""``FitSpec``: everything one :meth:`cvkit.runners.StagedRunner.fit` call was given, as one object.

``fit`` checks its arguments and builds the spec once; the runner's steps (stages, callbacks, the
finish) and :mod:`cvkit.stage_callbacks` read it instead of a dozen threaded arguments. The checks
of a fit's stages and loaders and what ``config.json`` records of a fit (:func:`run_config`) live here too.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from cvkit.perf import FastPaths

if TYPE_CHECKING:
    from catalyst.core.callback import Callback
    from catalyst.core.engine import Engine
    from torch import nn
    from torch.utils.data import DataLoader

    from cvkit.metrics import Metric
    from cvkit.stages import Stage

Loaders = Mapping[str, "DataLoader"]
LoaderFactory = Callable[["Stage"], Loaders]
MetricsFactory = Callable[[], Iterable["Metric"]]
CallbackFactory = Callable[["Stage"], Iterable["Callback"]]


@dataclass
class FitSpec:
    """One fit's inputs (see ``StagedRunner.fit`` for each), with the batch keys of its runner.

    ``minimize`` is the resolved direction of ``valid_metric``; ``engine`` the Catalyst engine once
    the run folder is held; ``loggers`` the checked logger specs (``[{"name": ..., **options}]``).
    """

    model: "nn.Module"
    stages: List["Stage"]
    loaders: Union[Loaders, LoaderFactory]
    criterion: "nn.Module"
    logdir: Path
    metrics: Optional[MetricsFactory] = None
    callbacks: Optional[CallbackFactory] = None
    valid_loader: str = "valid"
    valid_metric: str = "loss"
    minimize: bool = True
    engine: Union[None, str, "Engine"] = None
    seed: int = 42
    verbose: bool = True
    config: Optional[Dict[str, Any]] = None
    test_loader: Optional["DataLoader"] = None
    resume: Union[None, bool, str, Path] = None
    fast: FastPaths = field(default_factory=FastPaths)
    profile: bool = False
    loggers: List[Dict[str, Any]] = field(default_factory=list)
    postprocess: Optional[Callable[["nn.Module"], Dict[str, Any]]] = None
    input_key: str = "features"
    output_key: str = "logits"
    target_key: str = "targets"
    loss_key: str = "loss"

    def stage_loaders(self, stage: "Stage") -> Loaders:
        """The loaders of ``stage`` (from the factory when ``loaders`` is one)."""
        return self.loaders(stage) if callable(self.loaders) else self.loaders


def check_stages(model: "nn.Module", stages: List["Stage"]) -> None:
    """Refuse a fit's stages before anything runs: none, repeated names, a ``trainable`` or ``lr`` the model
    has no group for (one line naming the stage); the first stage's ``init`` best/last means its current weights."""
    from cvkit.models.groups import resolve_lr, trainable_param_names

    if not stages:
        raise ValueError("fit() needs at least one Stage")
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"stage names must be unique; repeated: {dupes}")
    for stage in stages:
        try:
            params = trainable_param_names(model, stage.trainable)
        except KeyError as exc:
            raise KeyError(f"stage {stage.name!r}: trainable={stage.trainable!r}: {exc.args[0]}") from None
        try:
            resolve_lr(model, params, stage.lr, stage.layer_decay)
        except KeyError as exc:
            raise KeyError(f"stage {stage.name!r}: lr={stage.lr!r}: {exc.args[0]}") from None
    if stages[0].init in ("best", "last"):
        stages[0].init = "current"


def check_loaders(stage: "Stage", loaders: Loaders, valid_loader: str) -> None:
    """A stage's loaders: names Catalyst accepts, a train loader and the valid loader (one line naming the stage)."""
    for key in loaders:
        if not key.startswith(("train", "valid", "infer")):
            raise ValueError(f"stage {stage.name!r}: loader name {key!r} must start with 'train', 'valid' or 'infer'")
    if not any(k.startswith("train") for k in loaders):
        raise ValueError(f"stage {stage.name!r}: no train loader among {list(loaders)}")
    if valid_loader not in loaders:
        raise ValueError(f"stage {stage.name!r}: valid loader {valid_loader!r} missing; loaders are {list(loaders)}")


def run_config(spec: FitSpec) -> Dict[str, Any]:
    """What ``config.json`` records of a fit: stages, model, criterion, loaders, the valid metric, engine, seed,
    speed switches, loggers, versions, the backbone's starting weights, then ``spec.config`` on top."""
    import catalyst
    import timm
    import torch

    from cvkit._version import __version__

    config: Dict[str, Any] = {
        "stages": [s.to_dict() for s in spec.stages],
        "model": type(spec.model).__name__,
        "criterion": repr(spec.criterion),
        "loaders": getattr(spec.loaders, "__name__", None) or sorted(spec.loaders),
        "valid": {"loader": spec.valid_loader, "metric": spec.valid_metric, "minimize": spec.minimize},
        "engine": type(spec.engine).__name__,
        "seed": spec.seed,
        "fast_paths": spec.fast.to_dict(),
        "profile": spec.profile,
        "loggers": [s["name"] if len(s) == 1 else dict(s) for s in spec.loggers],
        "versions": {
            "cvkit": __version__,
            "torch": torch.__version__,
            "catalyst": catalyst.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    weights = [m.cvkit_weights for m in spec.model.modules() if isinstance(getattr(m, "cvkit_weights", None), dict)]
    if weights:
        config["pretrained_weights"] = weights[0]  # the file the backbone started from, with its sha256
    config.update(spec.config or {})
    return config


__all__ = ["CallbackFactory", "FitSpec", "LoaderFactory", "Loaders", "MetricsFactory", "check_loaders", "check_stages",
           "run_config"]
