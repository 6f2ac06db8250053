"""The :class:`Task` contract: everything that differs between classification, class + box,
keypoints and segmentation, in one object per task.

A task builds its datasets from a data spec (the YAML ``data:`` mapping, or the command's
dataset options, which are generated from the same :class:`DataOption` list), knows its default
model, criterion, metric and output layout (:mod:`cvkit.layouts`: how its raw model
output is split, activated, de-augmented, averaged and compared at export), turns a model's
de-augmented output into a prediction in original image coordinates, writes the submission rows,
and draws a worst prediction. Nothing
outside ``cvkit/tasks/`` branches on a task's name: it asks the task object.

A new task is one class registered with :func:`register_task`; see ARCHITECTURE.md.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from cvkit.errors import ConfigError
from cvkit.registry import Registry
from cvkit.layouts import ClassesLayout, OutputLayout, get_layout

PathLike = Union[str, os.PathLike]
Row = Dict[str, Any]

# How train is split into train and valid: a seeded valid_fraction, or fold ``fold`` of ``folds``.
SPLIT_KEYS = frozenset({"valid_fraction", "seed", "limit", "skip_bad_rows", "folds", "fold", "group_col"})
COMMON_DATA_KEYS = SPLIT_KEYS | {"kind", "train", "valid", "test"}
DEMO_DATA_KEYS = SPLIT_KEYS | {"kind", "root", "per_class"}


@dataclass(frozen=True)
class DataOption:
    """One dataset option: a ``data:`` key in YAML and a ``--dashed-name`` on the command line.

    ``kind`` is ``str``, ``int``, ``columns`` (comma-separated on the command line, a list in YAML),
    ``flag`` (a boolean switch) or ``choice`` (one of ``choices``).
    """

    key: str
    help: str
    default: Any = None
    kind: str = "str"
    choices: Tuple[str, ...] = ()

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Declare this option on an argparse parser."""
        flag = "--" + self.key.replace("_", "-")
        if self.kind == "flag":
            parser.add_argument(flag, dest=self.key, action="store_true", help=self.help)
            return
        kwargs: Dict[str, Any] = {"dest": self.key, "help": self.help, "default": self.default}
        if self.kind == "int":
            kwargs["type"] = int
        elif self.kind == "choice":
            kwargs["choices"] = self.choices
        elif self.kind == "columns":
            kwargs["default"] = ",".join(self.default) if isinstance(self.default, (list, tuple)) else self.default
        parser.add_argument(flag, **kwargs)

    def from_args(self, args: argparse.Namespace) -> Any:
        """The option's value from parsed arguments, in its YAML form (a list for ``columns``)."""
        value = getattr(args, self.key, self.default)
        if self.kind == "columns" and isinstance(value, str):
            parts = [c.strip() for c in value.split(",") if c.strip()]
            return parts[0] if len(parts) == 1 else parts
        return value


COMMON_OPTIONS = (
    DataOption("root", "folder the CSV's image paths are relative to (default: the CSV's folder)"),
    DataOption("path_col", "column holding the image path", default="path"),
)
CLASS_OPTIONS = (
    DataOption("label_col", "column holding the class label", default="label"),
    DataOption("class_map", "JSON {label name: index}; default: the sorted labels of the CSV"),
)


