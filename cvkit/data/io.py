"""One way to read images and masks, the data-layer exceptions, and the class map file.

Every image cvkit trains on goes through :func:`read_image`, which returns RGB uint8 H x W x 3
whatever the file holds: grayscale is replicated to three channels, alpha is dropped (the
colour underneath is kept, not composited), 16-bit samples are shifted down to their top 8 bits
(``v >> 8``) and EXIF orientation is applied, all by OpenCV's ``IMREAD_COLOR_RGB``; a GIF gives its
first frame (through Pillow where OpenCV < 4.11 cannot read GIF). A file that is empty,
unreadable or a JPEG/PNG/GIF cut short raises :class:`ImageReadError` naming the file.

A JPEG whose entropy-coded data is damaged but whose end marker is intact decodes without an
error, to a partly grey or smeared image; libjpeg only writes "Corrupt JPEG data: ..." to the
process's stderr. :func:`decoder_warning` captures that message for one file, and
:class:`NativeStderr` lets :func:`cvkit.data.check.check_dataset` watch a whole scan for it.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Dict, Iterable, Mapping, Optional, Type, Union

import cv2
import numpy as np

from cvkit.io import atomic_write_json

PathLike = Union[str, os.PathLike]

_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)


class DataError(ValueError):
    """A dataset, file or table does not hold what cvkit expected; the message says where and what."""


class ImageReadError(DataError):
    """An image or mask file is missing, empty, truncated or not an image.

    ``code`` is one of ``missing_file``, ``empty_file``, ``truncated``, ``unreadable``,
    ``corrupt_data`` (or ``bad_mask``), so a report can count problems by kind.
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
    elif head.startswith(b"GIF8"):
        if not tail.endswith(b";"):
            return "GIF is truncated (no trailer byte 3B)"
    return None


def _is_gif(data: np.ndarray) -> bool:
    return bytes(data[:4]) == b"GIF8"


def _decode_gif(data: np.ndarray, path: Path) -> np.ndarray:
    """The first frame of a GIF as RGB uint8, through Pillow (OpenCV reads GIF only from 4.11)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as gif:
            gif.seek(0)
            return np.asarray(gif.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: not a readable GIF ({exc})") from None


def _whole_file(path: Path) -> np.ndarray:
    """The file's bytes, refused with a ``truncated`` ImageReadError when the file was cut off."""
    data = _read_bytes(path)
    problem = truncation_problem(data)
    if problem:
        raise ImageReadError(f"{path}: {problem}", code="truncated")
    return data


def read_image(path: PathLike) -> np.ndarray:
    """Read any OpenCV-readable image as RGB uint8 (H, W, 3), converted as the module says."""
    path = Path(path)
    data = _whole_file(path)
    if _RGB_FLAG is not None:
        image = cv2.imdecode(data, _RGB_FLAG)
    else:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if image is not None:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image is None and _is_gif(data):
        image = _decode_gif(data, path)
    if image is None:
        raise ImageReadError(f"{path}: not a readable image ({data.size} bytes)")
    return image


_JPEG_CORRUPTION = ("Corrupt JPEG data", "Premature end of JPEG file")
_CAPTURE_LOCK = threading.RLock()


