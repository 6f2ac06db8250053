"""Run-length encoded masks in the Severstal steel-defect layout.

``EncodedPixels`` is ``"start length start length ..."``: pixels are numbered from 1, top to
bottom then left to right (column-major), as in Severstal's ``train.csv`` with columns
``ImageId, ClassId, EncodedPixels`` and 1-based ``ClassId``. An image without a defect of a
class simply has no row (or an empty/NaN ``EncodedPixels``) for it.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

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


def parse_rle(rle: object, where: str = "EncodedPixels") -> Tuple[np.ndarray, np.ndarray]:
    """0-based run starts and lengths (int64) of an ``EncodedPixels`` cell; empty for NaN or "".

    Raises a one-line :class:`DataError` starting with ``where`` for text that is not integers,
    a number too large for 64 bits, an odd count, a start < 1 or length < 1, or runs that overlap
    or are out of order. Runs past the image are :func:`rle_decode`'s to find (it knows the size).
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)) or not str(rle).strip():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    text = str(rle)
    try:
        numbers = np.asarray(text.split(), dtype=np.int64)
    except ValueError:
        raise DataError(f"{where}: EncodedPixels {text[:40]!r} is not whitespace-separated integers") from None
    except OverflowError:
        big = max(text.split(), key=len)
        raise DataError(f"{where}: EncodedPixels holds {big[:30]} ({len(big.lstrip('+-'))} digits), too large "
                        "for a pixel index; expected start/length pairs within the image") from None
    if numbers.size % 2:
        raise DataError(f"{where}: EncodedPixels has {numbers.size} numbers; expected start/length pairs")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if starts.min() < 0 or lengths.min() < 1:
        raise DataError(f"{where}: EncodedPixels has a start < 1 or a length < 1; expected 1-based starts "
                        "and lengths >= 1")
    if np.any(starts[1:] < starts[:-1]) or np.any(lengths[:-1] > starts[1:] - starts[:-1]):
        raise DataError(f"{where}: runs are not sorted or overlap; expected increasing starts")
    return starts, lengths


def rle_decode(rle: object, shape: Tuple[int, int], where: str = "EncodedPixels") -> np.ndarray:
    """Decode runs into a uint8 (H, W) mask of 0/1; NaN or "" gives an empty mask.

    ``where`` names the CSV row in error messages (see :func:`parse_rle`, plus runs that go past
    ``H * W``).
    """
    height, width = shape
    out = np.zeros(height * width, dtype=np.uint8)
    starts, lengths = parse_rle(rle, where)
    if starts.size and (np.any(starts >= height * width) or np.any(lengths > height * width - starts)):
        raise DataError(f"{where}: a run lies outside a {height}x{width} image (pixels 1..{height * width}, lengths >= 1)")
    for s, n in zip(starts, lengths):
        out[s : s + n] = 1
    return out.reshape((height, width), order="F")


def parse_class_id(value: object, num_classes: int, where: str = "") -> int:
    """A 1-based ``ClassId`` cell as an int in 1..num_classes (``3``, ``3.0`` and ``"3"`` all give 3)."""
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise DataError(f"{where}: ClassId {value!r} is not an integer; expected 1..{num_classes}")
    if not 1 <= number <= num_classes:
        raise DataError(f"{where}: ClassId {int(number)} outside 1..{num_classes}")
    return int(number)


def rle_table_problems(class_ids: Iterable[object], rles: Iterable[object], num_classes: int) -> List[str]:
    """``"row 3: <reason>"`` for every row of an RLE table whose ClassId or EncodedPixels is malformed."""
    problems = []
    for row, (class_id, rle) in enumerate(zip(class_ids, rles)):
        for check in (lambda: parse_class_id(class_id, num_classes, f"row {row}"),
                      lambda: parse_rle(rle, f"row {row}")):
            try:
                check()
            except DataError as exc:
                problems.append(str(exc))
    return problems


def masks_from_rle(rows: Iterable[Tuple[int, object]], shape: Tuple[int, int], num_classes: int,
                   where: str = "") -> np.ndarray:
    """Stack ``(class_id 1-based, EncodedPixels)`` pairs into a uint8 (H, W, num_classes) mask."""
    mask = np.zeros((shape[0], shape[1], num_classes), dtype=np.uint8)
    for class_id, rle in rows:
        class_id = parse_class_id(class_id, num_classes, where)
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
