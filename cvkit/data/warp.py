"""One warp per image: the geometric part of a pipeline as one matrix and one resampling.

:class:`OneWarp` draws what ``A.RandomResizedCrop(size, scale, ratio)``, ``A.HorizontalFlip(p)``
and ``A.Affine(scale, translate_percent, rotate, shear, p)`` (albumentations 2.0.8, constant black
border) would draw, in the same order from the same random stream, composes crop, resize, flip and
affine into one 2x3 matrix from source pixels to the output and resamples the image once, bilinear,
instead of two or three times: sharper, and it reads only the source pixels it needs. That is one
``cv2.warpAffine`` (RGB warped as RGBA, OpenCV's vectorised path), or, when the map is axis-aligned
on whole source pixels (no affine), one ``cv2.resize`` of the crop window: the same map, faster.
The evaluation pipelines are the modes ``resize`` (``A.Resize``) and ``letterbox``
(``A.LongestMaxSize(max_size_hw=size)`` + a centred ``A.PadIfNeeded`` with black).

Targets keep albumentations' own conventions step by step: keypoints as each step moves them
(crop and resize as continuous coordinates, flip to ``W - 1 - x``, affine about the pixel centre
``(W / 2 - 0.5, H / 2 - 0.5)``), boxes as each step moves them with the pipeline's box filter
(clipping) between steps (a box is clipped to the crop window before it is rotated), masks with
nearest neighbour on ``cv2.resize``'s grid then the flip and affine. Colour steps come after, on
the small output image.

Reduced decoding: the parameters depend on the source size only, so a loader that knows the
size from the file's header can ask :func:`needed_source_size` how many source pixels the next
call needs, decode the file at 1/2, 1/4 or 1/8 scale (:func:`cvkit.data.io.read_image` with
``reduce``) and pass ``warp_source=WarpSource(height, width, reduce)`` with the reduced image: the
same draw then maps the reduced pixels (reduced pixel j covers source pixels [j r, (j + 1) r)) to
the same output, and boxes and keypoints, given for the full-size image, come out the same.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.geometric.functional import (
    bboxes_affine_largest_box,
    create_affine_transformation_matrix,
    rotation2d_matrix_to_euler_angles,
    validate_bboxes,
)
from albumentations.core.bbox_utils import filter_bboxes

from cvkit.data.resize_plan import keep_channels as _keep_channels
from cvkit.data.resize_plan import decoded_shape, needed_source, reduced_window, window_matrix
from cvkit.data.resize_plan import warp as _warp

SOURCE_KEY = "warp_source"
MODES = ("crop", "resize", "letterbox")


class WarpSource(NamedTuple):
    """What the image handed to :class:`OneWarp` is: the ``height`` x ``width`` source decoded at 1/``reduce``."""

    height: int
    width: int
    reduce: int


class AffineDraw(NamedTuple):
    """One draw of ``A.Affine``: translation in output pixels, shear in degrees as its matrix takes it."""

    translate_x: int
    translate_y: int
    shear_x: float
    shear_y: float
    scale_x: float
    scale_y: float
    rotate: float


@dataclass(frozen=True)
class WarpParams:
    """One draw of :class:`OneWarp` for a ``height`` x ``width`` source.

    ``crop`` is (x_min, y_min, x_max, y_max) in source pixels (the whole image outside ``crop`` mode).
    """

    height: int
    width: int
    crop: Tuple[int, int, int, int]
    flip: bool
    affine: Optional[AffineDraw]


def _pair(value: Any, name: str) -> Tuple[float, float]:
    """``(low, high)`` from a pair (a YAML list too) or one number ``v`` (meaning ``(-v, v)``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (-float(value), float(value))
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        low, high = float(value[0]), float(value[1])
        if low > high:
            raise ValueError(f"OneWarp: {name}={list(value)}; expected (low, high) with low <= high")
        return (low, high)
    raise ValueError(f"OneWarp: {name}={value!r}; expected a (low, high) pair of numbers")


def _probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"OneWarp: {name}={value!r}; expected a probability in [0, 1]")
    return float(value)


def _applies(p: float, rng: random.Random) -> bool:
    """``BasicTransform.should_apply``: no draw at 0 or 1, one draw in between."""
    if p <= 0.0:
        return False
    return p >= 1.0 or rng.random() < p


