"""Box formats and conversions between them.

A CSV declares its box columns in one of :data:`BOX_FORMATS`: ``xyxy`` (corners), ``xywh``
(top-left corner and size) or ``cxcywh`` (centre and size), each in pixels or, with the
``_norm`` suffix, as fractions [0, 1] of the image width/height. Models always get ``xyxy_norm``,
which is albumentations' own ``"albumentations"`` box format.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

BOX_FORMATS: Tuple[str, ...] = ("xyxy", "xywh", "cxcywh", "xyxy_norm", "xywh_norm", "cxcywh_norm")


def _check_format(fmt: str) -> None:
    if fmt not in BOX_FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; expected one of {', '.join(BOX_FORMATS)}")


def to_xyxy(boxes: np.ndarray, fmt: str, width: float, height: float) -> np.ndarray:
    """Boxes (..., 4) in ``fmt`` -> pixel ``xyxy`` float64."""
    _check_format(fmt)
    b = np.asarray(boxes, dtype=np.float64).copy()
    if fmt.endswith("_norm"):
        b *= np.array([width, height, width, height], dtype=np.float64)
    base = fmt.replace("_norm", "")
    if base == "xywh":
        b[..., 2:] += b[..., :2]
    elif base == "cxcywh":
        half = b[..., 2:] / 2
        b[..., :2], b[..., 2:] = b[..., :2] - half, b[..., :2] + half
    return b


def from_xyxy(boxes: np.ndarray, fmt: str, width: float, height: float) -> np.ndarray:
    """Pixel ``xyxy`` boxes (..., 4) -> ``fmt`` float64."""
    _check_format(fmt)
    b = np.asarray(boxes, dtype=np.float64).copy()
    base = fmt.replace("_norm", "")
    if base == "xywh":
        b[..., 2:] -= b[..., :2]
    elif base == "cxcywh":
        size = b[..., 2:] - b[..., :2]
        b[..., :2], b[..., 2:] = b[..., :2] + size / 2, size
    if fmt.endswith("_norm"):
        b /= np.array([width, height, width, height], dtype=np.float64)
    return b


def convert_boxes(boxes: np.ndarray, src: str, dst: str, width: float, height: float) -> np.ndarray:
    """Convert boxes (..., 4) from format ``src`` to ``dst`` for an image of ``width`` x ``height``."""
    return from_xyxy(to_xyxy(boxes, src, width, height), dst, width, height)


def box_problem(xyxy: np.ndarray, width: float, height: float, tolerance: float = 0.5) -> str:
    """Why a pixel ``xyxy`` box is unusable for a ``width`` x ``height`` image ("" when it is fine).

    ``tolerance`` pixels of overshoot are accepted (rounding in hand-made labels) and clipped later.
    """
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    if not np.all(np.isfinite([x1, y1, x2, y2])):
        return "box has a missing or non-numeric coordinate"
    if x2 <= x1 or y2 <= y1:
        return f"box is inverted or empty: x1={x1:g} x2={x2:g} y1={y1:g} y2={y2:g} (expected x1 < x2, y1 < y2)"
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        return (f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {width:g}x{height:g} image "
                f"(expected 0 <= x <= {width:g}, 0 <= y <= {height:g})")
    return ""
