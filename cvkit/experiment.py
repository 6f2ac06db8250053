"""Turn a resolved YAML experiment (:func:`cvkit.config.load_config`) into a staged run.

:func:`build` makes the model, datasets, per-stage loaders, criterion and metrics (what
:func:`cvkit.training.run` trains with :class:`~cvkit.runners.StagedRunner`). Every default
the experiment leaves out (seed, logdir, valid metric, the model's ``num_classes``...) is filled
in by :func:`complete`, and that complete experiment is what the run's ``config.json`` holds, so
``cvkit train runs/x/config.json`` repeats the run as it is (:func:`load_experiment` drops the
facts the runner adds: versions, start time...).

``data`` kinds (relative paths are taken from the current directory):

- ``demo``: the task's demo set from :mod:`cvkit.data.demo`, built under ``<logdir>/../demo_data``
  (``per_class`` images of each digit, ``seed``);
- ``csv``: ``train``/``valid``/``test`` CSVs plus the column options of the task's dataset class;
- ``folders``: classification from class sub-folders ``train``/``valid``/``test``;
- ``stl10``: the STL-10 binary layout at ``root`` (the demo set in that layout when absent).

Without ``valid`` a seeded (stratified where there are labels) ``valid_fraction`` of train is held
out. ``skip_bad_rows: true`` trains without the rows :func:`cvkit.data.prepare_for_training`
rejects (listed in ``logdir/skipped_rows.csv``); by default such a dataset refuses to start.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import cvkit.versions  # noqa: F401  (the named versions experiments may use)
from cvkit.config import ConfigError, complete, load_experiment, stages_from
from cvkit.data.evalspec import EvalSpec
from cvkit.data.tools import limit_items, take_items
from cvkit.stages import Stage
from cvkit.tasks import Task, get_task

PathLike = Union[str, Path]


# --- data --------------------------------------------------------------------------------------

def _split(task: Task, dataset: Any, fraction: float, seed: int) -> "tuple[Any, Any]":
    """Hold out a seeded ``fraction`` of ``dataset``, stratified by label when every class has 2+ items."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in (0, 1), got {fraction!r}")
    labels = task.labels(dataset)
    stratify = None
    if labels is not None and len(labels):
        _, counts = np.unique(labels, return_counts=True)
        stratify = labels if counts.min() >= 2 and len(counts) <= fraction * len(labels) else None
    train, valid = train_test_split(np.arange(len(dataset)), test_size=fraction, random_state=seed, stratify=stratify)
    return take_items(dataset, sorted(train)), take_items(dataset, sorted(valid))


def fold_assignment(task: Task, dataset: Any, folds: int, seed: int, group_col: Optional[str] = None) -> np.ndarray:
    """The fold (0..folds-1) of every item: a ``fold`` column of the table when it has one, else a
    seeded stratified split (grouped by ``group_col`` when given, so a group stays in one fold)."""
    import pandas as pd

    from cvkit.data.tools import add_folds

    frame = getattr(dataset, "frame", None)
    if frame is not None and "fold" in frame.columns:
        given = np.asarray(frame["fold"])
        if not np.issubdtype(given.dtype, np.integer) or given.min() < 0 or set(given) != set(range(folds)):
            raise ConfigError(f"data.folds: the table's fold column holds {sorted(set(given.tolist()))[:10]}; "
                              f"expected the integers 0..{folds - 1}, each at least once")
        return given.astype(np.int64)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2 or folds > len(dataset):
        raise ConfigError(f"data.folds: expected an integer from 2 to the {len(dataset)} training items, got {folds!r}")
    table = pd.DataFrame(index=range(len(dataset)))
    if group_col:
        if frame is None or group_col not in frame.columns:
            raise ConfigError(f"data.group_col: {group_col!r} is not a column of the training table")
        table["group"] = frame[group_col].to_numpy()
    labels = task.labels(dataset)
    stratify = not group_col and labels is not None and len(labels) and np.unique(labels, return_counts=True)[1].min() >= folds
    if stratify:
        table["label"] = labels
    split = add_folds(table, folds, label_col="label" if stratify else None,
                      group_col="group" if group_col else None, seed=seed)
    return split["fold"].to_numpy(np.int64)


