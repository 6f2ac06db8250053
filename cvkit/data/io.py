"""One way to read images and masks, the data-layer exceptions, and the class map file.

Every image cvkit trains on goes through :func:`read_image`, which returns RGB uint8 H x W x 3
whatever the file holds: grayscale is replicated to three channels, alpha is dropped (the
colour underneath is kept, not composited), 16-bit samples are shifted down to their top 8 bits
(``v >> 8``) and EXIF orientation is applied, all by OpenCV's ``IMREAD_COLOR_RGB``; a GIF gives its
first frame (through Pillow where OpenCV < 4.11 cannot read GIF). A file that is empty,
unreadable or a JPEG/PNG/GIF cut short raises :class:`ImageReadError` naming the file.

:func:`read_image` with ``reduce`` 2, 4 or 8 returns the image scaled down by that factor to
ceil(H / reduce) x ceil(W / reduce), each pixel standing for a ``reduce`` x ``reduce`` block: a JPEG
is decoded at that scale by libjpeg's DCT scaling (``IMREAD_REDUCED_COLOR_*``, a fraction of the
full decode's time), anything else is decoded in full and block-averaged (``INTER_AREA``).
:func:`image_header` / :func:`image_size` give the size :func:`read_image` will return from a
JPEG's or PNG's header alone, and :func:`~cvkit.data.resize_plan.decode_scale` picks the largest
``reduce`` a crop can afford, so a loader can decode only the pixels it needs.

Every reader refuses, before decoding, an image whose header claims more pixels than
:func:`max_image_pixels` (:data:`MAX_IMAGE_PIXELS`, or ``$CVKIT_MAX_IMAGE_PIXELS``), with an
:class:`ImageTooLargeError`: a few bytes of JPEG, PNG, GIF, BMP or WebP header can otherwise claim a
100000 x 100000 image and make the decoder allocate gigabytes.

A JPEG whose entropy-coded data is damaged but whose end marker is intact decodes without an
error, to a partly grey or smeared image; libjpeg only writes "Corrupt JPEG data: ..." to the
process's stderr. :func:`decoder_warning` captures that message for one file, and
:class:`NativeStderr` lets :func:`cvkit.data.check.check_dataset` watch a whole scan for it.
"""
from __future__ import annotations

import io
import json
import os
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Type, Union

import cv2
import numpy as np

from cvkit.data.resize_plan import REDUCE_FACTORS, decode_scale, decoded_shape, resize_decode_scale  # noqa: F401
from cvkit.errors import DataError
from cvkit.io import atomic_write_json

PathLike = Union[str, os.PathLike]

_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)
# The most pixels (height x width, from the header) any reader decodes: 8000 x 8000, 192 MB as RGB uint8.
MAX_IMAGE_PIXELS = 64_000_000
PIXELS_ENV = "CVKIT_MAX_IMAGE_PIXELS"


class ImageReadError(DataError):
    """An image or mask file is missing, empty, truncated or not an image.

    ``code`` is one of ``missing_file``, ``empty_file``, ``truncated``, ``unreadable``,
    ``corrupt_data``, ``too_large`` (or ``bad_mask``), so a report can count problems by kind.
    """

    def __init__(self, message: str, code: str = "unreadable") -> None:
        super().__init__(message)
        self.code = code


class ImageTooLargeError(ImageReadError):
    """An image whose header claims more pixels than :func:`max_image_pixels`; refused before decoding."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="too_large")


class TableError(DataError):
    """A CSV/table lacks a column, or a cell does not parse as the declared type."""


class LabelError(DataError):
    """A label is not in the class map."""


class DatasetCheckError(DataError):
    """:func:`cvkit.data.check.check_dataset` found bad rows; ``report`` lists every one."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


def max_image_pixels(value: Optional[int] = None) -> int:
    """The pixel cap: ``value`` when given, else ``$CVKIT_MAX_IMAGE_PIXELS`` when set, else :data:`MAX_IMAGE_PIXELS`."""
    if value is None:
        raw = os.environ.get(PIXELS_ENV, "").strip()
        if not raw:
            return MAX_IMAGE_PIXELS
        if not raw.isdigit() or int(raw) < 1:
            raise DataError(f"${PIXELS_ENV}={raw!r}: expected a positive whole number of pixels "
                            f"(default {MAX_IMAGE_PIXELS})")
        return int(raw)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"max_pixels={value!r}: expected a positive whole number of pixels")
    return int(value)


