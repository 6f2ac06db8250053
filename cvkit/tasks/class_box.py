"""Class + one box per image (classification with localisation).

The model (:class:`cvkit.models.ClassBoxModel`) returns ONE tensor ``(B, C + 4)``: class logits,
then the box as x1, y1, x2, y2 in [0, 1] of the input. That layout, and the ``(B, 5)`` targets
(class index, box), are packed and unpacked by one codec, :class:`cvkit.layouts.ClassBoxLayout`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from cvkit.data.boxes import BOX_FORMATS
from cvkit.tasks.base import CLASS_OPTIONS, COMMON_OPTIONS, DataOption, Row, register_task
from cvkit.tasks.classification import Classification, class_columns
from cvkit.layouts import CLASS_BOX, ClassBoxLayout

BOX_COLUMNS = ("x1", "y1", "x2", "y2")


class ClassBoxTargets:
    """A BoxDataset whose ``targets`` is one float row: class index, then the xyxy box in [0, 1].

    A box cropped away by augmentation is NaN, so the criterion and :class:`~cvkit.metrics.BoxMetrics`
    leave it out. One tensor keeps the runner's batch keys as they are.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        import torch

        item = dict(self.dataset[index])
        box = item.pop("boxes") if float(item.pop("box_visible")) > 0 else torch.full((4,), float("nan"))
        item["targets"] = CLASS_BOX.join_targets(item["targets"], box)
        return item


def split_class_box(output: Any, num_classes: int) -> "tuple[Any, Any]":
    """``(class part, box part)`` of a ``(..., C + 4)`` output; refuses any other width (:class:`ClassBoxLayout`)."""
    parts = CLASS_BOX.split(output, num_classes)
    return parts["class"], parts["box"]


@register_task
class ClassBox(Classification):
    """Class logits + xyxy box; ``ClassBoxCriterion``; accuracy, F1 and box IoU; ``path,label,x1..y2`` rows."""

    name = "class_box"
    model = "class_box"
    criterion = "class_box"
    metric = "box"
    valid_metric = "box_iou"
    layout = ClassBoxLayout()
    options = COMMON_OPTIONS + CLASS_OPTIONS + (
        DataOption("box_cols", "the 4 box columns, comma-separated", default=BOX_COLUMNS, kind="columns"),
        DataOption("box_format", "how the box columns are written; *_norm = fractions of width/height",
                   default="xyxy", kind="choice", choices=tuple(BOX_FORMATS)),
    )
    data_kinds = ("csv", "demo")
    label_targets = False
    submission_columns = ("path", "label", *BOX_COLUMNS)

    def dataset(self, table: Any, spec: Mapping[str, Any], class_map: Any = None, transform: Any = None) -> Any:
        from cvkit.data.datasets import BoxDataset

        return self._build(BoxDataset, table, spec, class_map, transform=transform)

    def table_rows(self, table: Any, spec: Mapping[str, Any], class_map: Any = None) -> Any:
        from cvkit.data.rows import BoxRows

        return self._build(BoxRows, table, spec, class_map)

    def _build(self, cls: type, table: Any, spec: Mapping[str, Any], class_map: Any, **kwargs: Any) -> Any:
        """``cls`` (the torch dataset or its torch-free rows; ``kwargs`` go to it) on a CSV."""
        return cls(table, root=spec.get("root"), path_col=spec.get("path_col") or "path",
                   label_col=spec.get("label_col") or "label", box_cols=spec.get("box_cols") or BOX_COLUMNS,
                   box_format=spec.get("box_format") or "xyxy", class_map=class_map, **kwargs)

    def demo(self, root: Path, seed: int, per_class: Optional[int]) -> Dict[str, Any]:
        from cvkit.data import demo

        folder = root / ("boxes" if per_class is None else f"boxes_{per_class}_per_class")
        demo.build_boxes(folder, seed, **({} if per_class is None else {"per_class": int(per_class)}))
        return {"train": folder / "train.csv", "test": folder / "test.csv", "class_map": folder / "encode_classes.json"}

    def wrap(self, dataset: Any) -> Any:
        return ClassBoxTargets(dataset)

    def adapt_criterion(self, criterion: Any, model_spec: Mapping[str, Any]) -> Any:
        from cvkit.losses import ClassBoxCriterion

        return ClassBoxCriterion(int(model_spec["num_classes"]), loss=criterion)

    def tta_kwargs(self, classes: Sequence[str]) -> Dict[str, Any]:
        return {"num_classes": len(classes)}

    def decode(self, output: Any, height: int, width: int, classes: Sequence[str]) -> Dict[str, Any]:
        parts = self.layout.split(np.asarray(output, dtype=np.float64).reshape(-1), len(classes))
        probs, box = parts["class"], parts["box"]
        x1, y1, x2, y2 = box * (width, height, width, height)
        return {"probs": probs, "label": int(probs.argmax()),
                "box": np.array([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])}

    def rows(self, name: str, prediction: Mapping[str, Any], classes: Sequence[str], probs: bool = False,
             threshold: float = 0.5, tuning: Any = None) -> List[Row]:
        box = {k: round(float(v), 2) for k, v in zip(BOX_COLUMNS, prediction["box"])}
        return [{"path": name, **class_columns(prediction["probs"], classes, probs), **box}]

    def read_submission(self, frame: Any, classes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        out = super().read_submission(frame, classes)
        for _, r in frame.iterrows():
            out[str(r["path"])]["box"] = np.array([float(r[k]) for k in BOX_COLUMNS])
        return out

    def example_output(self, classes: Sequence[str], generator: Any) -> Any:
        import torch

        return self.layout.join({"class": super().example_output(classes, generator),
                                 "box": torch.rand(4, generator=generator)})

    def draw(self, image: np.ndarray, output: Any, target: Any) -> np.ndarray:
        import cv2

        parts = self.layout.split(output.detach().float().cpu())
        label, true_box = self.layout.split_targets(target.cpu())
        h, w = image.shape[:2]
        scale = np.array([w, h, w, h])
        for values, colour in ((true_box.numpy(), (0, 255, 0)), (parts["box"].numpy(), (255, 0, 0))):
            if np.isfinite(values).all():
                x1, y1, x2, y2 = (values * scale).round().astype(int).tolist()
                cv2.rectangle(image, (x1, y1), (x2, y2), colour, 1)
        return super().draw(image, parts["class"], label.long())

    def features(self, model: Any) -> Any:
        return model.backbone
