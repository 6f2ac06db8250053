"""Run-length encoded masks in the Severstal steel-defect layout.

``EncodedPixels`` is ``"start length start length ..."``: pixels are numbered from 1, top to
bottom then left to right (column-major), as in Severstal's ``train.csv`` with columns
``ImageId, ClassId, EncodedPixels`` and 1-based ``ClassId``. An image without a defect of a
class simply has no row (or an empty/NaN ``EncodedPixels``) for it.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np
import pandas as pd

from cvkit.data.io import DataError


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (non-zero = set) as column-major 1-based runs; "" for an empty mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[0], mask.flatten(order="F") != 0, [0]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    starts, ends = edges[0::2], edges[1::2]
    return " ".join(f"{s} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: object, shape: Tuple[int, int], where: str = "EncodedPixels") -> np.ndarray:
    """Decode runs into a uint8 (H, W) mask of 0/1; NaN or "" gives an empty mask.

    ``where`` names the CSV row in error messages (runs that are odd in number, overlap,
    or run past ``H * W``).
    """
    height, width = shape
    out = np.zeros(height * width, dtype=np.uint8)
    if rle is None or (isinstance(rle, float) and np.isnan(rle)) or not str(rle).strip():
        return out.reshape((height, width), order="F")
    try:
        numbers = np.asarray(str(rle).split(), dtype=np.int64)
    except ValueError:
        raise DataError(f"{where}: EncodedPixels {str(rle)[:40]!r} is not whitespace-separated integers") from None
    if numbers.size % 2:
        raise DataError(f"{where}: EncodedPixels has {numbers.size} numbers; expected start/length pairs")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if starts.min() < 0 or lengths.min() < 1 or (starts + lengths).max() > height * width:
        raise DataError(f"{where}: a run lies outside a {height}x{width} image (pixels 1..{height * width}, lengths >= 1)")
    if np.any(starts[1:] < (starts + lengths)[:-1]):
        raise DataError(f"{where}: runs are not sorted or overlap; expected increasing starts")
    for s, n in zip(starts, lengths):
        out[s : s + n] = 1
    return out.reshape((height, width), order="F")


def masks_from_rle(rows: Iterable[Tuple[int, object]], shape: Tuple[int, int], num_classes: int,
                   where: str = "") -> np.ndarray:
    """Stack ``(class_id 1-based, EncodedPixels)`` pairs into a uint8 (H, W, num_classes) mask."""
    mask = np.zeros((shape[0], shape[1], num_classes), dtype=np.uint8)
    for class_id, rle in rows:
        class_id = int(class_id)
        if not 1 <= class_id <= num_classes:
            raise DataError(f"{where}: ClassId {class_id} outside 1..{num_classes}")
        mask[..., class_id - 1] |= rle_decode(rle, shape, where=f"{where} ClassId {class_id}")
    return mask


def masks_to_rle_frame(masks: Dict[str, np.ndarray], image_col: str = "ImageId", class_col: str = "ClassId",
                       rle_col: str = "EncodedPixels") -> pd.DataFrame:
    """Severstal-style table from ``{image id: (H, W, C) mask}``; empty classes get no row."""
    rows = []
    for image_id, mask in masks.items():
        mask = mask[..., None] if mask.ndim == 2 else mask
        for c in range(mask.shape[2]):
            if mask[..., c].any():
                rows.append({image_col: image_id, class_col: c + 1, rle_col: rle_encode(mask[..., c])})
    return pd.DataFrame(rows, columns=[image_col, class_col, rle_col])
