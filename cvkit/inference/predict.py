"""Batch prediction from a run's checkpoint into a competition CSV.

The model and the evaluation pipeline (resize + normalise) come from the run's experiment
(``config.json``); class names from the run's ``classes.json``. Images are a folder (searched
recursively, sorted, so the order is stable) or a CSV column. One row per image, by task:

- classification: ``path, label`` (+ ``prob_<class>`` with ``probs=True``);
- class_box: ``path, label, x1, y1, x2, y2`` with the box in pixels of the original image;
- keypoints: ``path, x0, y0, x1, y1, ...`` in pixels of the original image;
- segmentation: Severstal's layout ``ImageId, ClassId, EncodedPixels`` (one row per image and
  1-based class, empty runs for an empty mask), masks at the original size.

Predictions run in eval mode without shuffling, so the same inputs give the same file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

PathLike = Union[str, os.PathLike]
TTA_TARGET = {"classification": "logits", "class_box": "class_box", "keypoints": "keypoints", "segmentation": "mask"}


class ImageFiles(Dataset):
    """Images by path through an albumentations pipeline; items keep the original ``(height, width)``."""

    def __init__(self, paths: Sequence[Path], names: Sequence[str], transform: Any) -> None:
        self.paths, self.names, self.transform = list(paths), list(names), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from cvkit.data.io import read_image

        image = read_image(self.paths[index])
        out = self.transform(image=image)["image"]
        return {"features": out.float(), "index": index, "size": torch.tensor(image.shape[:2])}


def list_images(images: PathLike, root: Optional[PathLike] = None, path_col: str = "path") -> Tuple[List[Path], List[str]]:
    """``(files, names as written in the output)`` from a folder (recursive, sorted) or a CSV column."""
    from cvkit.data.datasets import IMAGE_EXTENSIONS, load_table, require_columns
    from cvkit.data.io import DataError

    source = Path(images)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"{source}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
        return files, [p.relative_to(source).as_posix() for p in files]
    if not source.is_file():
        raise DataError(f"images not found: {source} is neither a folder nor a CSV")
    frame, name, default_root = load_table(source)
    require_columns(frame, [path_col], name)
    base = Path(root) if root is not None else default_root
    names = [str(p) for p in frame[path_col]]
    return [base / n for n in names], names


def load_run(config: PathLike, checkpoint: PathLike) -> Tuple[Dict[str, Any], nn.Module, List[str]]:
    """The completed experiment, the model holding the checkpoint's weights, and the class names."""
    from cvkit.experiment import CLASSES_FILE, build_model, complete, load_experiment
    from cvkit.io import load_checkpoint, state_dict_of

    experiment = complete(load_experiment(config))
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "best.pth"
    classes: List[str] = []
    for folder in (checkpoint.parent, Path(config).parent):
        if (folder / CLASSES_FILE).is_file():
            classes = [str(c) for c in json.loads((folder / CLASSES_FILE).read_text())]
            break
    spec = experiment["model"]
    if classes and experiment["task"] in ("classification", "class_box"):
        spec.setdefault("num_classes", len(classes))
    model = build_model(experiment)
    state = state_dict_of(load_checkpoint(checkpoint), checkpoint)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{checkpoint} does not fit the model of {config}: {' '.join(str(exc).split())[:300]}") from None
    if not classes and "num_classes" in spec:
        classes = [str(i) for i in range(int(spec["num_classes"]))]
    return experiment, model, classes


