"""Prediction from Python first: a model and images in, predictions in original image coordinates out.

- :func:`predict` / :func:`iter_predict`: any model, a folder / CSV / list of files / list of RGB
  arrays / dataset, a task, optional TTA; one :class:`Prediction` per image (the de-augmented
  output at network size plus the original size; :meth:`Prediction.decode` maps it back).
- :func:`write_submission`: the task's submission table (:meth:`cvkit.tasks.Task.rows`), written
  atomically; it streams, so large masks never pile up in memory.
- :func:`load_run` / :func:`predict_run`: the same from a run folder (its ``config.json``,
  ``best.pth`` and ``classes.json``); ``cvkit predict`` is a thin wrapper on :func:`predict_run`.

Predictions run in eval mode without shuffling, so the same inputs give the same file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvkit.tasks import Task, get_task

PathLike = Union[str, os.PathLike]
Images = Union[PathLike, Sequence[PathLike], Sequence[np.ndarray], Dataset]
FlipPairs = Optional[Sequence[Tuple[int, int]]]


@dataclass
class Prediction:
    """One image's prediction: the de-augmented output at network size and the original size."""

    name: str
    index: int
    output: torch.Tensor
    height: int
    width: int

    def decode(self, task: Union[str, Task], classes: Sequence[str] = ()) -> Dict[str, Any]:
        """The prediction in pixels of the original image, in the task's form (label/probs, box, points, mask)."""
        return get_task(task).decode(self.output, self.height, self.width, classes)


class ImageFiles(Dataset):
    """Image files or in-memory RGB arrays through a pipeline; items keep the original ``(height, width)``."""

    def __init__(self, images: Sequence[Union[Path, np.ndarray]], names: Sequence[str], transform: Any) -> None:
        from cvkit.data.augment import with_targets

        self.images, self.names, self.transform = list(images), list(names), with_targets(transform)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from cvkit.data.datasets import pipeline_input

        source = self.images[index]
        if isinstance(source, np.ndarray):
            data, size = {"image": source}, source.shape[:2]
        else:  # decoded as the datasets decode it (reduced where the pipeline allows)
            data, size = pipeline_input(source, self.transform)
        out = self.transform(**data)["image"]
        return {"features": out.float(), "index": index, "size": torch.tensor(size)}


def list_images(images: PathLike, root: Optional[PathLike] = None, path_col: str = "path") -> Tuple[List[Path], List[str]]:
    """``(files, names as written in the output)`` from a folder (recursive, sorted) or a CSV column.

    A folder's files that are not images (by :data:`~cvkit.data.datasets.IMAGE_EXTENSIONS`, the one
    list every reader uses) are left out with a warning naming them.
    """
    from cvkit.data.tables import IMAGE_EXTENSIONS, list_image_files, load_table, require_columns
    from cvkit.data.io import DataError

    source = Path(images)
    if source.is_dir():
        files, skipped = list_image_files(source, recursive=True)
        if not files:
            raise DataError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
        if skipped:
            import warnings

            names = [p.relative_to(source).as_posix() for p in skipped]
            warnings.warn(f"{source}: skipped {len(skipped)} file(s) that are not images: {names[:5]}"
                          f"{' ...' if len(names) > 5 else ''}", stacklevel=2)
        return files, [p.relative_to(source).as_posix() for p in files]
    if not source.is_file():
        raise DataError(f"images not found: {source} is neither a folder nor a CSV")
    frame, name, default_root = load_table(source)
    require_columns(frame, [path_col], name)
    if frame.empty:
        raise DataError(f"{name}: no rows; expected one image path per row in column {path_col!r}")
    base = Path(root) if root is not None else default_root
    names = [str(p) for p in frame[path_col]]
    return [base / n for n in names], names


def _dataset(images: Images, transform: Any, root: Optional[PathLike], path_col: str) -> Tuple[Dataset, List[str]]:
    """A dataset of ``images`` and the name of each item."""
    if isinstance(images, Dataset):
        names = [str(images.path(i).name) if hasattr(images, "path") else str(i) for i in range(len(images))]
        return images, names
    if transform is None:
        raise ValueError("predict needs transform= (or image_size=) to prepare image files or arrays")
    if isinstance(images, (str, os.PathLike)):
        files, names = list_images(images, root, path_col)
        return ImageFiles(files, names, transform), names
    items = list(images)
    names = [f"{i}" if isinstance(x, np.ndarray) else Path(x).name for i, x in enumerate(items)]
    return ImageFiles([x if isinstance(x, np.ndarray) else Path(x) for x in items], names, transform), names


