"""Prediction from Python first: a model and images in, predictions in original image coordinates out.

- :func:`predict` / :func:`iter_predict`: any model, a folder / CSV / list of files / list of RGB
  arrays / dataset, a task, optional TTA; one :class:`Prediction` per image (the de-augmented
  output at network size plus the original size; :meth:`Prediction.decode` maps it back).
- :func:`write_submission`: the task's submission table (:meth:`cvkit.tasks.Task.rows`), written
  atomically; it streams, so large masks never pile up in memory.
- :func:`predict_splits`: held-out datasets predicted at their images' own size (for a task's tuning).

A run folder's model and :func:`~cvkit.inference.runs.predict_run` are in :mod:`cvkit.inference.runs`.

Predictions run in eval mode without shuffling, so the same inputs give the same file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cvkit.data.loaders import make_loader
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
        names = _file_names([images.path(i) for i in range(len(images))]) if hasattr(images, "path") \
            else [str(i) for i in range(len(images))]
        return images, names
    if transform is None:
        raise ValueError("predict needs transform= (or image_size=) to prepare image files or arrays")
    if isinstance(images, (str, os.PathLike)):
        files, names = list_images(images, root, path_col)
        return ImageFiles(files, names, transform), names
    items = list(images)
    files = _file_names([Path(x) for x in items if not isinstance(x, np.ndarray)])[::-1]
    names = [f"{i}" if isinstance(x, np.ndarray) else files.pop() for i, x in enumerate(items)]
    return ImageFiles([x if isinstance(x, np.ndarray) else Path(x) for x in items], names, transform), names


def _file_names(paths: Sequence[PathLike]) -> List[str]:
    """Each file's path below the folder all of them share (its name when they share one folder), so
    files of different sub-folders (``test/cat/1.jpg``, ``test/dog/1.jpg``) never share a name."""
    if not paths:
        return []
    try:
        common = os.path.commonpath([str(Path(p).parent) for p in paths])
    except ValueError:  # absolute and relative paths mixed: no shared folder
        return [Path(p).name for p in paths]
    return [Path(os.path.relpath(p, common)).as_posix() for p in paths]


def check_flip_pairs(task: Task, tta: Sequence[str], flip_pairs: FlipPairs) -> None:
    """Refuse TTA the task's output layout cannot undo with what it was given (a mirror on keypoints
    needs the pairs that trade places)."""
    from cvkit.inference.tta import create_tta

    task.layout.check_tta([create_tta(t) for t in tta], flip_pairs)


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
    from cvkit.data.augment import create_preset, default_transform, eval_pipeline
    from cvkit.data.evalspec import EvalSpec
    from cvkit.inference.tta import tta_predict

    task = get_task(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if tile is not None:
        from cvkit.inference.tiled import check_tiling, normalize_only, tiled_predict

        check_tiling(task.layout, tile, overlap)
        transform = normalize_only(transform) if transform is not None else default_transform(normalize)
        image_size = None
    elif isinstance(transform, EvalSpec):
        transform = eval_pipeline(transform)
    if transform is None:
        transform = create_preset("resize", image_size, normalize) if image_size else default_transform(normalize)
    transforms = ["identity", *[t for t in tta if t != "identity"]]
    check_flip_pairs(task, transforms, flip_pairs)
    dataset, names = _dataset(images, transform, root, path_col)
    device = _device(device)
    members = [m.to(device) for m in (model if isinstance(model, (list, tuple)) else [model])]
    whole = (image_size or isinstance(images, Dataset)) and tile is None
    loader = make_loader(dataset, batch_size if whole else 1, train=False, workers=workers)
    kwargs = task.tta_kwargs(classes)

    def forward(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for member in members:  # an ensemble averages its members' (TTA-averaged) probabilities
            if tile is not None:
                outs.append(torch.stack([tiled_predict(member, image, tile, overlap, transforms, batch_size,
                                                       device=device, layout=task.layout, **kwargs) for image in x]))
            else:
                outs.append(tta_predict(member, x, transforms, target=task.layout, flip_pairs=flip_pairs or None,
                                        **kwargs).float().cpu())
        return outs[0] if len(outs) == 1 else task.layout.average((o, 1.0) for o in outs)

    yield from prediction_loop(nn.ModuleList(members), loader, names, forward, device, progress)


def prediction_loop(model: nn.Module, loader: Iterable[Dict[str, Any]], names: Sequence[str],
                    forward: Callable[[torch.Tensor], torch.Tensor], device: str = "cpu",
                    progress: bool = False) -> Iterator[Prediction]:
    """The one prediction loop, for a checkpoint and an exported model alike: each batch's ``features``
    through ``forward`` (``model`` with TTA, an ensemble, tiles, an exported session), one
    :class:`Prediction` per item in the loader's order with its ``index`` and original ``size``
    (default: the input's); a model failure is one line naming the batch's first images."""
    from cvkit.errors import DataError
    from cvkit.inference.loop import outputs_over

    batches: Iterable[Dict[str, Any]] = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="predict", unit="batch")

    def failed(batch: Dict[str, Any], exc: RuntimeError) -> Exception:
        return DataError(f"the model failed on images {[names[int(i)] for i in batch['index'][:3]]}...: "
                         f"{' '.join(str(exc).split())[:200]}")

    for batch, out in outputs_over(model, batches, device, forward, failed=failed):
        sizes = batch.get("size")
        for k, index in enumerate(batch["index"].tolist()):
            height, width = sizes[k].tolist() if sizes is not None else batch["features"].shape[-2:]
            yield Prediction(names[index], int(index), out[k], int(height), int(width))


def predict_splits(splits: Iterable[Tuple[nn.Module, Any, Any]], task: Union[str, Task],
                   device: str = "cpu") -> Iterator[Tuple[Prediction, Any]]:
    """``(Prediction, dataset)`` for each image of held-out ``splits`` (``(model, dataset, eval transform)``
    triples; datasets without image files are skipped), predicted one at a time at the image's own size:
    what :meth:`cvkit.tasks.Task.tune` chooses its post-processing on."""
    for model, dataset, transform in splits:
        if not hasattr(dataset, "path") or not len(dataset):
            continue
        files = [dataset.path(i) for i in range(len(dataset))]
        for p in iter_predict(model, files, task, transform=transform, image_size=None, batch_size=1, device=device):
            yield p, dataset


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
        transform / image_size / normalize: how files and arrays are prepared: an albumentations
            pipeline or an :class:`~cvkit.data.evalspec.EvalSpec` (default: resize to ``image_size`` and
            ImageNet normalisation).
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


__all__ = ["ImageFiles", "Prediction", "check_flip_pairs", "iter_predict", "list_images", "predict",
           "predict_splits", "prediction_loop", "write_submission"]
