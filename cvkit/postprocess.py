"""Post-processing chosen on validation predictions for the score the leaderboard uses.

Segmentation (:func:`tune_segmentation`): per class, the probability threshold, the smallest
connected component kept (``min_area``) and the smallest mask kept at all (``min_total``, fewer
pixels left and the class is predicted empty) that maximise that class's ``dice_image`` (the
Severstal rule of :class:`cvkit.metrics.SegmentationMetrics`). The mean over classes of per-class
means is ``dice_image`` itself, so choosing each class on its own maximises the whole score.

The search is one pass over the images and keeps no mask: for each image, class and threshold,
the connected components are labelled once (8-connectivity, ``cv2.connectedComponents``), and every
``(min_area, min_total)`` pair is then scored from the components' areas and their overlap with the
truth. Memory is one image plus a ``(classes, thresholds, min_areas, min_totals)`` table, whatever
the number of images. ``min_area``/``min_total`` are pixels at the resolution of the masks given:
tune on probabilities at the size :meth:`SegmentationPostprocess.apply` will see (for submissions,
the original image size that :meth:`cvkit.tasks.segmentation.Segmentation.decode` returns).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from cvkit.io import PathLike

POSTPROCESS_FILE = "postprocess.json"
DEFAULT_THRESHOLDS: Tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_MIN_AREAS: Tuple[int, ...] = (0, 8, 32, 128, 512, 2048, 8192)
DEFAULT_MIN_TOTALS: Tuple[int, ...] = (0, 8, 32, 128, 512, 2048, 8192)
_TIE = 1e-9  # scores this close to the best count as equal; the simpler candidate wins
_CLASS_KEYS = ("name", "threshold", "min_area", "min_total")

ArrayLike = Any  # np.ndarray or torch.Tensor


@dataclass
class SegmentationPostprocess:
    """Per-class threshold, smallest component kept and smallest mask kept, with the scores they gave.

    ``before``/``after`` (and ``class_before``/``class_after``) are ``dice_image`` on the tuning
    images at ``baseline_threshold`` without filtering, and with the chosen settings.
    """

    thresholds: List[float]
    min_areas: List[int]
    min_totals: List[int]
    class_names: List[str] = field(default_factory=list)
    before: float = math.nan
    after: float = math.nan
    class_before: List[float] = field(default_factory=list)
    class_after: List[float] = field(default_factory=list)
    baseline_threshold: float = 0.5
    images: int = 0

    def __post_init__(self) -> None:
        n = len(self.thresholds)
        if n == 0 or len(self.min_areas) != n or len(self.min_totals) != n:
            raise ValueError(f"thresholds, min_areas and min_totals need one value per class; got "
                             f"{len(self.thresholds)}, {len(self.min_areas)}, {len(self.min_totals)}")
        if not self.class_names:
            self.class_names = [str(c + 1) for c in range(n)]
        if len(self.class_names) != n:
            raise ValueError(f"{len(self.class_names)} class_names for {n} classes")

    @property
    def num_classes(self) -> int:
        return len(self.thresholds)

    def apply(self, probs: ArrayLike) -> np.ndarray:
        """Binary ``(C, H, W)`` uint8 masks from ``(C, H, W)`` probabilities (``(H, W)`` when C = 1).

        Per class: ``probs > threshold``, then components smaller than ``min_area`` pixels are
        removed, then the mask is emptied if fewer than ``min_total`` pixels are left.
        """
        p = _image(probs, self.num_classes, "probs")
        out = np.zeros(p.shape, dtype=np.uint8)
        for c in range(self.num_classes):
            binary = (p[c] > self.thresholds[c]).astype(np.uint8)
            if self.min_areas[c] > 0 and binary.any():
                labels, areas = _components(binary)
                keep = np.concatenate([[False], areas >= self.min_areas[c]])
                binary = keep[labels].astype(np.uint8)
            if int(binary.sum()) >= self.min_totals[c]:
                out[c] = binary
        return out

    def to_json(self) -> Dict[str, Any]:
        """A JSON-ready dict: the score, before/after, and one entry per class."""
        return {
            "score": "dice_image",
            "before": self.before,
            "after": self.after,
            "baseline_threshold": self.baseline_threshold,
            "images": self.images,
            "classes": [
                {"name": n, "threshold": t, "min_area": a, "min_total": m,
                 **({"before": b, "after": f} if self.class_before else {})}
                for n, t, a, m, b, f in zip(self.class_names, self.thresholds, self.min_areas, self.min_totals,
                                            self.class_before or [None] * self.num_classes,
                                            self.class_after or [None] * self.num_classes)
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = POSTPROCESS_FILE) -> "SegmentationPostprocess":
        """Rebuild from :meth:`to_json`'s dict; a missing or wrong key is a one-line ValueError naming ``source``."""
        classes = data.get("classes") if isinstance(data, Mapping) else None
        if not isinstance(classes, list) or not classes:
            raise ValueError(f"{source}: expected a 'classes' list with one entry per class")
        parsed = []
        for k, entry in enumerate(classes):
            missing = [key for key in _CLASS_KEYS if not isinstance(entry, Mapping) or key not in entry]
            if missing:
                raise ValueError(f"{source}: classes[{k}] lacks {missing}; expected keys {list(_CLASS_KEYS)}")
            for key in ("min_area", "min_total"):
                area = entry[key]
                if isinstance(area, bool) or not isinstance(area, (int, float)) or not float(area).is_integer():
                    raise ValueError(f"{source}: classes[{k}].{key} must be a whole number of pixels >= 0; "
                                     f"got {area!r}")
            try:
                values = (float(entry["threshold"]), int(entry["min_area"]), int(entry["min_total"]))
            except (TypeError, ValueError):
                values = (math.nan, -1, -1)
            if not (0 <= values[0] <= 1 and values[1] >= 0 and values[2] >= 0):
                raise ValueError(f"{source}: classes[{k}] needs threshold in [0, 1] and integer min_area, "
                                 f"min_total >= 0; got {dict(entry)}")
            parsed.append(values)
        per_class = all("before" in e and "after" in e for e in classes)
        return cls(
            thresholds=[t for t, _, _ in parsed],
            min_areas=[a for _, a, _ in parsed],
            min_totals=[m for _, _, m in parsed],
            class_names=[str(e["name"]) for e in classes],
            before=float(data.get("before", math.nan)),
            after=float(data.get("after", math.nan)),
            class_before=[float(e["before"]) for e in classes] if per_class else [],
            class_after=[float(e["after"]) for e in classes] if per_class else [],
            baseline_threshold=float(data.get("baseline_threshold", 0.5)),
            images=int(data.get("images", 0)),
        )