def check_flip_pairs(task: Task, tta: Sequence[str], flip_pairs: FlipPairs) -> None:
    """A mirroring TTA on keypoints needs the pairs that trade places; refuse to guess."""
    from cvkit.inference.tta import create_tta

    if task.tta_target != "keypoints" or flip_pairs is not None:
        return
    mirrors = [t for t in tta if create_tta(t).swaps_pairs]
    if mirrors:
        raise ValueError(f"TTA {mirrors} mirrors the image, so keypoints such as left/right eye trade "
                         "places: pass flip_pairs (CLI: --flip-pairs 0-1,2-3), or an empty list if none do")


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible on this machine; use cpu or auto")
    return device


@torch.no_grad()
def iter_predict(
    model: Union[nn.Module, Sequence[nn.Module]],
    images: Images,
    task: Union[str, Task],
    tta: Sequence[str] = (),
    batch_size: int = 32,
    device: str = "auto",
    transform: Any = None,
    image_size: Optional[int] = None,
    classes: Sequence[str] = (),
    flip_pairs: FlipPairs = None,
    root: Optional[PathLike] = None,
    path_col: str = "path",
    workers: int = 0,
    progress: bool = False,
    normalize: Any = "imagenet",
    tile: Optional[int] = None,
    overlap: int = 64,
) -> Iterator[Prediction]:
    """Yield one :class:`Prediction` per image, in input order; see :func:`predict`."""
    from cvkit.data.augment import create_preset, default_transform
    from cvkit.data.io import DataError
    from cvkit.inference.tta import tta_predict

    task = get_task(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if tile is not None:
        from cvkit.inference.tiled import check_tiling, normalize_only, tiled_predict

        check_tiling(task.tta_target, tile, overlap)
        transform = normalize_only(transform) if transform is not None else default_transform(normalize)
        image_size = None
    if transform is None:
        transform = create_preset("resize", image_size, normalize) if image_size else default_transform(normalize)
    transforms = ["identity", *[t for t in tta if t != "identity"]]
    check_flip_pairs(task, transforms, flip_pairs)
    dataset, names = _dataset(images, transform, root, path_col)
    device = _device(device)
    members = [m.to(device).eval() for m in (model if isinstance(model, (list, tuple)) else [model])]
    whole = (image_size or isinstance(images, Dataset)) and tile is None
    loader = DataLoader(dataset, batch_size if whole else 1, shuffle=False, num_workers=workers)
    batches: Iterable[Dict[str, Any]] = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="predict", unit="batch")
    kwargs = task.tta_kwargs(classes)
    for batch in batches:
        x = batch["features"].to(device)
        try:
            outs = []
            for member in members:  # an ensemble averages its members' (TTA-averaged) probabilities
                if tile is not None:
                    outs.append(torch.stack([tiled_predict(member, image, tile, overlap, transforms, batch_size,
                                                           device=device, **kwargs) for image in x]))
                else:
                    outs.append(tta_predict(member, x, transforms, target=task.tta_target,
                                            flip_pairs=flip_pairs or None, **kwargs).float().cpu())
            out = outs[0] if len(outs) == 1 else torch.stack(outs).mean(dim=0)
        except RuntimeError as exc:
            raise DataError(f"the model failed on images {[names[int(i)] for i in batch['index'][:3]]}...: "
                            f"{' '.join(str(exc).split())[:200]}") from None
        sizes = batch.get("size")
        for k, index in enumerate(batch["index"].tolist()):
            height, width = sizes[k].tolist() if sizes is not None else x.shape[-2:]
            yield Prediction(names[index], int(index), out[k], int(height), int(width))


def predict(model: Union[nn.Module, Sequence[nn.Module]], images: Images, task: Union[str, Task], **kwargs: Any) -> List[Prediction]:
    """Predict every image with ``model`` (TTA-averaged) and return one :class:`Prediction` each.

    Args:
        model: any ``nn.Module`` giving the task's output layout, or a list of them (an ensemble: their
            TTA-averaged probabilities, boxes, points or masks are averaged).
        images: a folder (searched recursively, sorted), a CSV with a ``path_col`` column (paths
            relative to ``root``, default the CSV's folder), a list of files or RGB uint8 arrays,
            or a dataset whose items hold ``features`` and ``index`` (and ``size`` to map back).
        task: a registered task name or object.
        tta: extra test-time transforms averaged with the plain prediction (``hflip``, ``vflip``...).
        transform / image_size / normalize: how files and arrays are prepared (default: resize to
            ``image_size`` and ImageNet normalisation).
        classes: class names (the class + box layout needs their number).
        flip_pairs: keypoint index pairs that trade places under a mirroring TTA (required then).
        device: ``auto`` (GPU when visible), ``cpu`` or ``cuda``.
        tile / overlap: masks only: predict each image at its own resolution in ``tile`` x ``tile``
            windows overlapping by ``overlap`` pixels, blended (:mod:`cvkit.inference.tiled`);
            ``transform``'s resize is skipped, ``batch_size`` counts windows.
    """
    return list(iter_predict(model, images, task, **kwargs))