class Task:
    """Base class of every task; subclasses set the class attributes and override the hooks."""

    name: ClassVar[str] = ""
    model: ClassVar[str] = "classifier"
    criterion: ClassVar[str] = "cross_entropy"
    metric: ClassVar[str] = "classification"
    valid_metric: ClassVar[str] = "accuracy"
    layout: ClassVar[OutputLayout] = ClassesLayout()
    options: ClassVar[Tuple[DataOption, ...]] = COMMON_OPTIONS
    data_kinds: ClassVar[Tuple[str, ...]] = ("csv", "demo")
    has_classes: ClassVar[bool] = False
    label_targets: ClassVar[bool] = False
    submission_columns: ClassVar[Tuple[str, ...]] = ("path",)
    tuning_file: ClassVar[Optional[str]] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that still sets the former ``tta_target`` / ``tta_activation`` strings gets the
        registered layout of that name (a FutureWarning says to set ``layout``)."""
        super().__init_subclass__(**kwargs)
        old = {k: cls.__dict__[k] for k in ("tta_target", "tta_activation") if k in cls.__dict__}
        if old and "layout" not in cls.__dict__:
            import warnings

            warnings.warn(f"{cls.__name__}: {' and '.join(old)} are now layout = an OutputLayout instance "
                          "(cvkit.layouts)", FutureWarning, stacklevel=2)
            cls.layout = get_layout(old.get("tta_target") or cls.layout, old.get("tta_activation"))

    @property
    def tta_target(self) -> str:
        """The former name of ``layout.name`` (a FutureWarning)."""
        import warnings

        warnings.warn("Task.tta_target is now Task.layout (its name: layout.name)", FutureWarning, stacklevel=2)
        return self.layout.name

    # --- data ----------------------------------------------------------------------------------

    def data_keys(self, kind: str) -> frozenset:
        """The keys a ``data:`` mapping of ``kind`` may hold for this task."""
        if kind == "demo":
            return DEMO_DATA_KEYS
        return COMMON_DATA_KEYS | {o.key for o in self.options}

    def dataset(self, table: Any, spec: Mapping[str, Any], class_map: Any = None, transform: Any = None) -> Any:
        """The dataset of one split: ``table`` (a CSV path or DataFrame) read with ``spec``'s options."""
        raise NotImplementedError(f"task {self.name!r} does not read tables")

    def table_rows(self, table: Any, spec: Mapping[str, Any], class_map: Any = None) -> Any:
        """The rows :meth:`dataset` would read, as a torch-free :class:`~cvkit.data.rows.TableRows`
        (what ``cvkit check`` scans). The default is the dataset itself, which is such rows too
        when it is a :class:`~cvkit.data.datasets.TableDataset`; the built-in tasks build the
        torch-free rows class of their dataset with the same options."""
        return self.dataset(table, spec, class_map)

    def datasets(self, spec: Dict[str, Any], demo_root: Path) -> Dict[str, Any]:
        """``{"train", "valid"?, "test"?}`` from a ``data:`` spec (kinds ``csv`` and ``demo``)."""
        if spec["kind"] == "demo":
            root = Path(spec.pop("root")) if spec.get("root") else demo_root
            spec.update(self.demo(root, int(spec.get("seed", 0)), spec.get("per_class")))
        if not spec.get("train"):
            raise ConfigError(f"data.train is required for kind {spec['kind']!r}: the training table")
        out = {"train": self.dataset(spec["train"], spec, spec.get("class_map"))}
        class_map = getattr(out["train"], "class_map", None)
        for split in ("valid", "test"):
            if spec.get(split):
                out[split] = self.dataset(spec[split], spec, class_map)
        return out

    def spec_from_args(self, args: argparse.Namespace) -> Dict[str, Any]:
        """This task's ``data:`` options as the command's flags give them."""
        return {o.key: o.from_args(args) for o in self.options}

    def dataset_from_args(self, args: argparse.Namespace, transform: Any = None) -> Any:
        """The dataset the command's ``DATA`` argument and this task's options describe."""
        spec = self.spec_from_args(args)
        return self.dataset(Path(args.data), spec, spec.get("class_map"), transform)

    def table_rows_from_args(self, args: argparse.Namespace) -> Any:
        """:meth:`table_rows` of the command's ``DATA`` argument and options (``cvkit check``, without torch)."""
        spec = self.spec_from_args(args)
        return self.table_rows(Path(args.data), spec, spec.get("class_map"))

    def demo(self, root: Path, seed: int, per_class: Optional[int]) -> Dict[str, Any]:
        """Build (once) the task's demo set under ``root``; returns the ``data:`` keys that read it."""
        raise NotImplementedError(f"task {self.name!r} has no demo data")

    def wrap(self, dataset: Any) -> Any:
        """The dataset as the model and criterion see it (the default: unchanged)."""
        return dataset

    def classes(self, dataset: Any) -> List[str]:
        """Class names in index order (empty for tasks without classes)."""
        class_map = getattr(dataset, "class_map", None)
        if class_map:
            return [name for name, _ in sorted(class_map.items(), key=lambda kv: kv[1])]
        return [str(c) for c in (getattr(dataset, "class_names", ()) or ())]

    def labels(self, dataset: Any) -> Optional[np.ndarray]:
        """Per-item labels to stratify a split by, or None."""
        return None

    def target_columns(self, dataset: Any, index: int, classes: Sequence[str]) -> Row:
        """The true target of item ``index`` as submission-like columns (out-of-fold tables), or {}."""
        return {}

    # --- model, criterion, metrics ---------------------------------------------------------------

    def model_sizes(self, train: Any, classes: Sequence[str]) -> Dict[str, int]:
        """The model spec's sizes the data determines (``num_classes``, ``num_keypoints``...)."""
        return {"num_classes": len(classes)} if classes else {}

    def check_model(self, spec: Mapping[str, Any], train: Any, classes: Sequence[str]) -> None:
        """Refuse a model spec whose sizes contradict the data (one line naming the key)."""
        for key, value in self.model_sizes(train, classes).items():
            given = spec.get(key)
            if given is not None and given != value:
                raise ConfigError(f"model.{key}: {given!r} does not match the data, which has {value} "
                                  f"({key.replace('num_', '')}); leave it out or set {value}")

    def metric_kwargs(self, model_spec: Mapping[str, Any], image_size: Optional[int]) -> Dict[str, Any]:
        """Keyword arguments of the task's registered metric."""
        return {"num_classes": int(model_spec["num_classes"])}

    def adapt_criterion(self, criterion: Any, model_spec: Mapping[str, Any]) -> Any:
        """The criterion as it meets this task's model output (the default: unchanged)."""
        return criterion

    # --- prediction ------------------------------------------------------------------------------

    def tta_kwargs(self, classes: Sequence[str]) -> Dict[str, Any]:
        """Extra keyword arguments of :func:`cvkit.inference.tta.tta_predict` for this task (sizes its
        :attr:`layout` checks the output against)."""
        return {}

    def decode(self, output: Any, height: int, width: int, classes: Sequence[str]) -> Dict[str, Any]:
        """One image's de-augmented output as a prediction in pixels of the original image."""
        raise NotImplementedError

    def rows(self, name: str, prediction: Mapping[str, Any], classes: Sequence[str], probs: bool = False,
             threshold: float = 0.5, tuning: Any = None) -> List[Row]:
        """The submission rows of one image (``tuning``: what :meth:`tune` chose, applied when given)."""
        raise NotImplementedError

    def tune(self, predicted: Iterable[Tuple[Any, Any]]) -> Any:
        """Post-processing chosen on held-out data after training (an object with ``to_json()``,
        ``before`` and ``after`` scores, saved as :attr:`tuning_file`), or None when the task has none.

        ``predicted``: ``(Prediction, dataset)`` pairs, each image of a held-out dataset predicted at its
        original size (:func:`cvkit.inference.predict.predict_splits`): one run's valid split, or every
        fold's model on the rows it did not train on (out-of-fold). Called only when :attr:`tuning_file` is set.
        """
        return None

    def load_tuning(self, folder: PathLike) -> Any:
        """The run folder's saved post-processing (:attr:`tuning_file`), or None."""
        return None

    def read_submission(self, frame: Any, classes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        """A submission table read back: ``{name: prediction}`` in :meth:`decode`'s form (for checks)."""
        raise NotImplementedError

    def example_output(self, classes: Sequence[str], generator: Any) -> Any:
        """One image's de-augmented output of a plausible model (a tensor; the registry tests use it)."""
        raise NotImplementedError

    # --- inspection ------------------------------------------------------------------------------

    def draw(self, image: np.ndarray, output: Any, target: Any) -> np.ndarray:
        """A worst-prediction picture: ``image`` (RGB uint8) with the output and target drawn on it."""
        from cvkit.data.draw import draw_label

        return draw_label(image, output, target)

    def features(self, model: Any) -> Optional[Callable[[Any], Any]]:
        """The embedding used to rank outliers (None: the model's own ``forward_features``/pooling)."""
        return None


TASKS: Registry[Task] = Registry("task")
ALIASES = {"boxes": "class_box"}


def register_task(cls: Optional[type] = None, *, override: bool = False) -> Any:
    """Class decorator: register one instance of a :class:`Task` subclass under its ``name``."""

    def add(task_cls: type) -> type:
        if not task_cls.name:
            raise ValueError(f"{task_cls.__name__} needs a class attribute name")
        TASKS.register(task_cls(), name=task_cls.name, override=override)
        return task_cls

    return add(cls) if cls is not None else add


def get_task(task: Union[str, Task]) -> Task:
    """The registered task of that name (``boxes`` still means ``class_box``, with a FutureWarning)."""
    if isinstance(task, Task):
        return task
    if task in ALIASES:
        import warnings

        warnings.warn(f"task name {task!r} is now {ALIASES[task]!r}", FutureWarning, stacklevel=2)
        task = ALIASES[task]
    return TASKS.get(task)


def list_tasks(pattern: str = "*") -> List[str]:
    """Registered task names."""
    return TASKS.list(pattern)


__all__ = ["CLASS_OPTIONS", "COMMON_OPTIONS", "DataOption", "TASKS", "Task", "get_task", "list_tasks", "register_task"]
