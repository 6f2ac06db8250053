"""Keypoints: N (x, y) points per image, regressed as ``(B, 2N)`` in [0, 1] of the input image."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from cvkit.errors import ConfigError
from cvkit.tasks.base import COMMON_OPTIONS, DataOption, Row, Task, register_task
from cvkit.layouts import KeypointsLayout


@register_task
class Keypoints(Task):
    """Sigmoid points from a KeypointModel; masked SmoothL1; error in pixels and NME; ``path,x0,y0,...`` rows."""

    name = "keypoints"
    model = "keypoints"
    criterion = "keypoint"
    metric = "keypoint"
    valid_metric = "nme"
    layout = KeypointsLayout()
    options = COMMON_OPTIONS + (
        DataOption("keypoint_cols", "x,y columns alternating, comma-separated, e.g. x0,y0,x1,y1; or one "
                                    "column of space-separated numbers (with --num-keypoints)", kind="columns"),
        DataOption("num_keypoints", "points per image when keypoint_cols is one column", kind="int"),
    )

    def dataset(self, table: Any, spec: Mapping[str, Any], class_map: Any = None, transform: Any = None) -> Any:
        from cvkit.data.datasets import KeypointDataset

        return self._build(KeypointDataset, table, spec, transform=transform)

    def table_rows(self, table: Any, spec: Mapping[str, Any], class_map: Any = None) -> Any:
        from cvkit.data.rows import KeypointRows

        return self._build(KeypointRows, table, spec)

    def _build(self, cls: type, table: Any, spec: Mapping[str, Any], **kwargs: Any) -> Any:
        """``cls`` (the torch dataset or its torch-free rows; ``kwargs`` go to it) on a CSV."""
        if not spec.get("keypoint_cols"):
            raise ConfigError("keypoint_cols (--keypoint-cols) is required for task keypoints: x0,y0,x1,y1... columns, "
                              "or one column of space-separated numbers plus num_keypoints (--num-keypoints)")
        return cls(table, keypoint_cols=spec["keypoint_cols"], root=spec.get("root"),
                   path_col=spec.get("path_col") or "path", num_keypoints=spec.get("num_keypoints"), **kwargs)

    def demo(self, root: Path, seed: int, per_class: Optional[int]) -> Dict[str, Any]:
        from cvkit.data import demo

        folder = root / ("keypoints" if per_class is None else f"keypoints_{per_class}_per_class")
        demo.build_keypoints(folder, seed, **({} if per_class is None else {"per_class": int(per_class)}))
        return {"train": folder / "train.csv", "test": folder / "test.csv", "keypoint_cols": list(demo.KEYPOINT_COLS)}

    def model_sizes(self, train: Any, classes: Sequence[str]) -> Dict[str, int]:
        return {"num_keypoints": int(train.num_keypoints)}

    def metric_kwargs(self, model_spec: Mapping[str, Any], image_size: Optional[int]) -> Dict[str, Any]:
        return {"image_size": image_size or 1}

    def classes(self, dataset: Any) -> List[str]:
        return []

    def decode(self, output: Any, height: int, width: int, classes: Sequence[str]) -> Dict[str, Any]:
        return {"points": np.asarray(output, dtype=np.float64).reshape(-1, 2) * (width, height)}

    def rows(self, name: str, prediction: Mapping[str, Any], classes: Sequence[str], probs: bool = False,
             threshold: float = 0.5, tuning: Any = None) -> List[Row]:
        row: Row = {"path": name}
        for k, (x, y) in enumerate(prediction["points"]):
            row[f"x{k}"], row[f"y{k}"] = round(float(x), 2), round(float(y), 2)
        return [row]

    def read_submission(self, frame: Any, classes: Sequence[str]) -> Dict[str, Dict[str, Any]]:
        n = (len(frame.columns) - 1) // 2
        cols = [c for k in range(n) for c in (f"x{k}", f"y{k}")]
        return {str(r["path"]): {"points": r[cols].to_numpy(np.float64).reshape(-1, 2)} for _, r in frame.iterrows()}

    def example_output(self, classes: Sequence[str], generator: Any) -> Any:
        import torch

        return torch.rand(10, generator=generator)

    def draw(self, image: np.ndarray, output: Any, target: Any) -> np.ndarray:
        from cvkit.data.draw import draw_keypoints

        return draw_keypoints(image, output, target)

    def features(self, model: Any) -> Any:
        return model.backbone