def write_submission(predictions: Iterable[Prediction], task: Union[str, Task], classes: Sequence[str] = (),
                     out: Optional[PathLike] = None, probs: bool = False, threshold: float = 0.5,
                     tuning: Any = None) -> pd.DataFrame:
    """The task's submission table for ``predictions`` (and, with ``out``, the CSV written atomically).

    ``tuning``: post-processing chosen on validation (:meth:`cvkit.tasks.Task.tune`, a run's
    ``postprocess.json`` for masks), applied instead of the plain ``threshold`` when given.
    """
    task = get_task(task)
    rows: List[Dict[str, Any]] = []
    for p in predictions:
        rows += task.rows(p.name, p.decode(task, classes), classes, probs=probs, threshold=threshold, tuning=tuning)
    frame = pd.DataFrame(rows)
    if frame.empty:
        frame = pd.DataFrame(columns=list(task.submission_columns))
    if out is not None:
        from cvkit.io import atomic_write_bytes

        atomic_write_bytes(out, frame.to_csv(index=False).encode())
    return frame


@dataclass
class RunModel:
    """What a finished run predicts with: its completed experiment, the model with its weights, class names."""

    config: Dict[str, Any]
    model: nn.Module
    classes: List[str]
    folder: Optional[Path] = None

    @property
    def tuning(self) -> Any:
        """The run's post-processing chosen on validation (``postprocess.json``...), or None."""
        return self.task.load_tuning(self.folder) if self.folder is not None else None

    @property
    def task(self) -> Task:
        return get_task(self.config["task"])

    def transform(self, image_size: Optional[int] = None) -> Any:
        """The run's evaluation pipeline of its last stage (at ``image_size`` when given)."""
        from cvkit.experiment import eval_transform
        from cvkit.experiment import image_size as run_image_size

        last = self.config["stages"][-1]
        if image_size:
            return eval_transform(self.config, image_size)
        return eval_transform(self.config, run_image_size(self.config, last), last["name"])


def _classes_file(checkpoint: Path, config: Path) -> Optional[Path]:
    from cvkit.experiment import CLASSES_FILE

    for folder in (checkpoint.parent, config.parent):
        if (folder / CLASSES_FILE).is_file():
            return folder / CLASSES_FILE
    return None


def load_run(config: PathLike, checkpoint: Optional[PathLike] = None) -> RunModel:
    """The run's completed experiment, its model holding ``checkpoint`` (default: ``best.pth`` beside
    ``config``, or in ``checkpoint`` when that is a folder) and its class names."""
    from cvkit.config import complete, load_experiment
    from cvkit.experiment import build_model
    from cvkit.models.weights import load_weights

    config = Path(config)
    if config.is_dir():
        folds = kfold_members(config)[0]
        config = (folds[0] if folds and not (config / "config.json").is_file() else config) / "config.json"
    experiment = complete(load_experiment(config))
    checkpoint = Path(checkpoint) if checkpoint is not None else config.parent
    if checkpoint.is_dir():
        checkpoint = checkpoint / "best.pth"
    task = get_task(experiment["task"])
    classes: List[str] = []
    names = _classes_file(checkpoint, config)
    if names is not None:
        classes = [str(c) for c in json.loads(names.read_text())]
    spec = experiment["model"]
    if task.has_classes:
        given = spec.get("num_classes")
        if classes and given is not None and given != len(classes):
            raise ValueError(f"{names} names {len(classes)} classes but the model of {config} has {given} outputs; "
                             "expected one name per output")
        if classes:
            spec.setdefault("num_classes", len(classes))
        elif given is not None:
            classes = [str(i) for i in range(int(given))]
    model = build_model(experiment)
    load_weights(model, checkpoint)
    return RunModel(experiment, model, classes, config.parent)