def check_pixels(height: int, width: int, where: str, max_pixels: Optional[int] = None) -> None:
    """An :class:`ImageTooLargeError` naming ``where`` when a ``height`` x ``width`` image is over the pixel cap."""
    cap = max_image_pixels(max_pixels)
    if height * width > cap:
        hint = f" (set {PIXELS_ENV} to raise it)" if max_pixels is None else ""
        raise ImageTooLargeError(f"{where}: the header claims a {width}x{height} image ({height * width:,} pixels), "
                                 f"over the cap of {cap:,} pixels{hint}")


def _refuse_oversized(data: np.ndarray, where: str, header: Optional["ImageHeader"] = None,
                      max_pixels: Optional[int] = None) -> None:
    """:func:`check_pixels` on the size the header of ``data`` claims (``header`` when the caller parsed it)."""
    size = (header.height, header.width) if header is not None else _claimed_size(data)
    if size is not None:
        check_pixels(size[0], size[1], where, max_pixels)


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


def _decode_gif(data: np.ndarray, path: Union[str, Path]) -> np.ndarray:
    """The first frame of a GIF as RGB uint8, through Pillow (OpenCV reads GIF only from 4.11)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.tobytes())) as gif:
            gif.seek(0)
            return np.asarray(gif.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{path}: not a readable GIF ({exc})") from None


def _whole_file(path: Path) -> np.ndarray:
    """The file's bytes, refused with a ``truncated`` ImageReadError when the file was cut off."""
    data = _read_bytes(path)
    problem = truncation_problem(data)
    if problem:
        raise ImageReadError(f"{path}: {problem}", code="truncated")
    return data


_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def read_image(path: PathLike, reduce: int = 1, header: Optional["ImageHeader"] = None,
               max_pixels: Optional[int] = None) -> np.ndarray:
    """Read any OpenCV-readable image as RGB uint8 (H, W, 3), converted as the module says.

    ``reduce`` (1, 2, 4 or 8) shrinks the result to ceil(H / reduce) x ceil(W / reduce), EXIF
    orientation applied as for ``reduce=1``; the file is still checked whole (truncation, GIF, errors).
    Pixel (i, j) of a reduced image stands for source pixels [r*i, r*i + r) x [r*j, r*j + r)
    (r = ``reduce``; edge pixels repeated past the border), so a source coordinate x is x / r there.
    ``header``: the file's :func:`image_header` when the caller already has it (not parsed again).
    ``max_pixels``: the pixel cap (default :func:`max_image_pixels`).
    """
    _check_reduce(reduce)
    path = Path(path)
    return _decode(_whole_file(path), str(path), reduce, header, max_pixels)


def _decode(data: np.ndarray, where: str, reduce: int, header: Optional["ImageHeader"],
            max_pixels: Optional[int] = None) -> np.ndarray:
    """:func:`read_image` after the file checks: encoded bytes to RGB uint8 at 1/``reduce``, refused
    (:class:`ImageTooLargeError`) before decoding when the header claims more than ``max_pixels``."""
    if data.size == 0:
        raise ImageReadError(f"{where}: not a readable image (0 bytes)", code="empty_file")
    _refuse_oversized(data, where, header, max_pixels)
    if reduce > 1 and _is_jpeg(data):
        reduced = _decode_jpeg_reduced(data, reduce, where, header)
        if reduced is not None:
            return reduced
    image = _decode_rgb(data, cv2.IMREAD_COLOR, where)
    if image is None and _is_gif(data):
        image = _decode_gif(data, where)
    if image is None:
        raise ImageReadError(f"{where}: not a readable image ({data.size} bytes)")
    return image if reduce == 1 else _block_mean(image, reduce)


def _block_mean(image: np.ndarray, reduce: int) -> np.ndarray:
    """The mean of each ``reduce`` x ``reduce`` block, the last row/column of blocks completed by
    repeating the edge pixels: the same geometry as libjpeg's scaled decode.

    A plain ``INTER_AREA`` resize to the ceil shape would stretch blocks when a side is not a
    multiple of ``reduce`` and drift by up to one source pixel (mean abs difference 3-8 grey
    levels against libjpeg on china.jpg, below 1 with the padding).
    """
    height, width = image.shape[:2]
    rows, cols = decoded_shape((height, width), reduce)
    padded = cv2.copyMakeBorder(image, 0, rows * reduce - height, 0, cols * reduce - width, cv2.BORDER_REPLICATE)
    return cv2.resize(padded, (cols, rows), interpolation=cv2.INTER_AREA)