def load_postprocess(path: PathLike) -> SegmentationPostprocess:
    """Read what :func:`cvkit.run_folder.write_tuning` wrote (``path`` is the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / POSTPROCESS_FILE
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return SegmentationPostprocess.from_json(data, source=str(path))


def _numpy(value: ArrayLike) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)  # a torch tensor


def _image(value: ArrayLike, num_classes: Optional[int], what: str, index: Optional[int] = None) -> np.ndarray:
    """``value`` as a ``(C, H, W)`` float array; ``(H, W)`` is one class."""
    array = _numpy(value)
    if array.ndim == 2:
        array = array[None]
    where = f"{what}[{index}]" if index is not None else what
    if array.ndim != 3 or (num_classes is not None and array.shape[0] != num_classes):
        expected = f"({num_classes}, H, W)" if num_classes is not None else "(C, H, W)"
        raise ValueError(f"{where} has shape {tuple(np.shape(value))}; expected {expected}")
    return array


def _grid(values: Iterable[float], what: str, integer: bool) -> np.ndarray:
    grid = np.unique(np.asarray(list(values), dtype=np.int64 if integer else np.float64))
    if grid.size == 0 or grid.min() < 0 or (not integer and grid.max() > 1):
        expected = ">= 0 pixels" if integer else "in [0, 1]"
        raise ValueError(f"{what} must be non-empty and {expected}; got {grid.tolist()}")
    return grid


def _components(binary: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """8-connected component labels of a uint8 mask (0 = background) and the pixel area of components 1..n.

    ``cv2.connectedComponents`` plus a bincount: a third of the time of ``connectedComponentsWithStats``,
    whose centroids and bounding boxes are not needed here.
    """
    count, labels = cv2.connectedComponents(binary, connectivity=8)
    return labels, np.bincount(labels.ravel(), minlength=count)[1:]


def _pair_dice(probs: np.ndarray, truth: np.ndarray, thresholds: np.ndarray, min_areas: np.ndarray,
               min_totals: np.ndarray) -> np.ndarray:
    """Dice of one (image, class) pair for every candidate: ``(thresholds, min_areas, min_totals)``."""
    true_total = int(truth.sum())
    out = np.empty((len(thresholds), len(min_areas), len(min_totals)))
    for i, threshold in enumerate(thresholds):
        binary = (probs > threshold).astype(np.uint8)
        if binary.any():
            labels, areas = _components(binary)
            overlap = np.bincount(labels[truth], minlength=len(areas) + 1)[1:]
        else:
            areas = overlap = np.zeros(0, dtype=np.int64)
        keep = areas[None, :] >= min_areas[:, None]  # (min_areas, components)
        kept, hit = keep @ areas, keep @ overlap  # pixels left and true pixels among them
        empty = kept[:, None] < min_totals[None, :]
        kept = np.where(empty, 0, kept[:, None])
        hit = np.where(empty, 0, hit[:, None])
        denominator = kept + true_total
        out[i] = np.where(denominator > 0, 2 * hit / np.maximum(denominator, 1), 1.0)
    return out


def tune_segmentation(
    probs: Iterable[ArrayLike],
    truths: Iterable[ArrayLike],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
    min_totals: Sequence[int] = DEFAULT_MIN_TOTALS,
    class_names: Optional[Sequence[str]] = None,
    baseline_threshold: float = 0.5,
) -> SegmentationPostprocess:
    """Per class, the (threshold, min_area, min_total) maximising ``dice_image`` over the images given.

    ``probs`` and ``truths`` yield one ``(C, H, W)`` probability array and 0/1 mask per image (the
    valid split, or out-of-fold predictions), in the same order; they are read once and not kept.
    The baseline (``baseline_threshold``, no filtering) is always a candidate, so ``after >= before``
    on these images. Ties go to the smallest ``min_total``, then the smallest ``min_area``, then the
    threshold nearest the baseline.
    """
    grids = (np.union1d(_grid(thresholds, "thresholds", False), [baseline_threshold]),
             np.union1d(_grid(min_areas, "min_areas", True), [0]),
             np.union1d(_grid(min_totals, "min_totals", True), [0]))
    sums: Optional[np.ndarray] = None
    images = 0
    truth_iter = iter(truths)
    for index, prob in enumerate(probs):
        p = _image(prob, None if sums is None else len(sums), "probs", index)
        truth = next(truth_iter, None)
        if truth is None:
            raise ValueError(f"truths ended at image {index} while probs went on; expected one mask per image")
        t = _image(truth, len(p), "truths", index)
        if t.shape != p.shape:
            raise ValueError(f"truths[{index}] has shape {t.shape} but probs[{index}] {p.shape}; expected the same")
        if sums is None:
            sums = np.zeros((len(p), *map(len, grids)))
        for c in range(len(p)):
            sums[c] += _pair_dice(p[c], t[c] > 0.5, *grids)
        images += 1
    if sums is None:
        raise ValueError("tune_segmentation got no images; expected at least one (probs, truth) pair")
    if next(truth_iter, None) is not None:
        raise ValueError(f"truths has more masks than the {images} probability maps; expected one per image")
    return _choose(sums / images, grids, class_names, baseline_threshold, images)


def _choose(mean: np.ndarray, grids: Tuple[np.ndarray, ...], class_names: Optional[Sequence[str]],
            baseline_threshold: float, images: int) -> SegmentationPostprocess:
    """Best candidate per class from the ``(C, T, A, M)`` mean Dice table, ties to the simplest."""
    thresholds, areas, totals = grids
    t0 = int(np.flatnonzero(thresholds == baseline_threshold)[0])
    # candidates in order of preference: min_total, then min_area, then distance of the threshold to the baseline
    order = [(t, a, m) for m in range(len(totals)) for a in range(len(areas))
             for t in sorted(range(len(thresholds)), key=lambda k: (abs(thresholds[k] - baseline_threshold), k))]
    chosen = []
    for table in mean:
        best = table.max()
        chosen.append(next(c for c in order if table[c] >= best - _TIE))
    return SegmentationPostprocess(
        thresholds=[float(thresholds[t]) for t, _, _ in chosen],
        min_areas=[int(areas[a]) for _, a, _ in chosen],
        min_totals=[int(totals[m]) for _, _, m in chosen],
        class_names=list(class_names) if class_names is not None else [],
        before=float(mean[:, t0, 0, 0].mean()),
        after=float(np.mean([table[c] for table, c in zip(mean, chosen)])),
        class_before=[float(v) for v in mean[:, t0, 0, 0]],
        class_after=[float(table[c]) for table, c in zip(mean, chosen)],
        baseline_threshold=float(baseline_threshold),
        images=images,
    )


__all__ = ["DEFAULT_MIN_AREAS", "DEFAULT_MIN_TOTALS", "DEFAULT_THRESHOLDS", "POSTPROCESS_FILE",
           "SegmentationPostprocess", "load_postprocess", "tune_segmentation"]