def predict_run(
    checkpoint: Union[None, PathLike, Sequence[PathLike]],
    config: PathLike,
    images: PathLike,
    out: Optional[PathLike] = None,
    tta: Sequence[str] = (),
    probs: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    image_size: Optional[int] = None,
    root: Optional[PathLike] = None,
    path_col: str = "path",
    threshold: Optional[float] = None,
    workers: int = 0,
    progress: bool = True,
    flip_pairs: FlipPairs = None,
    tile: Optional[int] = None,
    overlap: int = 64,
    allow_missing_folds: bool = False,
) -> pd.DataFrame:
    """A run's submission for ``images``: :func:`load_run` + :func:`iter_predict` + :func:`write_submission`.

    ``checkpoint`` may be several files or a k-fold run folder: their models are averaged
    (:func:`run_checkpoints`; a k-fold folder missing a fold is refused unless ``allow_missing_folds``).
    The run's tuned post-processing (``postprocess.json``) applies unless ``threshold`` is given: a k-fold
    folder's own, tuned out-of-fold (:func:`cvkit.kfold.kfold`), else the first model's run's.
    """
    runs = [load_run(config, c) for c in run_checkpoints(checkpoint, allow_missing_folds)]
    run = runs[0]
    size = image_size or _run_size(run.config)
    predictions = iter_predict([r.model for r in runs], images, run.task, tta=tta, batch_size=batch_size, device=device,
                               transform=run.transform(image_size), image_size=size, classes=run.classes,
                               flip_pairs=flip_pairs, root=root, path_col=path_col, workers=workers,
                               progress=progress, tile=tile, overlap=overlap)
    tuning = None
    if threshold is None:
        given = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        kfold_folder = given[0] if len(given) == 1 and kfold_members(given[0])[0] else None
        tuning = (run.task.load_tuning(kfold_folder) if kfold_folder is not None else None) or run.tuning
    return write_submission(predictions, run.task, run.classes, out, probs=probs,
                            threshold=0.5 if threshold is None else threshold, tuning=tuning)


def run_checkpoints(checkpoint: Union[None, PathLike, Sequence[PathLike]],
                    allow_missing_folds: bool = False) -> List[Optional[PathLike]]:
    """The checkpoints an ensemble prediction averages: each given file or run folder, a k-fold run
    folder standing for its ``fold_*/best.pth`` (None alone: the run's own best.pth).

    A k-fold folder lacking a fold that ``cv.json`` counts (a removed ``fold_k/`` or ``fold_k/best.pth``)
    is a :class:`~cvkit.data.io.DataError` naming it, unless ``allow_missing_folds``: then the others average.
    """
    from cvkit.data.io import DataError

    given = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    out: List[Optional[PathLike]] = []
    for item in given:
        folds, missing = kfold_members(item)
        if missing and (not allow_missing_folds or not folds):
            listed = "cv.json lists" if (Path(item) / "cv.json").is_file() else "expected"
            hint = ("; restore it, or average the others (allow_missing_folds=True; CLI: --allow-missing-folds)"
                    if folds else "")
            raise DataError(f"{item}: k-fold run without {', '.join(missing)} ({listed} {len(folds) + len(missing)} "
                            f"folds){hint}")
        out += [f / "best.pth" for f in folds] if folds else [item]
    return out or [None]


def kfold_members(folder: Optional[PathLike]) -> Tuple[List[Path], List[str]]:
    """A k-fold run folder's ``fold_k`` folders holding ``best.pth``, and the folds it lacks (``fold_1``,
    ``fold_2/best.pth``): the folds are those ``cv.json`` counts, else ``fold_0`` to the highest present.
    ``([], [])`` for an ordinary run folder or a file."""
    from cvkit.data.io import DataError

    if folder is None or not Path(folder).is_dir() or (Path(folder) / "best.pth").is_file():
        return [], []
    folder = Path(folder)
    present = [int(p.name[5:]) for p in folder.glob("fold_*") if p.name[5:].isdigit() and p.is_dir()]
    count = max(present) + 1 if present else 0
    summary = folder / "cv.json"
    if summary.is_file():
        try:
            count = json.loads(summary.read_text())["folds"]
        except (ValueError, KeyError, TypeError):
            count = None
        if not isinstance(count, int) or isinstance(count, bool) or count < 2:
            raise DataError(f"{summary}: expected a JSON mapping whose 'folds' is the number of folds (>= 2)")
    folds, missing = [], []
    for k in range(count):
        fold = folder / f"fold_{k}"
        if (fold / "best.pth").is_file():
            folds.append(fold)
        else:
            missing.append(f"fold_{k}/best.pth" if fold.is_dir() else f"fold_{k}")
    return folds, missing


def _run_size(config: Dict[str, Any]) -> Optional[int]:
    from cvkit.experiment import image_size

    return image_size(config, config["stages"][-1])


__all__ = ["ImageFiles", "Prediction", "RunModel", "check_flip_pairs", "iter_predict", "kfold_members", "list_images",
           "load_run", "predict", "predict_run", "run_checkpoints", "write_submission"]
