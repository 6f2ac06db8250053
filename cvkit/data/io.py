"""One way to read images and masks, the data-layer exceptions, and the class map file.

Every image cvkit trains on goes through :func:`read_image`, which returns RGB uint8 H x W x 3
whatever the file holds: grayscale is replicated to three channels, alpha is dropped (the
colour underneath is kept, not composited), 16-bit samples are shifted down to their top 8 bits
(``v >> 8``) and EXIF orientation is applied, all by OpenCV's ``IMREAD_COLOR_RGB``. A file that
is empty, unreadable or a JPEG/PNG cut short raises :class:`ImageReadError` naming the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Union

import cv2
import numpy as np

from cvkit.io import atomic_write_json

PathLike = Union[str, os.PathLike]

_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)


class DataError(ValueError):
    """A dataset, file or table does not hold what cvkit expected; the message says where and what."""


class ImageReadError(DataError):
    """An image or mask file is missing, empty, truncated or not an image.

    ``code`` is one of ``missing_file``, ``empty_file``, ``truncated``, ``unreadable`` (or
    ``bad_mask``), so a report can count problems by kind.
    """

    def __init__(self, message: str, code: str = "unreadable") -> None:
        super().__init__(message)
        self.code = code


class TableError(DataError):
    """A CSV/table lacks a column, or a cell does not parse as the declared type."""


class LabelError(DataError):
    """A label is not in the class map."""


class DatasetCheckError(DataError):
    """:func:`cvkit.data.check.check_dataset` found bad rows; ``report`` lists every one."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


def _read_bytes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found", code="missing_file")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes), expected an image", code="empty_file")
    return data


def truncation_problem(data: np.ndarray) -> Optional[str]:
    """Why the encoded bytes of a JPEG or PNG are cut short, or None when they end properly.

    OpenCV decodes a truncated JPEG with a grey bottom and only a warning, so the end marker
    (JPEG ``FF D9``, PNG ``IEND``) is looked for in the last bytes instead.
    """
    head = bytes(data[:8])
    tail = bytes(data[-4096:]).rstrip(b"\0")
    if head.startswith(b"\xff\xd8"):
        if b"\xff\xd9" not in tail[-1024:]:
            return "JPEG is truncated (no end-of-image marker FFD9)"
    elif head.startswith(b"\x89PNG\r\n\x1a\n"):
        if b"IEND" not in tail[-64:]:
            return "PNG is truncated (no IEND chunk)"
    return None


def read_image(path: PathLike) -> np.ndarray:
    """Read any OpenCV-readable image as RGB uint8 (H, W, 3), converted as the module says."""
    path = Path(path)
    data = _read_bytes(path)
    problem = truncation_problem(data)
    if problem:
        raise ImageReadError(f"{path}: {problem}", code="truncated")
    if _RGB_FLAG is not None:
        image = cv2.imdecode(data, _RGB_FLAG)
    else:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is not None:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None:
        raise ImageReadError(f"{path}: not a readable image ({data.size} bytes)")
    return image


def read_image_info(path: PathLike) -> Dict[str, object]:
    """Width, height, channels, dtype ("mode") and file size of an image, as stored on disk."""
    path = Path(path)
    data = _read_bytes(path)
    raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ImageReadError(f"{path}: not a readable image ({data.size} bytes)")
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels}ch")
    if raw.dtype != np.uint8:
        mode += f";{raw.dtype.itemsize * 8}"
    return {"width": raw.shape[1], "height": raw.shape[0], "channels": channels, "mode": mode,
            "file_size": int(data.size)}


def read_mask(path: PathLike) -> np.ndarray:
    """Read a PNG mask as uint8 (H, W) class ids; a 3-channel mask must have equal channels."""
    path = Path(path)
    data = _read_bytes(path)
    problem = truncation_problem(data)
    if problem:
        raise ImageReadError(f"{path}: {problem}", code="truncated")
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ImageReadError(f"{path}: not a readable mask image")
    if mask.ndim == 3:
        if not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])):
            raise ImageReadError(f"{path}: colour mask with different channels; expected one class id per pixel",
                                 code="bad_mask")
        mask = mask[..., 0]
    if mask.dtype != np.uint8:
        if mask.max(initial=0) > 255:
            raise ImageReadError(f"{path}: mask value {int(mask.max())} > 255; expected class ids 0..255", code="bad_mask")
        mask = mask.astype(np.uint8)
    return mask


def class_map_from_labels(labels: Iterable[object]) -> Dict[str, int]:
    """Label name -> index, sorted so the same labels always give the same map.

    Integer labels sort numerically (``2`` before ``10``), so labels 0..N-1 keep their own value.
    """
    names = {str(label) for label in labels}
    if all(name.lstrip("-").isdigit() for name in names):
        return {name: i for i, name in enumerate(sorted(names, key=int))}
    return {name: i for i, name in enumerate(sorted(names))}


def save_class_map(path: PathLike, class_map: Mapping[str, int]) -> None:
    """Write the class map (label name -> index) as JSON, atomically."""
    atomic_write_json(path, {str(k): int(v) for k, v in class_map.items()})


def load_class_map(path: PathLike) -> Dict[str, int]:
    """Read a class map written by :func:`save_class_map` (e.g. ``encode_classes.json``)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"class map not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected {{label name: index}}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
        raise DataError(f"{path}: expected a JSON object {{label name: integer index}}")
    if sorted(raw.values()) != list(range(len(raw))):
        raise DataError(f"{path}: indices {sorted(raw.values())} are not 0..{len(raw) - 1} without gaps")
    return {str(k): v for k, v in raw.items()}
