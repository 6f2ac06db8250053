"""Classification: one label per image; a CSV, class sub-folders or the STL-10 binary layout."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from cvkit.errors import ConfigError
from cvkit.tasks.base import CLASS_OPTIONS, COMMON_OPTIONS, SPLIT_KEYS, Row, Task, register_task
from cvkit.layouts import ClassesLayout

FOLDER_KEYS = SPLIT_KEYS | {"kind", "train", "valid", "test", "class_map"}
STL10_KEYS = SPLIT_KEYS | {"kind", "root"}


def class_columns(scores: Sequence[float], classes: Sequence[str], probs: bool) -> Row:
    """``label`` (the best class name) and, with ``probs``, one rounded ``prob_<class>`` per class."""
    scores = np.asarray(scores, dtype=np.float64)
    row: Row = {"label": classes[int(scores.argmax())]}
    if probs:
        row.update({f"prob_{name}": round(float(p), 6) for name, p in zip(classes, scores)})
    return row


@register_task
class Classification(Task):
    """Logits ``(B, C)`` from a timm classifier; cross-entropy; accuracy and F1; ``path,label`` rows."""

    name = "classification"
    layout = ClassesLayout()
    options = COMMON_OPTIONS + CLASS_OPTIONS
    data_kinds = ("csv", "demo", "folders", "stl10")
    has_classes = True
    label_targets = True
    submission_columns = ("path", "label")

    def data_keys(self, kind: str) -> frozenset:
        return {"folders": FOLDER_KEYS, "stl10": STL10_KEYS}.get(kind) or super().data_keys(kind)

    def dataset(self, table: Any, spec: Mapping[str, Any], class_map: Any = None, transform: Any = None) -> Any:
        from cvkit.data.datasets import ClassificationDataset

        return self._build(ClassificationDataset, table, spec, class_map, transform=transform)

    def table_rows(self, table: Any, spec: Mapping[str, Any], class_map: Any = None) -> Any:
        from cvkit.data.rows import ClassificationRows

        return self._build(ClassificationRows, table, spec, class_map)

    def _build(self, cls: type, table: Any, spec: Mapping[str, Any], class_map: Any, **kwargs: Any) -> Any:
        """``cls`` (the torch dataset or its torch-free rows; ``kwargs`` go to it) on a CSV or class folders."""
        if isinstance(table, (str, Path)) and Path(table).is_dir():
            return cls.from_folders(table, class_map=class_map, **kwargs)
        return cls(table, root=spec.get("root"), path_col=spec.get("path_col") or "path",
                   label_col=spec.get("label_col") or "label", class_map=class_map, **kwargs)

    def datasets(self, spec: Dict[str, Any], demo_root: Path) -> Dict[str, Any]:
        from cvkit.data.datasets import STL10Dataset

        if spec["kind"] == "stl10":
            from cvkit.data.stl10 import build_demo

            root = spec.get("root") or build_demo(demo_root / "stl10", seed=0)
            return {"train": STL10Dataset(root, "train"), "test": STL10Dataset(root, "test")}
        if spec["kind"] == "folders" and not spec.get("train"):
            raise ConfigError("data.train is required for kind 'folders': a folder of class sub-folders")
        return super().datasets(spec, demo_root)

    def demo(self, root: Path, seed: int, per_class: Optional[int]) -> Dict[str, Any]:
        from cvkit.data import demo

        folder = root / ("classification" if per_class is None else f"classification_{per_class}_per_class")
        demo.build_classification(folder, seed, **({} if per_class is None else {"per_class": int(per_class)}))
        return {"train": folder / "train.csv", "test": folder / "test.csv", "class_map": folder / "encode_classes.json"}

    def labels(self, dataset: Any) -> Optional[np.ndarray]:
        labels = getattr(dataset, "labels", None)
        if callable(labels):
            return labels()
        return None if labels is None else np.asarray(labels)

    def target_columns(self, dataset: Any, index: int, classes: Sequence[str]) -> Row:
        labels = self.labels(dataset)
        return {} if labels is None else {"target": classes[int(labels[index])]}

    def decode(self, output: Any, height: int, width: int, classes: Sequence[str]) -> Dict[str, Any]:
        probs = np.asarray(output, dtype=np.float64).reshape(-1)
        return {"probs": probs, "label": int(probs.argmax())}

    def rows(self, name: str, prediction: Mapping[str, Any], classes: Sequence[str], probs: bool = False,
             threshold: float = 0.5, tuning: Any = None) -> List[Row]:
        return [{"path": name, **class_columns(prediction["probs"], classes, probs)}]

    def read_submission(self, frame: Any, classes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        index = {c: i for i, c in enumerate(classes)}
        return {str(r["path"]): {"label": index[str(r["label"])]} for _, r in frame.iterrows()}

    def example_output(self, classes: Sequence[str], generator: Any) -> Any:
        import torch

        return torch.rand(len(classes), generator=generator).softmax(0)