def _check_reduce(reduce: object) -> None:
    if isinstance(reduce, bool) or not isinstance(reduce, (int, np.integer)) or reduce not in REDUCE_FACTORS:
        raise ValueError(f"read_image: reduce={reduce!r}; expected one of {REDUCE_FACTORS}")


def _is_jpeg(data: np.ndarray) -> bool:
    return bytes(data[:2]) == b"\xff\xd8"


def _imdecode(data: np.ndarray, flags: int, where: str) -> Optional[np.ndarray]:
    """``cv2.imdecode``; its own refusals (an assertion on a size it will not allocate...) as one-line
    ImageReadErrors."""
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        raise ImageReadError(f"{where}: not a readable image ({data.size} bytes; OpenCV refused to decode it)"
                             ) from None


def _decode_rgb(data: np.ndarray, color_flag: int, where: str) -> Optional[np.ndarray]:
    """``cv2.imdecode`` with ``color_flag`` (IMREAD_COLOR or a IMREAD_REDUCED_COLOR_*) giving RGB.

    OpenCV 5 refuses IMREAD_COLOR_RGB together with the IMREAD_COLOR bit that the reduced flags
    contain, so that bit is swapped for the RGB one; older OpenCV decodes BGR and converts.
    """
    if _RGB_FLAG is not None:
        return _imdecode(data, (color_flag & ~cv2.IMREAD_COLOR) | _RGB_FLAG, where)
    image = _imdecode(data, color_flag, where)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_jpeg_reduced(data: np.ndarray, reduce: int, where: str, header: Optional["ImageHeader"] = None
                         ) -> Optional[np.ndarray]:
    """libjpeg's scaled decode, or None (decode in full and shrink instead) when the header does
    not parse, the scaled decode fails or its shape is not the promised ceil shape."""
    header = header or _parse_header(_Window(memoryview(data)))
    if header is None:
        return None
    image = _decode_rgb(data, _REDUCED_FLAGS[reduce], where)
    expected = (*decoded_shape((header.height, header.width), reduce), 3)
    if image is None or image.shape != expected:
        return None
    return image


