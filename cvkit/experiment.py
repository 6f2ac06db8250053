"""Turn a resolved YAML experiment (:func:`cvkit.config.load_config`) into a staged run.

:func:`build` makes the model, datasets, per-stage loaders, criterion and metrics;
:func:`run` checks the data and trains with :class:`~cvkit.runners.StagedRunner`. Every default
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
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvkit.config import ConfigError, load_config, stages_from
from cvkit.registry import register_version
from cvkit.stages import Stage

PathLike = Union[str, Path]

TASK_MODELS = {"classification": "classifier", "class_box": "class_box", "keypoints": "keypoints",
               "segmentation": "segmentation"}
TASK_CRITERIA = {"classification": "cross_entropy", "class_box": "class_box", "keypoints": "keypoint",
                 "segmentation": "dice_bce"}
TASK_METRICS = {"classification": "classification", "class_box": "box", "keypoints": "keypoint",
                "segmentation": "segmentation"}
VALID_METRICS = {"classification": "accuracy", "class_box": "box_iou", "keypoints": "nme", "segmentation": "dice"}
MINIMIZED = ("loss", "error", "error_px", "nme")
# Facts StagedRunner writes into config.json next to the experiment; not experiment keys.
RUNNER_KEYS = ("loaders", "valid", "fast_paths", "versions", "started")
DATA_KEYS = {
    "demo": {"kind", "root", "seed", "per_class", "valid_fraction", "limit", "skip_bad_rows"},
    "csv": {"kind", "train", "valid", "test", "root", "path_col", "label_col", "class_map", "box_cols",
            "box_format", "keypoint_cols", "num_keypoints", "mask_col", "mask_root", "num_classes", "rle",
            "valid_fraction", "seed", "limit", "skip_bad_rows"},
    "folders": {"kind", "train", "valid", "test", "class_map", "valid_fraction", "seed", "limit", "skip_bad_rows"},
    "stl10": {"kind", "root", "valid_fraction", "seed", "limit", "skip_bad_rows"},
}
AUGMENTATION_KEYS = {"preset", "size", "normalize"}
DEMO_SEGMENTATION_CLASSES = 4
CLASSES_FILE = "classes.json"


# --- named versions ----------------------------------------------------------------------------

@register_version("model")
def v1() -> Dict[str, Any]:
    """Localisation project, first model: ResNet-34 with a class head and a box head."""
    return {"name": "class_box", "arch": "resnet34", "dropout": 0.2}


@register_version("model")
def v2() -> Dict[str, Any]:
    """Localisation project, second model: EfficientNet-B0 class + box, more dropout."""
    return {"name": "class_box", "arch": "efficientnet_b0", "dropout": 0.3}


@register_version("model")
def tiny_v1() -> Dict[str, Any]:
    """timm's ``test_resnet`` classifier: seconds per epoch on a CPU, for smoke runs."""
    return {"name": "classifier", "arch": "test_resnet"}


@register_version("augmentation")
def light_v1() -> Dict[str, Any]:
    """Light preset (crop 0.8-1, flip, brightness/contrast) at 224 px."""
    return {"preset": "light", "size": 224}


@register_version("augmentation")
def medium_v1() -> Dict[str, Any]:
    """Medium preset (crop, flip, affine, colour, blur) at 224 px."""
    return {"preset": "medium", "size": 224}


@register_version("criterion")
def class_box_v1() -> Dict[str, Any]:
    """Localisation loss: cross-entropy plus 5 x SmoothL1 on the box."""
    return {"name": "class_box", "box_weight": 5.0}


# --- loading -----------------------------------------------------------------------------------