def build_datasets(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"train", "valid", "test"?}`` datasets of a completed experiment, without transforms yet.

    With ``data.fold: k`` (of ``data.folds``), valid is fold ``k`` of the training data and train the
    other folds (:func:`fold_assignment`); else a seeded ``valid_fraction`` unless ``data.valid`` is given.
    """
    task, spec = get_task(config["task"]), dict(config["data"])
    seed = int(spec.get("seed", config["seed"]))
    out = task.datasets(spec, Path(config["logdir"]).parent / "demo_data")
    if spec.get("fold") is not None:
        if "valid" in out:
            raise ConfigError("data.fold: k-fold splits data.train itself; remove data.valid")
        folds, fold = spec.get("folds", 5), spec["fold"]
        if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < int(folds):
            raise ConfigError(f"data.fold: expected an integer from 0 to {int(folds) - 1}, got {fold!r}")
        train = limit_items(out["train"], spec.get("limit"))
        assignment = fold_assignment(task, train, folds, seed, spec.get("group_col"))
        out["train"] = take_items(train, np.flatnonzero(assignment != fold))
        out["valid"] = take_items(train, np.flatnonzero(assignment == fold))
        return {k: v if k in ("train", "valid") else limit_items(v, spec.get("limit")) for k, v in out.items()}
    if "valid" not in out:
        out["train"], out["valid"] = _split(task, out["train"], float(spec.get("valid_fraction", 0.2)), seed)
    return {k: limit_items(v, spec.get("limit")) for k, v in out.items()}


def class_names(dataset: Any, task: Union[str, Task] = "classification") -> List[str]:
    """Class names in index order (empty for tasks without classes)."""
    return get_task(task).classes(dataset)


# --- augmentation ------------------------------------------------------------------------------

def image_size(config: Mapping[str, Any], stage: Optional[Mapping[str, Any]] = None) -> Optional[int]:
    """The image size of a stage (its ``image_size``, else the augmentation's ``size``), or None."""
    if stage is not None and stage.get("image_size"):
        return int(stage["image_size"])
    augmentation = config.get("augmentation") or {}
    if "transform" in augmentation:
        from cvkit.data.evalspec import pipeline_size

        return pipeline_size(augmentation)
    return augmentation.get("size")


def eval_spec(config: Mapping[str, Any], size: Optional[int], stage: Optional[str] = None) -> EvalSpec:
    """The evaluation preprocessing as data: the one ``stage`` recorded in a run's config
    (:func:`cvkit.data.evalspec.recorded_eval_spec`), else a resize to ``size`` (when sized) and the
    config's ``augmentation.normalize``."""
    from cvkit.data.augment import _mean_std
    from cvkit.data.evalspec import recorded_eval_spec

    recorded = recorded_eval_spec(config, stage) if stage else None
    if recorded is not None:
        return recorded
    mean, std = _mean_std((config.get("augmentation") or {}).get("normalize", "imagenet"))
    return EvalSpec((int(size), int(size)) if size else None, tuple(mean), tuple(std))


def eval_transform(config: Mapping[str, Any], size: Optional[int], stage: Optional[str] = None) -> Any:
    """The deterministic pipeline for validation, test and prediction: resize (when sized) + normalise.

    A run's ``config.json`` records each stage's exact pipelines (``pipelines``); given ``stage``,
    the recorded one is rebuilt as it was; otherwise it is :func:`eval_spec`'s.
    """
    from cvkit.data.augment import eval_pipeline

    recorded = _recorded(config, stage, "eval")
    if recorded is not None:
        return recorded
    return eval_pipeline(eval_spec(config, size))


def _recorded(config: Mapping[str, Any], stage: Optional[str], which: str) -> Any:
    """The pipeline ``which`` (train/eval) recorded for ``stage`` in a run's config, or None."""
    from cvkit.data.augment import transform_from_dict

    recorded = (config.get("pipelines") or {}).get(stage or "") or {}
    return transform_from_dict(recorded[which]) if which in recorded else None


def pipelines(config: Mapping[str, Any], stages: Sequence[Stage]) -> Dict[str, Dict[str, Any]]:
    """Every stage's train and eval pipelines in albumentations' serialised form and its :func:`eval_spec`
    (``eval_spec``, the evaluation preprocessing as data), for ``config.json``'s ``pipelines``."""
    from cvkit.data.augment import transform_to_dict

    out = {}
    for stage in stages:
        size = image_size(config, {"image_size": stage.image_size})
        out[stage.name] = {"train": transform_to_dict(train_transform(config, size, stage.name)),
                           "eval": transform_to_dict(eval_transform(config, size, stage.name)),
                           "eval_spec": eval_spec(config, size, stage.name).to_dict()}
    return out


def train_transform(config: Mapping[str, Any], size: Optional[int], stage: Optional[str] = None) -> Any:
    """The training pipeline: the recorded one of ``stage``, the preset at ``size``, or the serialised
    albumentations pipeline as is."""
    from cvkit.data.augment import create_preset, transform_from_dict

    recorded = _recorded(config, stage, "train")
    if recorded is not None:
        return recorded
    augmentation = config.get("augmentation")
    if not augmentation:
        return eval_transform(config, size)
    if "transform" in augmentation:
        return transform_from_dict(augmentation)
    try:
        return create_preset(augmentation["preset"], size or augmentation.get("size"),
                             augmentation.get("normalize", "imagenet"))
    except KeyError as exc:
        raise ConfigError(f"augmentation.preset: {exc.args[0]}") from None


def with_transform(dataset: Any, transform: Any) -> Any:
    """A shallow copy of ``dataset`` that runs ``transform`` (the original keeps its own)."""
    from cvkit.data.augment import with_targets

    out = copy.copy(dataset)
    out.transform = with_targets(transform)
    return out


# --- the experiment ----------------------------------------------------------------------------

@dataclass
class Experiment:
    """Everything a staged run needs, built from one completed experiment dict."""

    config: Dict[str, Any]
    model: nn.Module
    datasets: Dict[str, Any]
    stages: List[Stage]
    criterion: nn.Module
    metrics: Callable[[], List[Any]]
    classes: List[str] = field(default_factory=list)

    @property
    def task(self) -> Task:
        return get_task(self.config["task"])

    @property
    def logdir(self) -> Path:
        return Path(self.config["logdir"])

    def wrap(self, dataset: Any) -> Any:
        """The dataset as the model and criterion see it (class + box targets merged for class_box)."""
        return self.task.wrap(dataset)

    def dataset(self, split: str, size: Optional[int] = None, train: bool = False, stage: Optional[str] = None) -> Any:
        """Split ``split`` with the train or eval pipeline of ``stage`` at ``size``, wrapped for the task."""
        make = train_transform if train else eval_transform
        return self.wrap(with_transform(self.datasets[split], make(self.config, size, stage)))

    def loaders(self, stage: Stage) -> Dict[str, DataLoader]:
        """The stage's train and valid loaders at its batch and image size (train order seeded)."""
        from cvkit.data.loaders import make_loader

        size = image_size(self.config, {"image_size": stage.image_size})
        batch = stage.batch_size or 32
        workers, seed = int(self.config["workers"]), int(self.config["seed"])
        sampler = None
        if stage.sampler == "balanced":
            from cvkit.data.samplers import BalancedSampler

            labels = _train_labels(self.config, self.datasets["train"], f"stage {stage.name!r}: sampler")
            sampler = BalancedSampler(labels.tolist(), generator=torch.Generator().manual_seed(seed))
        return {
            "train": make_loader(self.dataset("train", size, train=True, stage=stage.name), batch, train=True,
                                 workers=workers, seed=seed, sampler=sampler),
            "valid": make_loader(self.dataset("valid", size, stage=stage.name), batch * 2, train=False,
                                 workers=workers),
        }

    def test_loader(self) -> Optional[DataLoader]:
        """The test split at the last stage's size, or None when the data has no test split."""
        if "test" not in self.datasets:
            return None
        from cvkit.data.loaders import make_loader

        size = image_size(self.config, self.config["stages"][-1])
        batch = (self.stages[-1].batch_size or 32) * 2
        return make_loader(self.dataset("test", size, stage=self.stages[-1].name), batch, train=False,
                           workers=int(self.config["workers"]))

    def prepare(self, skip_errors: Optional[bool] = None) -> None:
        """Check train/valid/test rows (:func:`cvkit.data.prepare_for_training`) before any training."""
        from cvkit.data.check import prepare_for_training
        from cvkit.data.io import DatasetCheckError

        if skip_errors is None:
            skip_errors = bool(self.config["data"].get("skip_bad_rows", False))
        for split in list(self.datasets):
            folder = self.logdir if split == "train" else self.logdir / split
            try:
                self.datasets[split] = prepare_for_training(self.datasets[split], folder, skip_errors=skip_errors)
            except DatasetCheckError as exc:
                raise DatasetCheckError(f"{split} split: {exc} In an experiment: data.skip_bad_rows: true.",
                                        exc.report) from None


def _metrics(config: Mapping[str, Any]) -> Callable[[], List[Any]]:
    """A factory of the task's registered metric, sized from the model spec (checked once here)."""
    from cvkit.metrics import create_metric

    task = get_task(config["task"])
    kwargs = task.metric_kwargs(config["model"], image_size(config, config["stages"][-1]))
    create_metric(task.metric, **kwargs)
    return lambda: [create_metric(task.metric, **kwargs)]


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The task model of a completed experiment whose ``model`` holds every size it needs.

    ``pretrained: demo`` starts a timm backbone from the demos' label-free pretext weights
    (:func:`cvkit.data.demo.demo_pretrained`, cached under ``<logdir>/../demo_data/pretrained``).
    """
    from cvkit.io import CheckpointError
    from cvkit.models.tasks import create_task_model

    spec = dict(config["model"])
    name = spec.pop("name")
    if spec.get("pretrained") == "demo":
        from cvkit.data.demo import demo_pretrained

        if not spec.get("arch"):
            raise ConfigError("model.pretrained: 'demo' builds weights for a timm model.arch; this model has none")
        spec["pretrained"] = str(demo_pretrained(spec["arch"], Path(config["logdir"]).parent / "demo_data" / "pretrained"))
    try:
        return create_task_model(name, **spec)
    except CheckpointError as exc:
        raise ConfigError(f"model.pretrained: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"model: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"model: {exc.args[0]}") from None


def _train_labels(config: Mapping[str, Any], train: Any, what: str) -> np.ndarray:
    """The train split's class indices, for options that weigh classes (``what`` names the option)."""
    labels = get_task(config["task"]).labels(train) if train is not None else None
    if labels is None:
        raise ConfigError(f"{what}: balanced needs class labels, and task {config['task']!r} has none")
    return np.asarray(labels)


def build_criterion(config: Mapping[str, Any], train: Any = None) -> nn.Module:
    """The criterion of a completed experiment, adapted to the task model's output.

    ``weight: balanced`` (class weights by inverse frequency) is computed from the ``train`` split.
    """
    from cvkit.losses import balanced_class_weights, create_criterion

    spec = dict(config["criterion"])
    if "name" not in spec:
        raise ConfigError(f"criterion: needs 'name'; got {spec}")
    if spec.get("weight") == "balanced":
        labels = _train_labels(config, train, "criterion.weight")
        spec["weight"] = balanced_class_weights(labels, int(config["model"]["num_classes"]))
    num_classes = config["model"].get("num_classes")
    for key in ("weight", "pos_weight"):
        given = spec.get(key)
        if isinstance(given, (list, tuple)) and num_classes is not None and len(given) != num_classes:
            raise ConfigError(f"criterion.{key}: {len(given)} values; expected {num_classes}, one per class "
                              f"of the model (model.num_classes)")
    try:
        criterion = create_criterion(spec.pop("name"), **spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"criterion: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"criterion: {exc.args[0]}") from None
    return get_task(config["task"]).adapt_criterion(criterion, config["model"])


def load_weights(model: nn.Module, weights: PathLike) -> None:
    """Start from another run's weights (:func:`cvkit.models.weights.load_weights`), errors as ``weights:``."""
    from cvkit.io import CheckpointError
    from cvkit.models.weights import load_weights as load

    try:
        load(model, weights)
    except CheckpointError as exc:
        raise ConfigError(f"weights: {exc}") from None


def build(config: Mapping[str, Any], datasets: Optional[Dict[str, Any]] = None) -> Experiment:
    """Model, datasets, stages, criterion and metrics of a resolved experiment (nothing trains).

    The model is initialised under ``torch.manual_seed(seed)``, so one seed gives one run.
    ``datasets`` (``{"train", "valid", "test"?}``) replaces the ones the data spec describes (k-fold).
    """
    config = complete(config)
    task = get_task(config["task"])
    datasets = dict(datasets) if datasets is not None else build_datasets(config)
    classes = task.classes(datasets["train"])
    task.check_model(config["model"], datasets["train"], classes)
    for key, value in task.model_sizes(datasets["train"], classes).items():
        config["model"].setdefault(key, value)
    torch.manual_seed(int(config["seed"]))
    model = build_model(config)
    if config["weights"]:
        load_weights(model, config["weights"])
    return Experiment(config, model, datasets, stages_from(config), build_criterion(config, datasets["train"]),
                      _metrics(config), classes)


__all__ = ["Experiment", "build", "build_datasets", "build_model", "build_criterion", "class_names", "complete",
           "eval_transform", "image_size", "load_experiment", "load_weights", "pipelines",
           "train_transform"]