def read_image_for_resize(path: PathLike, size_hw: Optional[Tuple[int, int]], max_pixels: Optional[int] = None
                          ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """``path`` decoded for a plain resize to ``size_hw`` (None: no resize), with its full (height, width).

    A JPEG is decoded at the largest 1/2-1/8 scale from which the resize upsamples no output pixel,
    as cvkit's ``resize`` pipeline decodes it (:class:`cvkit.data.warp.OneWarp`); in full when the
    header is unknown or disagrees with the decoder. For prediction without the training stack.
    ``max_pixels``: the pixel cap (default :func:`max_image_pixels`).
    """
    path = Path(path)
    return decode_for_resize(_read_bytes(path), size_hw, str(path), max_pixels)


def decode_for_resize(data: Union[bytes, np.ndarray], size_hw: Optional[Tuple[int, int]], where: str = "image",
                      max_pixels: Optional[int] = None) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Encoded image bytes decoded as :func:`read_image_for_resize` decodes a file (``where`` names them
    in errors): the image at the scale chosen for ``size_hw`` and the full (height, width).

    Refused as a file is: cut short (``truncated``), or a header claiming more than ``max_pixels``
    (:func:`max_image_pixels`) pixels (:class:`ImageTooLargeError`, before any decoding)."""
    array = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else data
    problem = truncation_problem(array) if array.size else None
    if problem:
        raise ImageReadError(f"{where}: {problem}", code="truncated")
    header = _parse_header(_Window(memoryview(array))) if size_hw is not None and array.size else None
    if header is not None:
        full = (header.height, header.width)
        reduce = resize_decode_scale(full, size_hw)
        image = _decode(array, where, reduce, header, max_pixels)
        if image.shape[:2] == decoded_shape(full, reduce):
            return image, full
    image = _decode(array, where, 1, None, max_pixels)
    return image, (image.shape[0], image.shape[1])


@dataclass(frozen=True)
class ImageHeader:
    """What a JPEG's or PNG's header says about the image :func:`read_image` will return.

    ``height`` and ``width`` are after the EXIF orientation (swapped for orientations 5-8);
    ``orientation`` is the EXIF value OpenCV applies (1 when none); ``format`` "jpeg" or "png".
    """

    height: int
    width: int
    orientation: int
    format: str


_HEAD_BYTES = 64 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# SOF markers of every JPEG process: C0-C3, C5-C7, C9-CB, CD-CF (C4 = DHT, C8 = JPG, CC = DAC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}


class _Window:
    """Bytes of a file by offset: the first 64 KiB read once, anything further read on demand.

    Holds the whole content when ``handle`` is None (an image already in memory).
    """

    def __init__(self, head: Union[bytes, memoryview], handle: Optional[BinaryIO] = None) -> None:
        self.head = head
        self.handle = handle

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the file)."""
        if self.handle is None or offset + size <= len(self.head):
            return bytes(self.head[offset:offset + size])
        self.handle.seek(offset)
        return self.handle.read(size)


def image_header(path: PathLike) -> Optional[ImageHeader]:
    """The size and EXIF orientation of the image :func:`read_image` returns, from the header alone.

    Reads the first 64 KiB and, only where segments run past them, the few bytes needed further
    on; no pixel is decoded. None for a format other than JPEG/PNG, a file that cannot be opened,
    or a header that does not parse or that OpenCV might read differently: callers then decode in full.
    """
    try:
        with open(path, "rb", buffering=0) as handle:
            head = handle.read(_HEAD_BYTES)
            return _parse_header(_Window(head, handle if len(head) == _HEAD_BYTES else None))
    except OSError:
        return None


def image_size(path: PathLike) -> Optional[Tuple[int, int]]:
    """(height, width) of ``read_image(path)`` from the file's header, or None as :func:`image_header` says."""
    header = image_header(path)
    return None if header is None else (header.height, header.width)


def _parse_header(window: _Window) -> Optional[ImageHeader]:
    start = window.read(0, 8)
    try:
        if start.startswith(b"\xff\xd8"):
            return _jpeg_header(window)
        if start == _PNG_SIGNATURE:
            return _png_header(window)
    except struct.error:  # a length field pointing past the end of the file
        return None
    return None


def _oriented(height: int, width: int, orientation: int, kind: str) -> ImageHeader:
    if orientation >= 5:
        height, width = width, height
    return ImageHeader(height=height, width=width, orientation=orientation, format=kind)


def _jpeg_segments(window: _Window) -> Iterator[Tuple[int, int, int]]:
    """``(marker, offset of its length field, length)`` of each JPEG segment after SOI, the last one SOS
    (``0xDA``, offset, 0); it stops early where the markers do not parse (a byte other than FF, EOI
    before any scan, a length below 2) and raises ``struct.error`` at the end of the data."""
    pos = 2
    while True:
        if window.read(pos, 1) != b"\xff":
            return
        while window.read(pos, 1) == b"\xff":  # a marker may be preceded by fill bytes
            pos += 1
        marker = window.read(pos, 1)
        if not marker:
            return
        code = marker[0]
        pos += 1
        if code in _JPEG_STANDALONE:
            continue
        if code == 0xD9:  # EOI before any scan
            return
        if code == 0xDA:  # SOS: the header is over
            yield code, pos, 0
            return
        (length,) = struct.unpack(">H", window.read(pos, 2))
        if length < 2:
            return
        yield code, pos, length
        pos += length


def _jpeg_frame(window: _Window, pos: int) -> Optional[Tuple[int, int]]:
    """(height, width) of the SOF segment at ``pos``; None when the height is 0 (given later by a DNL marker)."""
    _, height, width = struct.unpack(">BHH", window.read(pos + 2, 5))
    return (height, width) if height and width else None


def _jpeg_header(window: _Window) -> Optional[ImageHeader]:
    """Walk the markers from SOI to SOS: the frame size from SOF, the orientation from the first
    "Exif" APP1 (OpenCV honours one placed before or after SOF, so the walk goes on to SOS)."""
    size: Optional[Tuple[int, int]] = None
    orientation: Optional[int] = None
    scanned = False
    for code, pos, length in _jpeg_segments(window):
        if code == 0xDA:
            scanned = True
        elif code in _JPEG_SOF and size is None:
            size = _jpeg_frame(window, pos)
            if size is None:
                return None
        elif code == 0xE1 and orientation is None:
            payload = window.read(pos + 2, length - 2)
            if payload.startswith(b"Exif\x00\x00"):
                orientation = _exif_orientation(payload[6:])
                if orientation is None:
                    return None
    if not scanned or size is None:
        return None
    return _oriented(size[0], size[1], orientation or 1, "jpeg")


def _claimed_size(data: np.ndarray) -> Optional[Tuple[int, int]]:
    """(height, width) as stored that the header of a JPEG (first SOF), PNG (IHDR), GIF (logical screen),
    BMP or WebP claims, read from the first bytes whatever follows; None for other formats or no such header."""
    window = _Window(memoryview(data))
    head = window.read(0, 30)
    try:
        if head.startswith(b"\xff\xd8"):
            frames = (pos for code, pos, _ in _jpeg_segments(window) if code in _JPEG_SOF)
            return next((_jpeg_frame(window, pos) for pos in frames), None)
        if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return height, width
        if head.startswith(b"GIF8"):
            width, height = struct.unpack("<HH", head[6:10])
            return height, width
        if head.startswith(b"BM"):
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
                width, height = struct.unpack("<HH", head[18:22])
            else:
                width, height = struct.unpack("<ii", head[18:26])
            return abs(height), abs(width)
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp_size(head)
    except struct.error:  # a header cut short
        return None
    return None


def _webp_size(head: bytes) -> Optional[Tuple[int, int]]:
    """(height, width) of a WebP's canvas (VP8X), lossless (VP8L) or lossy (VP8) bitstream header."""
    kind = head[12:16]
    if kind == b"VP8X":
        width, height = (int.from_bytes(head[at:at + 3], "little") + 1 for at in (24, 27))
        return height, width
    if kind == b"VP8L" and head[20:21] == b"\x2f":
        (bits,) = struct.unpack("<I", head[21:25])
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return height & 0x3FFF, width & 0x3FFF
    return None


def _png_header(window: _Window) -> Optional[ImageHeader]:
    """IHDR for the size, then chunk headers up to IEND for an eXIf chunk (OpenCV applies its
    orientation wherever it stands, even after IDAT; the walk reads 8 bytes per chunk)."""
    length, kind, width, height = struct.unpack(">I4sII", window.read(8, 16))
    if kind != b"IHDR" or length != 13 or width == 0 or height == 0:
        return None
    pos = 8 + 12 + length
    while True:
        length, kind = struct.unpack(">I4s", window.read(pos, 8))
        if kind == b"IEND":
            return _oriented(height, width, 1, "png")
        if kind == b"eXIf":
            orientation = _exif_orientation(window.read(pos + 8, length))
            return None if orientation is None else _oriented(height, width, orientation, "png")
        pos += 12 + length


def _exif_orientation(tiff: bytes) -> Optional[int]:
    """The Orientation tag (0x0112) of IFD0 in TIFF-structured EXIF data, as OpenCV applies it.

    1 when the tag is absent or outside 1..8 (OpenCV then leaves the image as stored); None when
    the structure does not parse or the tag is not one SHORT (OpenCV's reading is then unclear).
    """
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(tiff[:4])
    if order is None or len(tiff) < 8:
        return None
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if entry + 12 > len(tiff):
            return None
        tag, kind, values, value = struct.unpack(order + "HHIH", tiff[entry:entry + 10])
        if tag == 0x0112:
            if kind != 3 or values != 1:
                return None
            return value if 1 <= value <= 8 else 1
    return 1


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
    _refuse_oversized(data, str(path))
    with NativeStderr() as captured:
        cv2.imdecode(data, cv2.IMREAD_COLOR)
    captured.replay()
    return jpeg_corruption(captured.text)


def read_image_info(path: PathLike) -> Dict[str, object]:
    """Width, height, channels, dtype ("mode") and file size of an image, as stored on disk."""
    path = Path(path)
    data = _read_bytes(path)
    _refuse_oversized(data, str(path))
    raw = _imdecode(data, cv2.IMREAD_UNCHANGED, str(path))
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
    _refuse_oversized(data, str(path))
    mask = _imdecode(data, cv2.IMREAD_UNCHANGED, str(path))
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