class NativeStderr:
    """While active, what anything in the process writes to file descriptor 2 goes to a temporary file.

    libjpeg (inside OpenCV) reports damaged data only there. Process-wide, so one capture at a
    time (a lock); Python's own stderr is flushed around it and :attr:`text` keeps what was
    written. :attr:`terminal` is a stream to the real stderr, for progress bars meanwhile.
    Where file descriptor 2 is closed nothing is captured and :meth:`size` stays 0.
    """

    def __init__(self) -> None:
        self.text = ""
        self.terminal: Optional[io.TextIOBase] = sys.stderr
        self._own_terminal = False
        self._file: Optional[io.BufferedRandom] = None
        self._saved = -1

    def __enter__(self) -> "NativeStderr":
        _CAPTURE_LOCK.acquire()
        try:
            _flush_stderr()
            self._saved = os.dup(2)
            self._file = tempfile.TemporaryFile()
            os.dup2(self._file.fileno(), 2)
            self.terminal = io.TextIOWrapper(os.fdopen(os.dup(self._saved), "wb"), line_buffering=True)
            self._own_terminal = True
        except (OSError, ValueError):  # no fd 2, or no room for the file: capture nothing
            self._restore()
        return self

    def size(self) -> int:
        """Bytes written to stderr so far: a decode that makes it grow may have warned."""
        return os.fstat(self._file.fileno()).st_size if self._file is not None else 0

    def __exit__(self, kind: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        try:
            if self._file is not None:
                self._file.flush()
                _flush_stderr()
                self._file.seek(0)
                self.text = self._file.read().decode(errors="replace")
            self._restore()
        finally:
            _CAPTURE_LOCK.release()

    def _restore(self) -> None:
        if self._saved >= 0:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._saved = -1
        if self._own_terminal and self.terminal is not None:
            self.terminal.close()
            self._own_terminal = False
        self.terminal = sys.stderr
        if self._file is not None:
            self._file.close()
            self._file = None

    def replay(self, skip: Iterable[str] = _JPEG_CORRUPTION) -> None:
        """Write the captured lines to stderr, except those containing one of ``skip``."""
        lines = [line for line in self.text.splitlines(keepends=True) if not any(s in line for s in skip)]
        if lines and sys.stderr is not None:
            sys.stderr.write("".join(lines))
            sys.stderr.flush()


def _flush_stderr() -> None:
    if sys.stderr is not None:
        sys.stderr.flush()


def jpeg_corruption(text: str) -> Optional[str]:
    """libjpeg's first "Corrupt JPEG data" / "Premature end" message in captured stderr ``text``, or None."""
    for line in text.splitlines():
        if any(marker in line for marker in _JPEG_CORRUPTION):
            return line.strip()
    return None


def decoder_warning(path: PathLike) -> Optional[str]:
    """What libjpeg complains about while decoding ``path`` (a JPEG) on its own, or None.

    None also for files that are not JPEG or do not decode at all (:func:`read_image` says why).
    Holds the process-wide stderr capture for the decode, so calls do not overlap.
    """
    data = _read_bytes(Path(path))
    if bytes(data[:2]) != b"\xff\xd8":
        return None
    with NativeStderr() as captured:
        cv2.imdecode(data, cv2.IMREAD_COLOR)
    captured.replay()
    return jpeg_corruption(captured.text)


def read_image_info(path: PathLike) -> Dict[str, object]:
    """Width, height, channels, dtype ("mode") and file size of an image, as stored on disk."""
    path = Path(path)
    data = _read_bytes(path)
    raw = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if raw is None and _is_gif(data):
        raw = _decode_gif(data, path)
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
    data = _whole_file(path)
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


def check_class_map(class_map: Mapping[object, object], source: str = "class map") -> Dict[str, int]:
    """``class_map`` as ``{str label: int index}``, or a one-line :class:`DataError` naming ``source``.

    Indices must be integers 0..N-1, each used once: a gap ({a: 0, c: 2}) would make the model's
    output size disagree with the map, a repeat would merge two classes.
    """
    out: Dict[str, int] = {}
    for key, value in class_map.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise DataError(f"{source}: index of {key!r} is {value!r}; expected integer indices 0..N-1")
        out[str(key)] = int(value)
    by_index: Dict[int, list] = {}
    for key, value in out.items():
        by_index.setdefault(value, []).append(key)
    repeated = {index: keys for index, keys in by_index.items() if len(keys) > 1}
    if repeated:
        index, keys = min(repeated.items())
        raise DataError(f"{source}: index {index} is used by {len(keys)} labels {keys}; "
                        f"expected each of 0..{len(out) - 1} exactly once")
    missing = sorted(set(range(len(out))) - set(by_index))
    if missing:
        raise DataError(f"{source}: indices {sorted(by_index)[:20]} are not 0..{len(out) - 1} without gaps "
                        f"(index {missing[0]} is missing); expected each of 0..{len(out) - 1} once")
    return out


def load_class_map(path: PathLike) -> Dict[str, int]:
    """Read a class map written by :func:`save_class_map` (e.g. ``encode_classes.json``), checked as
    :func:`check_class_map` says."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"class map not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); expected {{label name: index}}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{path}: holds a JSON {type(raw).__name__}; expected an object {{label name: integer index}}")
    return check_class_map(raw, str(path))