def predict(
    checkpoint: PathLike,
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
    threshold: float = 0.5,
    workers: int = 0,
    progress: bool = True,
    flip_pairs: Optional[Sequence[Tuple[int, int]]] = None,
) -> pd.DataFrame:
    """Predict every image and return (and with ``out``, write) the task's submission table.

    Args:
        checkpoint: a ``best.pth`` (or a run folder holding one).
        config: the run's ``config.json`` (or the experiment YAML it was trained from).
        images: a folder of images or a CSV with a ``path_col`` column (paths relative to ``root``,
            default the CSV's folder).
        tta: extra test-time transforms averaged with the plain prediction (``hflip``, ``vflip``...).
        probs: add one ``prob_<class>`` column per class (classification, class_box).
        image_size: network input size; default the last stage's (or the augmentation's) size.
        threshold: mask probability above which a pixel is set (segmentation).
        device: ``auto`` (GPU when visible), ``cpu`` or ``cuda``.
        flip_pairs: keypoint index pairs that trade places under a mirror (left/right eye...);
            required for a mirroring TTA (``hflip``, ``vflip``) on a keypoint run, ``[]`` if none.
    """
    from cvkit.data.io import DataError
    from cvkit.experiment import eval_transform
    from cvkit.experiment import image_size as run_image_size
    from cvkit.inference.tta import tta_predict

    experiment, model, classes = load_run(config, checkpoint)
    task = experiment["task"]
    size = image_size or run_image_size(experiment, experiment["stages"][-1])
    files, names = list_images(images, root, path_col)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = model.to(device).eval()
    loader = DataLoader(ImageFiles(files, names, eval_transform(experiment, size)), batch_size if size else 1,
                        shuffle=False, num_workers=workers)
    transforms = ["identity", *[t for t in tta if t != "identity"]]
    if task == "keypoints" and flip_pairs is None:
        from cvkit.inference.tta import create_tta

        mirrors = [t for t in transforms if create_tta(t).swaps_pairs]
        if mirrors:
            raise ValueError(f"TTA {mirrors} mirrors the image, so keypoints such as left/right eye trade "
                             "places: pass flip_pairs (CLI: --flip-pairs 0-1,2-3), or an empty list if none do")
    rows: List[Dict[str, Any]] = []
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="predict", unit="batch")
    for batch in batches:
        x = batch["features"].to(device)
        try:
            pred = tta_predict(model, x, transforms, target=TTA_TARGET[task],
                               num_classes=len(classes) if task == "class_box" else None,
                               flip_pairs=flip_pairs or None).float().cpu()
        except RuntimeError as exc:
            raise DataError(f"the model failed on images {[names[int(i)] for i in batch['index'][:3]]}...: "
                            f"{' '.join(str(exc).split())[:200]}") from None
        for k, index in enumerate(batch["index"].tolist()):
            height, width = batch["size"][k].tolist()
            rows += _rows(task, names[index], pred[k], classes, probs, height, width, threshold)
    frame = pd.DataFrame(rows)
    if out is not None:
        from cvkit.io import atomic_write_bytes

        atomic_write_bytes(out, frame.to_csv(index=False).encode())
    return frame


def _class_columns(scores: torch.Tensor, classes: List[str], probs: bool) -> Dict[str, Any]:
    row: Dict[str, Any] = {"label": classes[int(scores.argmax())]}
    if probs:
        row.update({f"prob_{name}": round(float(p), 6) for name, p in zip(classes, scores.tolist())})
    return row


def _rows(task: str, name: str, pred: torch.Tensor, classes: List[str], probs: bool, height: int, width: int,
          threshold: float) -> List[Dict[str, Any]]:
    """The output rows of one image from its de-augmented prediction."""
    from cvkit.data.rle import rle_encode

    if task == "classification":
        return [{"path": name, **_class_columns(pred, classes, probs)}]
    if task == "class_box":
        c = len(classes)
        x1, y1, x2, y2 = (pred[c:] * torch.tensor([width, height, width, height])).tolist()
        box = {"x1": min(x1, x2), "y1": min(y1, y2), "x2": max(x1, x2), "y2": max(y1, y2)}
        return [{"path": name, **_class_columns(pred[:c], classes, probs), **{k: round(v, 2) for k, v in box.items()}}]
    if task == "keypoints":
        points = (pred.view(-1, 2) * torch.tensor([width, height])).tolist()
        row: Dict[str, Any] = {"path": name}
        for k, (x, y) in enumerate(points):
            row[f"x{k}"], row[f"y{k}"] = round(x, 2), round(y, 2)
        return [row]
    mask = F.interpolate(pred[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    binary = (mask > threshold).numpy().astype(np.uint8)
    return [{"ImageId": name, "ClassId": c + 1, "EncodedPixels": rle_encode(binary[c])} for c in range(len(binary))]


__all__ = ["ImageFiles", "list_images", "load_run", "predict"]