def _matrix(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def largest_stretch(matrix: np.ndarray) -> float:
    """The largest factor by which the linear part of a 2x3/3x3 ``matrix`` stretches any direction."""
    a, b, c, d = float(matrix[0, 0]), float(matrix[0, 1]), float(matrix[1, 0]), float(matrix[1, 1])
    total, det = a * a + b * b + c * c + d * d, a * d - b * c
    return math.sqrt((total + math.sqrt(max(total * total - 4 * det * det, 0.0))) / 2)


class OneWarp(A.DualTransform):
    """Random resized crop (or resize / letterbox), horizontal flip and affine in one warp.

    ``size`` is the output (height, width). ``mode``: ``"crop"`` (``A.RandomResizedCrop(size,
    scale, ratio)``, including its centre-crop fallback), ``"resize"`` or ``"letterbox"``.
    ``hflip`` is the flip's probability; ``affine`` the affine's, with ``affine_scale``,
    ``translate_percent``, ``rotate`` (degrees) and ``shear`` (degrees) drawn as ``A.Affine`` draws
    them (x and y independently for scale, translation and shear). Always applied (``p`` = 1): each
    step has its own probability. See the module for targets and reduced decoding.
    """

    def __init__(self, size: Sequence[int], mode: str = "crop", scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (0.75, 4 / 3), hflip: float = 0.0, affine: float = 0.0,
                 affine_scale: Sequence[float] = (1.0, 1.0), translate_percent: Sequence[float] = (0.0, 0.0),
                 rotate: Sequence[float] = (0.0, 0.0), shear: Sequence[float] = (0.0, 0.0), p: float = 1.0) -> None:
        super().__init__(p=p)
        if p != 1.0:
            raise ValueError(f"OneWarp: p={p!r}; it always applies (set hflip / affine for its steps)")
        if (not isinstance(size, Sequence) or len(size) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in size)):
            raise ValueError(f"OneWarp: size={size!r}; expected (height, width) integers >= 1")
        if mode not in MODES:
            raise ValueError(f"OneWarp: mode={mode!r}; expected one of {', '.join(MODES)}")
        self.size = (int(size[0]), int(size[1]))
        self.mode = mode
        self.scale, self.ratio = _pair(scale, "scale"), _pair(ratio, "ratio")
        if not 0.0 < self.scale[0] or self.ratio[0] <= 0.0:
            raise ValueError(f"OneWarp: scale={list(scale)}, ratio={list(ratio)}; expected both > 0")
        self.hflip, self.affine = _probability(hflip, "hflip"), _probability(affine, "affine")
        self.affine_scale = _pair(affine_scale, "affine_scale")
        self.translate_percent = _pair(translate_percent, "translate_percent")
        self.rotate, self.shear = _pair(rotate, "rotate"), _pair(shear, "shear")

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("size", "mode", "scale", "ratio", "hflip", "affine", "affine_scale", "translate_percent",
                "rotate", "shear")

    # --- drawing ---------------------------------------------------------------------------------

    def sample(self, height: int, width: int, rng: random.Random) -> WarpParams:
        """Draw the parameters for a ``height`` x ``width`` source from ``rng``, in the order and with the
        distributions of RandomResizedCrop, HorizontalFlip and Affine run one after the other."""
        crop = self._random_crop(height, width, rng) if self.mode == "crop" else (0, 0, width, height)
        flip = _applies(self.hflip, rng)
        affine = None
        if _applies(self.affine, rng):
            out_h, out_w = self.size
            tx, ty = rng.uniform(*self.translate_percent), rng.uniform(*self.translate_percent)
            shear_x, shear_y = -rng.uniform(*self.shear), -rng.uniform(*self.shear)
            scale_x, scale_y = rng.uniform(*self.affine_scale), rng.uniform(*self.affine_scale)
            affine = AffineDraw(int(tx * out_w), int(ty * out_h), shear_x, shear_y, scale_x, scale_y,
                                rng.uniform(*self.rotate))
        return WarpParams(height, width, crop, flip, affine)

    def _random_crop(self, height: int, width: int, rng: random.Random) -> Tuple[int, int, int, int]:
        """``A.RandomResizedCrop.get_params_dependent_on_data``'s crop: ten tries, then a centre crop."""
        area = height * width
        low_area, high_area = self.scale[0] * area, self.scale[1] * area
        low_ratio, high_ratio = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = rng.uniform(low_area, high_area)
            aspect = math.exp(rng.uniform(low_ratio, high_ratio))
            crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                h_start, w_start = rng.random(), rng.random()
                y0, x0 = int((height - crop_h + 1) * h_start), int((width - crop_w + 1) * w_start)
                return x0, y0, x0 + crop_w, y0 + crop_h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            crop_w, crop_h = round(height * self.ratio[1]), height
        else:
            crop_w, crop_h = width, height
        y0, x0 = (height - crop_h) // 2, (width - crop_w) // 2
        return x0, y0, x0 + crop_w, y0 + crop_h

    # --- geometry --------------------------------------------------------------------------------

    def _letterbox(self, params: WarpParams) -> Tuple[float, int, int, int, int]:
        """(scale, new height, new width, pad top, pad left) of LongestMaxSize(max_size_hw) + PadIfNeeded."""
        out_h, out_w = self.size
        scale = min(out_h / params.height, out_w / params.width)
        new_h, new_w = max(1, round(params.height * scale)), max(1, round(params.width * scale))
        return scale, new_h, new_w, max(0, (out_h - new_h) // 2), max(0, (out_w - new_w) // 2)

    def _first_step(self, params: WarpParams, kind: str) -> np.ndarray:
        """Source -> the first step's output (size): ``kind`` "image" (pixel centres), "mask" (cv2.resize's
        nearest grid) or "keypoints" (albumentations' keypoint scaling)."""
        if self.mode == "letterbox":
            scale, new_h, new_w, top, left = self._letterbox(params)
            if kind == "keypoints":
                return _matrix(scale, 0.0, left, 0.0, scale, top)
            out = window_matrix((0, 0, params.width, params.height), (new_h, new_w), nearest=kind != "image")
            out[0, 2] += left
            out[1, 2] += top
            return out
        x0, y0, x1, y1 = params.crop
        if kind == "keypoints":
            kx, ky = self.size[1] / (x1 - x0), self.size[0] / (y1 - y0)
            return _matrix(kx, 0.0, -x0 * kx, 0.0, ky, -y0 * ky)
        return window_matrix(params.crop, self.size, nearest=kind != "image")

    def _flip_matrix(self) -> np.ndarray:
        return _matrix(-1.0, 0.0, self.size[1] - 1.0, 0.0, 1.0, 0.0)

    def _affine_matrix(self, draw: AffineDraw, centre: Tuple[float, float]) -> np.ndarray:
        return create_affine_transformation_matrix(
            {"x": draw.translate_x, "y": draw.translate_y}, {"x": draw.shear_x, "y": draw.shear_y},
            {"x": draw.scale_x, "y": draw.scale_y}, draw.rotate, centre)

    def matrix(self, params: WarpParams, kind: str = "image") -> np.ndarray:
        """3x3 map from full-size source coordinates to the output for ``kind`` "image", "mask" or "keypoints"."""
        out = self._first_step(params, kind)
        if params.flip:
            out = self._flip_matrix() @ out
        if params.affine is not None:
            out_h, out_w = self.size
            out = self._affine_matrix(params.affine, (out_w / 2 - 0.5, out_h / 2 - 0.5)) @ out
        return out

    def needed_source_size(self, params: WarpParams) -> Tuple[float, float]:
        """(height, width) the source may shrink to before an output pixel is upsampled from it:
        the source size times the warp's largest stretch (rotation, shear and affine scale included).

        The linear part of :meth:`matrix` in plain floats (called once per item before decoding).
        """
        if self.mode == "letterbox":
            _, new_h, new_w, _, _ = self._letterbox(params)
            a, d = new_w / params.width, new_h / params.height
        else:
            x0, y0, x1, y1 = params.crop
            a, d = self.size[1] / (x1 - x0), self.size[0] / (y1 - y0)
        b = c = 0.0
        if params.affine is not None:  # shear @ rotate @ scale, as create_affine_transformation_matrix
            draw = params.affine
            angle = math.radians(draw.rotate % 360)
            cos, sin = math.cos(angle), math.sin(angle)
            tan_x, tan_y = math.tan(math.radians(draw.shear_x)), math.tan(math.radians(draw.shear_y))
            r00, r01 = (cos - tan_x * sin) * draw.scale_x, (sin + tan_x * cos) * draw.scale_y
            r10, r11 = (tan_y * cos - sin) * draw.scale_x, (tan_y * sin + cos) * draw.scale_y
            a, b, c, d = r00 * a, r01 * d, r10 * a, r11 * d
        return needed_source((params.height, params.width), largest_stretch(np.array([[a, b], [c, d]])))

    def _inner(self, params: WarpParams) -> Tuple[int, int, int, int]:
        """(top, left, height, width) of the output the source lands on when no affine runs."""
        if self.mode != "letterbox":
            return 0, 0, self.size[0], self.size[1]
        _, new_h, new_w, top, left = self._letterbox(params)
        if params.flip:
            left = self.size[1] - left - new_w
        return top, left, new_h, new_w

    # --- albumentations hooks --------------------------------------------------------------------

    def get_params_dependent_on_data(self, params: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Any]:
        shape = tuple(params["shape"][:2])
        source = data.get(SOURCE_KEY)
        if source is None:
            source = WarpSource(shape[0], shape[1], 1)
        else:
            source = WarpSource(*source)
            expected = decoded_shape((source.height, source.width), source.reduce)
            if shape != expected:
                raise ValueError(f"OneWarp: the image is {shape[1]}x{shape[0]} but {SOURCE_KEY} says a "
                                 f"{source.width}x{source.height} source at 1/{source.reduce}, which is "
                                 f"{expected[1]}x{expected[0]}")
        return {"warp": self.sample(source.height, source.width, self.py_random), "reduce": source.reduce}

    def _resample(self, img: np.ndarray, params: WarpParams, reduce: int, kind: str) -> np.ndarray:
        """Resample an image or mask decoded at 1/``reduce`` to the output once, reading only the crop window.

        Without an affine, and with the crop on whole pixels of the decode (always at full scale),
        the map is ``cv2.resize`` of the crop window exactly (then a flip and the letterbox bars,
        copies): the same single resampling as albumentations', separable, so faster than a warp.
        Otherwise one ``cv2.warpAffine`` (edges replicated as ``cv2.resize`` has them without an
        affine, black with one).
        """
        out_h, out_w = self.size
        flags = cv2.INTER_LINEAR if kind == "image" else cv2.INTER_NEAREST
        cells = reduced_window(params.crop, reduce, img.shape[:2])
        if params.affine is None and cells.whole_blocks:
            top, left, new_h, new_w = self._inner(params)
            out = img[cells.rows, cells.cols]
            if out.shape[:2] != (new_h, new_w):
                out = _keep_channels(cv2.resize(out, (new_w, new_h), interpolation=flags), img)
            if params.flip:
                out = _keep_channels(cv2.flip(out, 1), img)
            if (new_h, new_w) != (out_h, out_w):
                return _pad(out, top, out_h - new_h - top, left, out_w - new_w - left)
            return np.ascontiguousarray(out)
        roi = img[cells.rows, cells.cols]
        matrix = self.matrix(params, kind) @ cells.to_source
        if params.affine is None:
            top, left, new_h, new_w = self._inner(params)
            matrix[0, 2] -= left
            matrix[1, 2] -= top
            out = _warp(roi, matrix[:2], (new_w, new_h), flags, cv2.BORDER_REPLICATE)
            if (new_h, new_w) != (out_h, out_w):
                out = _pad(out, top, out_h - new_h - top, left, out_w - new_w - left)
            return out
        return _warp(roi, matrix[:2], (out_w, out_h), flags, cv2.BORDER_CONSTANT)

    def apply(self, img: np.ndarray, warp: WarpParams, reduce: int, **params: Any) -> np.ndarray:
        return self._resample(img, warp, reduce, "image")

    def apply_to_mask(self, mask: np.ndarray, warp: WarpParams, reduce: int, **params: Any) -> np.ndarray:
        return self._resample(mask, warp, reduce, "mask")

    def apply_to_keypoints(self, keypoints: np.ndarray, warp: WarpParams, **params: Any) -> np.ndarray:
        """xy through the keypoint matrix; angle and scale (columns 3 and 4) as the steps change them."""
        out = np.array(keypoints, dtype=np.float64, copy=True)
        if out.size == 0:
            return out
        matrix = self.matrix(warp, "keypoints")
        xy = out[:, :2].copy()
        out[:, 0] = matrix[0, 0] * xy[:, 0] + matrix[0, 1] * xy[:, 1] + matrix[0, 2]
        out[:, 1] = matrix[1, 0] * xy[:, 0] + matrix[1, 1] * xy[:, 1] + matrix[1, 2]
        if out.shape[1] > 4:
            first = self._first_step(warp, "keypoints")
            stretch = max(first[0, 0], first[1, 1])
            if warp.flip:
                out[:, 3] = np.pi - out[:, 3]
            if warp.affine is not None:
                out_h, out_w = self.size
                affine = self._affine_matrix(warp.affine, (out_w / 2 - 0.5, out_h / 2 - 0.5))
                out[:, 3] += rotation2d_matrix_to_euler_angles(affine[:2, :2], y_up=False)
                stretch *= max(warp.affine.scale_x, warp.affine.scale_y)
            out[:, 3] = np.mod(out[:, 3], 2 * np.pi)
            out[:, 4] *= stretch
        return out

    def _filter_boxes(self, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """The pipeline's box filter at an intermediate size, as the Compose runs it after each step."""
        processor = self.get_processor("bboxes") if hasattr(self, "processors") else None
        if processor is None:
            return filter_bboxes(boxes, {"height": height, "width": width})
        if not getattr(processor.params, "check_each_transform", True):
            return boxes
        return processor.filter(boxes, {"height": height, "width": width})

    def apply_to_bboxes(self, bboxes: np.ndarray, warp: WarpParams, **params: Any) -> np.ndarray:
        """Normalised boxes of the full-size source, moved step by step with the box filter after every
        step the replaced pipeline has (drawn or not), the last one left to the Compose as for any step.

        The filter count matters: a box clipped to zero width survives one filter and not the next.
        """
        if len(bboxes) == 0:
            return bboxes
        boxes = np.array(bboxes, dtype=np.float64, copy=True)
        out_h, out_w = self.size
        if self.mode == "letterbox":
            _, new_h, new_w, top, left = self._letterbox(warp)
            boxes = self._filter_boxes(boxes, new_h, new_w)  # after LongestMaxSize; PadIfNeeded follows
            boxes[:, [0, 2]] = (boxes[:, [0, 2]] * new_w + left) / out_w
            boxes[:, [1, 3]] = (boxes[:, [1, 3]] * new_h + top) / out_h
        else:
            x0, y0, x1, y1 = warp.crop
            boxes[:, [0, 2]] = (boxes[:, [0, 2]] * warp.width - x0) / (x1 - x0)
            boxes[:, [1, 3]] = (boxes[:, [1, 3]] * warp.height - y0) / (y1 - y0)
        if self.hflip > 0 or warp.flip:
            boxes = self._filter_boxes(boxes, out_h, out_w)
            if warp.flip and len(boxes):
                boxes[:, [0, 2]] = 1.0 - boxes[:, [2, 0]]
        if self.affine > 0 or warp.affine is not None:
            boxes = self._filter_boxes(boxes, out_h, out_w)
            if warp.affine is not None and len(boxes):
                scale = np.array([out_w, out_h, out_w, out_h], dtype=np.float64)
                boxes[:, :4] *= scale
                moved = bboxes_affine_largest_box(boxes, self._affine_matrix(warp.affine, (out_w / 2, out_h / 2)))
                boxes = validate_bboxes(moved, (out_h, out_w))
                boxes[:, :4] /= scale
        return boxes.astype(np.asarray(bboxes).dtype, copy=False)


def _pad(image: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Black padding around ``image`` (the letterbox bars), channel axis kept."""
    out = np.zeros((image.shape[0] + top + bottom, image.shape[1] + left + right, *image.shape[2:]), image.dtype)
    out[top:top + image.shape[0], left:left + image.shape[1]] = image
    return out


def leading_warp(transform: Any) -> Optional[OneWarp]:
    """The :class:`OneWarp` an ``A.Compose`` starts with when every call reaches it (p = 1), else None.

    Only a plain Compose: :func:`needed_source_size` replays exactly its draws.
    """
    if type(transform) is not A.Compose or transform.p < 1.0:
        return None
    steps = transform.transforms
    return steps[0] if steps and isinstance(steps[0], OneWarp) else None


def needed_source_size(transform: Any, height: int, width: int) -> Optional[Tuple[float, float]]:
    """(height, width) the next call of ``transform`` on a ``height`` x ``width`` source needs undecimated,
    or None when the pipeline does not start with a :class:`OneWarp`.

    Draws from a copy of the warp's random state, as the call itself will (after the Compose's own
    draw when they share the generator, as :func:`cvkit.data.seeding.reseed_transform` makes them),
    so the call draws the same parameters whatever the decode scale.
    """
    warp = leading_warp(transform)
    if warp is None:
        return None
    rng = random.Random()
    rng.setstate(warp.py_random.getstate())
    if warp.py_random is transform.py_random:
        rng.random()  # Compose.__call__ draws once for its own p before its first step
    return warp.needed_source_size(warp.sample(height, width, rng))