def load_experiment(path: PathLike, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a YAML experiment or a run's ``config.json``, apply ``key=value`` overrides, resolve.

    A run's ``config.json`` is recognised by the facts the runner adds (``versions``, ``started``),
    which are dropped; everything else is checked like a hand-written experiment.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    if "versions" in raw and "started" in raw:
        raw = {k: v for k, v in raw.items() if k not in RUNNER_KEYS}
    raw.setdefault("name", path.stem if path.name != "config.json" else path.parent.name)
    try:
        return load_config(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _near(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(where: str, spec: Mapping[str, Any], valid: set) -> None:
    for key in spec:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}{_near(key, sorted(valid))} valid: {sorted(valid)}")


def complete(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The resolved experiment with every default written out (what ``config.json`` stores).

    Does not touch data on disk; the model's ``num_classes``/``num_keypoints`` are filled in by
    :func:`build` once the data is known.
    """
    config = copy.deepcopy(dict(config))
    task = config["task"]
    config.setdefault("name", "experiment")
    config.setdefault("logdir", f"runs/{config['name']}")
    config.setdefault("seed", 42)
    config.setdefault("engine", None)
    config.setdefault("workers", 0)
    config.setdefault("profile", False)
    config.setdefault("fast", {})
    config.setdefault("weights", None)
    config.setdefault("augmentation", None)
    config.setdefault("criterion", {"name": TASK_CRITERIA[task]})
    if isinstance(config["criterion"], str):
        config["criterion"] = {"name": config["criterion"]}
    config["model"] = dict(config["model"])
    config["model"].setdefault("name", TASK_MODELS[task])
    config.setdefault("valid_metric", VALID_METRICS[task])
    config.setdefault("minimize_valid_metric", config["valid_metric"].endswith(MINIMIZED))
    data = config["data"]
    kind = data.get("kind")
    if kind not in DATA_KEYS:
        raise ConfigError(f"data.kind: unknown data kind {kind!r}{_near(str(kind), sorted(DATA_KEYS))} "
                          f"valid: {sorted(DATA_KEYS)}")
    _check_keys(f"data ({kind})", data, DATA_KEYS[kind])
    if kind in ("folders", "stl10") and task != "classification":
        raise ConfigError(f"data.kind {kind!r} holds class labels only; task {task!r} needs kind 'csv' or 'demo'")
    augmentation = config["augmentation"]
    if isinstance(augmentation, dict) and "transform" not in augmentation:
        _check_keys("augmentation", augmentation, AUGMENTATION_KEYS)
        if "preset" not in augmentation:
            raise ConfigError("augmentation: needs 'preset' (a registered preset name) and 'size', "
                              "or an albumentations serialised pipeline with a 'transform' key")
    from cvkit.perf import FastPaths

    _check_keys("fast", config["fast"], set(FastPaths().to_dict()))
    return config


# --- data --------------------------------------------------------------------------------------

def _limit(dataset: Any, limit: Optional[int]) -> Any:
    return dataset if not limit or len(dataset) <= limit else _take(dataset, range(limit))


def _take(dataset: Any, indices: Sequence[int]) -> Any:
    """The items at ``indices`` of a table dataset or an STL-10 array dataset, as the same type."""
    if hasattr(dataset, "subset"):
        return dataset.subset(list(indices))
    out = copy.copy(dataset)
    index = np.asarray(list(indices), dtype=np.int64)
    out.images = dataset.images[index]
    out.labels = None if dataset.labels is None else dataset.labels[index]
    return out


def _labels_of(dataset: Any) -> Optional[np.ndarray]:
    if hasattr(dataset, "labels") and callable(dataset.labels):
        return dataset.labels()
    labels = getattr(dataset, "labels", None)
    return np.asarray(labels) if labels is not None else None


def _split(dataset: Any, fraction: float, seed: int) -> "tuple[Any, Any]":
    """Hold out a seeded ``fraction`` of ``dataset``, stratified by label when every class has 2+ items."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ConfigError(f"data.valid_fraction must be in (0, 1), got {fraction!r}")
    labels = _labels_of(dataset)
    stratify = None
    if labels is not None and len(labels):
        _, counts = np.unique(labels, return_counts=True)
        stratify = labels if counts.min() >= 2 and len(counts) <= fraction * len(labels) else None
    train, valid = train_test_split(np.arange(len(dataset)), test_size=fraction, random_state=seed, stratify=stratify)
    return _take(dataset, sorted(train)), _take(dataset, sorted(valid))


def _table_dataset(task: str, table: PathLike, spec: Mapping[str, Any], class_map: Any = None) -> Any:
    from cvkit.data import datasets as D

    common = {"root": spec.get("root"), "path_col": spec.get("path_col", "path")}
    if task == "segmentation" and spec.get("rle"):
        if not spec.get("root"):
            raise ConfigError("data.rle needs data.root, the folder of the images named in ImageId")
        return D.SegmentationDataset.from_rle(table, spec["root"], num_classes=int(spec.get("num_classes", 1)))
    if task == "classification":
        return D.ClassificationDataset(table, label_col=spec.get("label_col", "label"), class_map=class_map, **common)
    if task == "class_box":
        return D.BoxDataset(table, label_col=spec.get("label_col", "label"), class_map=class_map,
                            box_cols=spec.get("box_cols", ("x1", "y1", "x2", "y2")),
                            box_format=spec.get("box_format", "xyxy"), **common)
    if task == "keypoints":
        if "keypoint_cols" not in spec:
            raise ConfigError("data.keypoint_cols is required for task keypoints: x0,y0,x1,y1... columns, "
                              "or one column of space-separated numbers plus data.num_keypoints")
        return D.KeypointDataset(table, keypoint_cols=spec["keypoint_cols"], num_keypoints=spec.get("num_keypoints"),
                                 **common)
    return D.SegmentationDataset(table, mask_col=spec.get("mask_col", "mask"), mask_root=spec.get("mask_root"),
                                 num_classes=int(spec.get("num_classes", 1)), **common)


def _demo_spec(task: str, root: Path, seed: int, per_class: Optional[int]) -> Dict[str, Any]:
    """Build (once) the task's demo set; a ``per_class`` other than the builder's default gets its own folder."""
    from cvkit.data import demo

    name = {"classification": "classification", "class_box": "boxes"}.get(task, task)
    folder = root / (name if per_class is None else f"{name}_{per_class}_per_class")
    kwargs = {} if per_class is None else {"per_class": int(per_class)}
    if task == "classification":
        demo.build_classification(folder, seed, **kwargs)
    elif task == "class_box":
        demo.build_boxes(folder, seed, **kwargs)
    elif task == "keypoints":
        demo.build_keypoints(folder, seed, **kwargs)
        return {"train": folder / "train.csv", "test": folder / "test.csv", "keypoint_cols": list(demo.KEYPOINT_COLS)}
    else:
        demo.build_segmentation(folder, seed, num_classes=DEMO_SEGMENTATION_CLASSES, **kwargs)
        return {"train": folder / "train.csv", "test": folder / "test.csv", "num_classes": DEMO_SEGMENTATION_CLASSES}
    return {"train": folder / "train.csv", "test": folder / "test.csv", "class_map": folder / "encode_classes.json"}


def build_datasets(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``{"train", "valid", "test"?}`` datasets of a completed experiment, without transforms yet."""
    from cvkit.data import datasets as D

    task, spec = config["task"], dict(config["data"])
    kind, seed = spec["kind"], int(spec.get("seed", config["seed"]))
    out: Dict[str, Any] = {}
    if kind == "stl10":
        from cvkit.data.stl10 import build_demo

        root = spec.get("root") or build_demo(Path(config["logdir"]).parent / "demo_data" / "stl10", seed=0)
        out["train"] = D.STL10Dataset(root, "train")
        out["test"] = D.STL10Dataset(root, "test")
    elif kind == "folders":
        if "train" not in spec:
            raise ConfigError("data.train is required for kind 'folders': a folder of class sub-folders")
        out["train"] = D.ClassificationDataset.from_folders(spec["train"], class_map=spec.get("class_map"))
        for split in ("valid", "test"):
            if spec.get(split):
                out[split] = D.ClassificationDataset.from_folders(spec[split], class_map=out["train"].class_map)
    else:
        if kind == "demo":
            root = Path(spec.pop("root")) if spec.get("root") else Path(config["logdir"]).parent / "demo_data"
            spec.update(_demo_spec(task, root, int(spec.get("seed", 0)), spec.get("per_class")))
        if "train" not in spec:
            raise ConfigError("data.train is required for kind 'csv': the training CSV")
        out["train"] = _table_dataset(task, spec["train"], spec, spec.get("class_map"))
        class_map = getattr(out["train"], "class_map", None)
        for split in ("valid", "test"):
            if spec.get(split):
                out[split] = _table_dataset(task, spec[split], spec, class_map)
    if "valid" not in out:
        out["train"], out["valid"] = _split(out["train"], float(spec.get("valid_fraction", 0.2)), seed)
    return {k: _limit(v, spec.get("limit")) for k, v in out.items()}


def class_names(dataset: Any) -> List[str]:
    """Class names in index order (empty for tasks without classes)."""
    class_map = getattr(dataset, "class_map", None)
    if class_map:
        return [name for name, _ in sorted(class_map.items(), key=lambda kv: kv[1])]
    return list(getattr(dataset, "class_names", ()) or ())


# --- augmentation ------------------------------------------------------------------------------

def _size_in(serialised: Any) -> Optional[int]:
    """The first output size named in an albumentations dict (Resize/RandomResizedCrop...)."""
    if isinstance(serialised, dict):
        for key in ("height", "size", "max_size", "min_height"):
            value = serialised.get(key)
            if isinstance(value, int):
                return value
            if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
                return value[0]
        values = serialised.values()
    elif isinstance(serialised, list):
        values = serialised
    else:
        return None
    for value in values:
        found = _size_in(value)
        if found:
            return found
    return None


def image_size(config: Mapping[str, Any], stage: Optional[Mapping[str, Any]] = None) -> Optional[int]:
    """The image size of a stage (its ``image_size``, else the augmentation's ``size``), or None."""
    if stage is not None and stage.get("image_size"):
        return int(stage["image_size"])
    augmentation = config.get("augmentation") or {}
    if "transform" in augmentation:
        return _size_in(augmentation)
    return augmentation.get("size")


def eval_transform(config: Mapping[str, Any], size: Optional[int]) -> Any:
    """The deterministic pipeline for validation, test and prediction: resize (when sized) + normalise."""
    from cvkit.data.augment import create_preset, default_transform

    normalize = (config.get("augmentation") or {}).get("normalize", "imagenet")
    return create_preset("resize", size, normalize) if size else default_transform(normalize)


def train_transform(config: Mapping[str, Any], size: Optional[int]) -> Any:
    """The training pipeline: the preset at ``size``, or the serialised albumentations pipeline as is."""
    from cvkit.data.augment import create_preset, transform_from_dict

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


class ClassBoxTargets(Dataset):
    """Items of a BoxDataset with ``targets`` = ``(5,)`` class index then xyxy box (NaN when cropped away)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = dict(self.dataset[index])
        box = item.pop("boxes") if item.pop("box_visible") > 0 else torch.full((4,), float("nan"))
        item["targets"] = torch.cat([item["targets"].float().reshape(1), box.float()])
        return item


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
    def task(self) -> str:
        return self.config["task"]

    @property
    def logdir(self) -> Path:
        return Path(self.config["logdir"])

    def wrap(self, dataset: Any) -> Any:
        """The dataset as the model and criterion see it (class + box targets merged for class_box)."""
        return ClassBoxTargets(dataset) if self.task == "class_box" else dataset

    def dataset(self, split: str, size: Optional[int] = None, train: bool = False) -> Any:
        """Split ``split`` with the train or eval pipeline at ``size``, wrapped for the task."""
        transform = train_transform(self.config, size) if train else eval_transform(self.config, size)
        return self.wrap(with_transform(self.datasets[split], transform))

    def loaders(self, stage: Stage) -> Dict[str, DataLoader]:
        """The stage's train and valid loaders at its batch and image size (train order seeded)."""
        size = image_size(self.config, {"image_size": stage.image_size})
        batch = stage.batch_size or 32
        workers = int(self.config["workers"])
        train = self.dataset("train", size, train=True)
        return {
            "train": DataLoader(train, batch, shuffle=True, drop_last=len(train) > batch, num_workers=workers,
                                generator=torch.Generator().manual_seed(int(self.config["seed"]))),
            "valid": DataLoader(self.dataset("valid", size), batch * 2, num_workers=workers),
        }

    def test_loader(self) -> Optional[DataLoader]:
        """The test split at the last stage's size, or None when the data has no test split."""
        if "test" not in self.datasets:
            return None
        size = image_size(self.config, self.config["stages"][-1])
        batch = (self.stages[-1].batch_size or 32) * 2
        return DataLoader(self.dataset("test", size), batch, num_workers=int(self.config["workers"]))

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


def _model_kwargs(task: str, spec: Dict[str, Any], datasets: Mapping[str, Any], classes: List[str]) -> None:
    train = datasets["train"]
    if task == "keypoints":
        spec.setdefault("num_keypoints", int(train.num_keypoints))
    elif task == "segmentation":
        spec.setdefault("num_classes", int(train.num_classes))
    elif classes:
        spec.setdefault("num_classes", len(classes))


def _metrics(config: Mapping[str, Any]) -> Callable[[], List[Any]]:
    """A factory of the task's registered metric (:data:`TASK_METRICS`), sized from the model spec."""
    from cvkit.metrics import create_metric

    task, spec = config["task"], config["model"]
    if task == "keypoints":
        kwargs: Dict[str, Any] = {"image_size": image_size(config, config["stages"][-1]) or 1}
    else:
        kwargs = {"num_classes": int(spec["num_classes"])}
    name = TASK_METRICS[task]
    create_metric(name, **kwargs)
    return lambda: [create_metric(name, **kwargs)]


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """The task model of a completed experiment whose ``model`` holds every size it needs."""
    from cvkit.models.tasks import create_task_model

    spec = dict(config["model"])
    name = spec.pop("name")
    try:
        return create_task_model(name, **spec)
    except TypeError as exc:
        raise ConfigError(f"model: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"model: {exc.args[0]}") from None


def build_criterion(config: Mapping[str, Any]) -> nn.Module:
    """The criterion of a completed experiment, adapted to the task model's output."""
    from cvkit.losses import ClassBoxCriterion, create_criterion

    spec = dict(config["criterion"])
    if "name" not in spec:
        raise ConfigError(f"criterion: needs 'name'; got {spec}")
    try:
        criterion = create_criterion(spec.pop("name"), **spec)
    except TypeError as exc:
        raise ConfigError(f"criterion: {exc}") from None
    except KeyError as exc:
        raise ConfigError(f"criterion: {exc.args[0]}") from None
    if config["task"] == "class_box":
        criterion = ClassBoxCriterion(int(config["model"]["num_classes"]), loss=criterion)
    return criterion


def load_weights(model: nn.Module, weights: PathLike) -> None:
    """Start from another run's weights: a checkpoint file or a run folder (its ``best.pth``)."""
    from cvkit.io import load_checkpoint, state_dict_of

    path = Path(weights)
    if path.is_dir():
        path = path / "best.pth"
    if not path.is_file():
        raise ConfigError(f"weights: {path} not found; expected a checkpoint file or a run folder with best.pth")
    try:
        model.load_state_dict(state_dict_of(load_checkpoint(path), path))
    except RuntimeError as exc:
        raise ConfigError(f"weights: {path} does not fit model {model.__class__.__name__}: "
                          f"{' '.join(str(exc).split())[:300]}") from None


def build(config: Mapping[str, Any]) -> Experiment:
    """Model, datasets, stages, criterion and metrics of a resolved experiment (nothing trains)."""
    config = complete(config)
    datasets = build_datasets(config)
    classes = class_names(datasets["train"])
    _model_kwargs(config["task"], config["model"], datasets, classes)
    model = build_model(config)
    if config["weights"]:
        load_weights(model, config["weights"])
    return Experiment(config, model, datasets, stages_from(config), build_criterion(config),
                      _metrics(config), classes)


def run(config: Mapping[str, Any], resume: bool = False, verbose: bool = True) -> Dict[str, Any]:
    """Build, check the data, train every stage; returns what ``metrics.json`` holds.

    ``config.json`` in the logdir is the completed experiment (plus the runner's facts) and
    re-runs as it is; ``classes.json`` keeps the class names for :mod:`cvkit.inference.predict`.
    """
    from cvkit.io import atomic_write_json
    from cvkit.perf import FastPaths
    from cvkit.runners import StagedRunner

    experiment = build(config)
    experiment.prepare()
    full = experiment.config
    if experiment.classes:
        atomic_write_json(experiment.logdir / CLASSES_FILE, experiment.classes)
    runner = StagedRunner().fit(
        experiment.model, experiment.stages, experiment.loaders, experiment.criterion, experiment.logdir,
        metrics=experiment.metrics, valid_metric=full["valid_metric"],
        minimize_valid_metric=full["minimize_valid_metric"], engine=full["engine"], seed=int(full["seed"]),
        verbose=verbose, config=json.loads(json.dumps(full)), test_loader=experiment.test_loader(),
        resume=resume or None, fast=FastPaths(**full["fast"]), profile=bool(full["profile"]),
    )
    return runner.final_metrics


__all__ = ["Experiment", "build", "build_datasets", "build_model", "build_criterion", "class_names", "complete",
           "eval_transform", "image_size", "load_experiment", "load_weights", "run", "train_transform"]
