"""Segmentation: one {0, 1} mask channel per class from an smp model; Severstal RLE submissions.

Masks come from PNG files of class ids or from a Severstal RLE table. Both historical Severstal
train layouts are read (``ImageId,ClassId,EncodedPixels`` and ``ImageId_ClassId,EncodedPixels``);
submissions are written in the layout the competition scores: ``ImageId,EncodedPixels,ClassId``,
one row per image and 1-based class, empty ``EncodedPixels`` where nothing is predicted,
column-major 1-based runs at the image's original size.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from cvkit.errors import ConfigError
from cvkit.postprocess import POSTPROCESS_FILE
from cvkit.tasks.base import COMMON_OPTIONS, DataOption, Row, Task, register_task
from cvkit.layouts import MasksLayout

DEMO_CLASSES = 4
SUBMISSION_COLUMNS = ("ImageId", "EncodedPixels", "ClassId")
COLOURS = np.array([(255, 64, 64), (64, 255, 64), (64, 128, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)], np.uint8)


def read_rle_table(table: Any) -> "pd.DataFrame":
    """A Severstal table in either layout as ``ImageId, ClassId, EncodedPixels`` columns."""
    from cvkit.data.io import DataError
    from cvkit.data.tables import load_table

    frame, name, _ = load_table(table)
    if "ImageId_ClassId" in frame.columns and "ImageId" not in frame.columns:
        parts = frame["ImageId_ClassId"].astype(str).str.rsplit("_", n=1, expand=True)
        if parts.shape[1] != 2 or parts[1].isna().any():
            bad = frame.index[parts[1].isna()].tolist() if parts.shape[1] == 2 else list(frame.index)
            raise DataError(f"{name}: ImageId_ClassId must look like '<image>_<class>'; rows {bad[:10]} do not")
        frame = frame.assign(ImageId=parts[0], ClassId=parts[1]).drop(columns=["ImageId_ClassId"])
    return frame


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``image`` with each class of a ``(C, H, W)`` 0/1 mask tinted in its own colour."""
    out = image.astype(np.float32)
    for c in range(len(mask)):
        on = mask[c].astype(bool)
        out[on] = (1 - alpha) * out[on] + alpha * COLOURS[c % len(COLOURS)]
    return out.round().astype(np.uint8)


