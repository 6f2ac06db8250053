"""One resize plan: how a source image reaches the network's size in one resampling, from a reduced decode.

Three readers share this geometry: :class:`cvkit.data.warp.OneWarp` (every pipeline's first step),
:func:`cvkit.data.io.decode_for_resize` (files read for prediction without the training stack) and
:class:`cvkit.inference.runtime.Preprocess` (an exported model's input). Each asks the same three
questions here: the decode scale (:func:`decode_scale`, :func:`resize_decode_scale`), the map of a
source window onto the output (:func:`window_matrix`), and where a reduced decode's pixels sit in
the full-size source (:func:`reduced_window`: reduced pixel ``j`` covers source pixels
``[j r, (j + 1) r)``, so the last row/column of a side that ``r`` does not divide is a partial block).
OpenCV and numpy only: no torch, no albumentations.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import cv2
import numpy as np

REDUCE_FACTORS = (1, 2, 4, 8)
# Masks follow cv2.resize's nearest grid (source = floor(dst / k)); warpAffine rounds, so the
# mask matrix sits half a pixel over, less this margin that keeps exact ties on the floor side.
NEAREST_MARGIN = 1.0 / 512
# A stretch is shrunk by this before it bounds the decode, so an exact fit never upsamples by rounding.
_STRETCH_SLACK = 1 - 1e-9


class ReducedWindow(NamedTuple):
    """The decoded pixels covering a source window: rows/cols to slice, their map to full-size source
    coordinates (3x3) and whether the window lies on whole blocks (then the slice is the window exactly)."""

    rows: slice
    cols: slice
    to_source: np.ndarray
    whole_blocks: bool


def decoded_shape(source_hw: Tuple[int, int], reduce: int) -> Tuple[int, int]:
    """(height, width) of a ``source_hw`` image decoded at 1/``reduce``: ceil(H / r) x ceil(W / r)."""
    return -(-int(source_hw[0]) // reduce), -(-int(source_hw[1]) // reduce)


def decode_scale(source_hw: Tuple[int, int], needed_hw: Tuple[float, float]) -> int:
    """The largest ``reduce`` in (1, 2, 4, 8) whose decode of a ``source_hw`` image still has at
    least ``needed_hw`` pixels (ceil(H / s) >= needed_h and ceil(W / s) >= needed_w).

    No output pixel is upsampled from a reduced decode. ``needed_hw`` is the smallest source size
    that must not be upsampled: the source region mapped onto the output, divided by how much the
    output shrinks it. 1 when even the full image is smaller than that.
    """
    height, width = source_hw
    if height < 1 or width < 1:
        raise ValueError(f"decode_scale: source size {tuple(source_hw)}; expected positive (height, width)")
    needed_h, needed_w = needed_hw
    for scale in reversed(REDUCE_FACTORS):
        if math.ceil(height / scale) >= needed_h and math.ceil(width / scale) >= needed_w:
            return scale
    return 1


def needed_source(source_hw: Tuple[int, int], stretch: float) -> Tuple[float, float]:
    """(height, width) a ``source_hw`` image may shrink to before a map stretching by at most ``stretch``
    upsamples an output pixel from it."""
    stretch *= _STRETCH_SLACK
    return source_hw[0] * stretch, source_hw[1] * stretch


def resize_decode_scale(source_hw: Tuple[int, int], size_hw: Tuple[int, int]) -> int:
    """The decode scale of a plain resize of ``source_hw`` to ``size_hw`` (the ``resize`` pipeline's)."""
    stretch = max(size_hw[0] / source_hw[0], size_hw[1] / source_hw[1])
    return decode_scale(source_hw, needed_source(source_hw, stretch))


def reduce_of(source_hw: Tuple[int, int], image_hw: Tuple[int, int]) -> int:
    """The scale at which ``image_hw`` is a decode of a ``source_hw`` image (1 when none fits)."""
    return next((r for r in REDUCE_FACTORS if decoded_shape(source_hw, r) == tuple(image_hw)), 1)


def _matrix(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def window_matrix(window: Tuple[int, int, int, int], out_hw: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    """3x3 map of the source window ``(x0, y0, x1, y1)`` stretched onto ``out_hw``: pixel centres onto
    pixel centres (``cv2.resize``'s bilinear grid), or with ``nearest`` onto ``cv2.resize``'s nearest grid."""
    x0, y0, x1, y1 = window
    kx, ky = out_hw[1] / (x1 - x0), out_hw[0] / (y1 - y0)
    shift = 0.5 - NEAREST_MARGIN if nearest else 0.5
    centre = 0.0 if nearest else 0.5
    return _matrix(kx, 0.0, (shift - x0) * kx - centre, 0.0, ky, (shift - y0) * ky - centre)


def reduced_window(window: Tuple[int, int, int, int], reduce: int, decoded_hw: Tuple[int, int]) -> ReducedWindow:
    """The pixels of a 1/``reduce`` decode (``decoded_hw``) covering the full-size source ``window``."""
    x0, y0, x1, y1 = window
    whole = not (x0 % reduce or y0 % reduce or x1 % reduce or y1 % reduce)
    rx0, ry0 = x0 // reduce, y0 // reduce
    rx1, ry1 = min(decoded_hw[1], -(-x1 // reduce)), min(decoded_hw[0], -(-y1 // reduce))
    # reduced pixel j covers source pixels [j r, (j + 1) r): its centre is source pixel (j + 0.5) r - 0.5
    to_source = _matrix(reduce, 0.0, (rx0 + 0.5) * reduce - 0.5, 0.0, reduce, (ry0 + 0.5) * reduce - 0.5)
    return ReducedWindow(slice(ry0, ry1), slice(rx0, rx1), to_source, whole)


def warp(image: np.ndarray, matrix: np.ndarray, size_wh: Tuple[int, int], flags: int, border: int) -> np.ndarray:
    """``cv2.warpAffine`` for any channel count: uint8 RGB as RGBA (OpenCV's vectorised path; nearest stays RGB),
    more than four channels in groups of four; the channel axis kept as it came."""
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and flags != cv2.INTER_NEAREST:
        rgba = cv2.warpAffine(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), matrix, size_wh, flags=flags,
                              borderMode=border, borderValue=(0, 0, 0, 0))
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    if image.ndim == 3 and image.shape[2] > 4:
        parts = [warp(image[..., k:k + 4], matrix, size_wh, flags, border) for k in range(0, image.shape[2], 4)]
        return np.concatenate([p if p.ndim == 3 else p[..., None] for p in parts], axis=2)
    out = cv2.warpAffine(image, matrix, size_wh, flags=flags, borderMode=border, borderValue=(0, 0, 0, 0))
    return keep_channels(out, image)


def keep_channels(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """OpenCV returns (H, W) for an (H, W, 1) input: put the channel axis back."""
    return out[..., None] if like.ndim == 3 and out.ndim == 2 else out


def resize(image: np.ndarray, size_hw: Tuple[int, int], source_hw: Optional[Tuple[int, int]] = None,
           interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """``image`` (the whole ``source_hw`` source, or its reduced decode) resized to ``size_hw`` in one
    resampling, as the ``resize`` pipeline maps it: ``cv2.resize`` when the decode is on whole blocks,
    else one warp that reads a partial last block as the part of it that is image."""
    source_hw = tuple(source_hw or image.shape[:2])
    reduce = reduce_of(source_hw, image.shape[:2])
    window = (0, 0, source_hw[1], source_hw[0])
    cells = reduced_window(window, reduce, image.shape[:2])
    if cells.whole_blocks:
        return keep_channels(cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=interpolation), image)
    matrix = window_matrix(window, size_hw) @ cells.to_source
    return warp(image, matrix[:2], (size_hw[1], size_hw[0]), interpolation, cv2.BORDER_REPLICATE)


__all__ = ["NEAREST_MARGIN", "REDUCE_FACTORS", "ReducedWindow", "decode_scale", "decoded_shape", "keep_channels",
           "needed_source", "reduce_of", "reduced_window", "resize", "resize_decode_scale", "warp", "window_matrix"]