@register_task
class Segmentation(Task):
    """Mask logits ``(B, C, H, W)``; Dice + BCE; Dice and IoU; Severstal RLE rows."""

    name = "segmentation"
    model = "segmentation"
    criterion = "dice_bce"
    metric = "segmentation"
    valid_metric = "dice"
    layout = MasksLayout()
    options = COMMON_OPTIONS + (
        DataOption("mask_col", "column holding the PNG mask path", default="mask"),
        DataOption("mask_root", "folder the mask paths are relative to (default: root)"),
        DataOption("num_classes", "mask channels; PNG value k sets channel k-1, RLE ClassId is 1-based",
                   default=1, kind="int"),
        DataOption("rle", "the table is a Severstal RLE CSV (ImageId, ClassId, EncodedPixels or "
                          "ImageId_ClassId, EncodedPixels); root is the image folder", kind="flag"),
    )
    submission_columns = SUBMISSION_COLUMNS
    tuning_file = POSTPROCESS_FILE

    def dataset(self, table: Any, spec: Mapping[str, Any], class_map: Any = None, transform: Any = None) -> Any:
        from cvkit.data.datasets import SegmentationDataset

        return self._build(SegmentationDataset, table, spec, transform=transform)

    def table_rows(self, table: Any, spec: Mapping[str, Any], class_map: Any = None) -> Any:
        from cvkit.data.rows import SegmentationRows

        return self._build(SegmentationRows, table, spec)

    def _build(self, cls: type, table: Any, spec: Mapping[str, Any], **kwargs: Any) -> Any:
        """``cls`` (the torch dataset or its torch-free rows; ``kwargs`` go to it) on a mask CSV or an RLE table."""
        num_classes = int(spec.get("num_classes") or 1)
        if spec.get("rle"):
            if not spec.get("root"):
                raise ConfigError("rle (--rle) needs root (--root), the folder of the images named in ImageId")
            dataset = cls.from_rle(read_rle_table(table), spec["root"], num_classes=num_classes, **kwargs)
            if isinstance(table, (str, Path)):
                dataset.name = Path(table).name
            return dataset
        return cls(table, root=spec.get("root"), path_col=spec.get("path_col") or "path",
                   mask_col=spec.get("mask_col") or "mask", mask_root=spec.get("mask_root"),
                   num_classes=num_classes, **kwargs)

    def demo(self, root: Path, seed: int, per_class: Optional[int]) -> Dict[str, Any]:
        from cvkit.data import demo

        folder = root / ("segmentation" if per_class is None else f"segmentation_{per_class}_per_class")
        demo.build_segmentation(folder, seed, num_classes=DEMO_CLASSES,
                                **({} if per_class is None else {"per_class": int(per_class)}))
        return {"train": folder / "train.csv", "test": folder / "test.csv", "num_classes": DEMO_CLASSES}

    def model_sizes(self, train: Any, classes: Sequence[str]) -> Dict[str, int]:
        return {"num_classes": int(train.num_classes)}

    def classes(self, dataset: Any) -> List[str]:
        return []

    def decode(self, output: Any, height: int, width: int, classes: Sequence[str]) -> Dict[str, Any]:
        import torch
        import torch.nn.functional as F

        probs = torch.as_tensor(output).float()
        if probs.shape[-2:] != (height, width):
            probs = F.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return {"probs": probs.numpy()}

    def rows(self, name: str, prediction: Mapping[str, Any], classes: Sequence[str], probs: bool = False,
             threshold: float = 0.5, tuning: Any = None) -> List[Row]:
        from cvkit.data.rle import rle_encode

        binary = self.masks(prediction, threshold, tuning)
        return [{"ImageId": name, "EncodedPixels": rle_encode(binary[c]), "ClassId": c + 1} for c in range(len(binary))]

    def masks(self, prediction: Mapping[str, Any], threshold: float = 0.5, tuning: Any = None) -> np.ndarray:
        """The decoded prediction as ``(C, H, W)`` uint8 0/1 masks: the tuned post-processing when given,
        else the plain ``threshold``."""
        if tuning is not None:
            return tuning.apply(prediction["probs"])
        return (prediction["probs"] > threshold).astype(np.uint8)

    def tune(self, predicted: Iterable[Tuple[Any, Any]]) -> Any:
        """Per-class threshold, minimum component area and minimum mask size that maximise
        ``dice_image`` (the Severstal rule) over the predicted images pooled, at their original size."""
        import itertools

        from cvkit.postprocess import tune_segmentation

        predicted = iter(predicted)
        first = next(predicted, None)
        if first is None:
            return None
        pairs = ((p.decode(self)["probs"], dataset.mask(p.index, p.height, p.width).transpose(2, 0, 1))
                 for p, dataset in itertools.chain([first], predicted))
        probs, truths = itertools.tee(pairs)
        return tune_segmentation((p for p, _ in probs), (t for _, t in truths))

    def load_tuning(self, folder: Any) -> Any:
        from cvkit.postprocess import load_postprocess

        path = Path(folder) / self.tuning_file
        return load_postprocess(path) if path.is_file() else None

    def read_submission(self, frame: Any, classes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        frame = read_rle_table(frame)
        out: Dict[str, Dict[str, Any]] = {}
        import pandas as pd

        for _, r in frame.iterrows():
            rle = "" if pd.isna(r["EncodedPixels"]) else str(r["EncodedPixels"])
            out.setdefault(str(r["ImageId"]), {"rle": {}})["rle"][int(r["ClassId"])] = rle
        return out

    def example_output(self, classes: Sequence[str], generator: Any) -> Any:
        import torch

        return torch.rand(3, 12, 10, generator=generator)

    def draw(self, image: np.ndarray, output: Any, target: Any) -> np.ndarray:
        predicted = (output.detach().float().cpu().sigmoid() > 0.5).numpy()
        return mask_overlay(image, predicted)

    def features(self, model: Any) -> Any:
        return lambda x: model.encoder(x)[-1].mean(dim=(2, 3))
