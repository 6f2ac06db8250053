"""Named augmentation presets and their exact record as albumentations' own YAML/JSON.

Every pipeline cvkit builds declares the box (``"albumentations"`` = xyxy in [0, 1]) and
keypoint (``"xy"`` pixels, kept when they leave the image) targets, so the same Compose moves an
image, its mask, its box and its keypoints together. Every preset starts with one
:class:`~cvkit.data.warp.OneWarp` (crop, flip, affine and resize as one matrix, one resampling, and
a reduced JPEG decode in the table datasets) and runs its colour steps on the small output image.
Register your own with ``@register_preset("name")``; :func:`transform_to_dict` is what a run
stores in ``config.json``.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from cvkit.data.evalspec import INTER_LINEAR, EvalSpec
from cvkit.data.warp import OneWarp
from cvkit.io import atomic_write_bytes
from cvkit.registry import Registry

PathLike = Union[str, os.PathLike]
Size = Union[int, Tuple[int, int]]
Normalize = Union[str, None, Tuple[Sequence[float], Sequence[float]]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS: Registry[Callable[[Tuple[int, int]], List[Any]]] = Registry("augmentation preset")


def _hw(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def bbox_params() -> A.BboxParams:
    """The box declaration every cvkit pipeline carries: normalised xyxy, nothing dropped for size."""
    return A.BboxParams(format="albumentations", label_fields=[], min_area=0.0, min_visibility=0.0, clip=True)


def keypoint_params() -> A.KeypointParams:
    """The keypoint declaration: pixel (x, y), kept when they leave the image (the dataset masks them)."""
    return A.KeypointParams(format="xy", remove_invisible=False)


class FastAffine(A.Affine):
    """``A.Affine`` with the same pixels, faster on RGB uint8 images.

    OpenCV's bilinear ``warpAffine`` is vectorised for 1 and 4 channels but not for 3, so a
    3-channel uint8 image is warped as RGBA and converted back (0.17 ms instead of 0.38 ms at
    224x224 on one core, OpenCV 5.0; bench/RESULTS.md "Data throughput").
    """

    def apply(self, img: np.ndarray, matrix: np.ndarray, output_shape: Tuple[int, int], **params: Any) -> np.ndarray:
        if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
            rgba = super().apply(cv2.cvtColor(img, cv2.COLOR_RGB2RGBA), matrix, output_shape, **params)
            return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        return super().apply(img, matrix, output_shape, **params)


class NormalizeToTensor(ToTensorV2):
    """``A.Normalize(mean, std, max_pixel_value=255)`` then ``ToTensorV2``, in one step.

    The image comes out float32, channels first and contiguous, ``(pixel - 255 mean) / (255 std)``
    as ``A.Normalize`` computes it; masks are converted as ``ToTensorV2`` does. A uint8 image is
    split into planes and each plane mapped through a float lookup table straight into the tensor,
    which skips the per-channel merge and the strided HWC -> CHW float copy (bench/RESULTS.md).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 transpose_mask: bool = True, p: float = 1.0) -> None:
        super().__init__(transpose_mask=transpose_mask, p=p)
        if len(mean) != len(std) or any(float(v) <= 0 for v in std):
            raise ValueError(f"NormalizeToTensor: mean={list(mean)} and std={list(std)} must have one value "
                             f"per channel and std > 0")
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        shift, scale = np.array(self.mean) * 255.0, 1.0 / (np.array(self.std) * 255.0)
        self._luts = ((np.arange(256)[None, :] - shift[:, None]) * scale[:, None]).astype(np.float32)
        self._shift = torch.from_numpy(shift.astype(np.float32)).view(-1, 1, 1)
        self._scale = torch.from_numpy(scale.astype(np.float32)).view(-1, 1, 1)

    def apply(self, img: np.ndarray, **params: Any) -> torch.Tensor:
        planes = cv2.split(img) if img.ndim == 3 else [img]
        if len(planes) != len(self.mean):
            raise ValueError(f"NormalizeToTensor: the image has {len(planes)} channels but mean/std have "
                             f"{len(self.mean)} values")
        if img.dtype != np.uint8:
            chw = torch.from_numpy(np.stack(planes)).float()
            return chw.sub_(self._shift).mul_(self._scale)
        out = torch.empty((len(planes), *img.shape[:2]), dtype=torch.float32)
        planes_out = out.numpy()
        for plane, lut, dst in zip(planes, self._luts, planes_out):
            cv2.LUT(plane, lut, dst=dst)
        return out

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("mean", "std", "transpose_mask")


def _mean_std(normalize: Normalize) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) in [0, 1] for a ``normalize`` argument of :func:`compose`."""
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize in (None, "none"):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = tuple(normalize[0]), tuple(normalize[1])
    else:
        raise ValueError(f"normalize={normalize!r}; expected 'imagenet', 'none' or (mean, std)")
    return mean, std


def compose(transforms: Sequence[Any], normalize: Normalize = "imagenet") -> A.Compose:
    """A Compose of ``transforms`` + :class:`NormalizeToTensor`, declaring image/mask/box/keypoint targets.

    ``normalize`` is ``"imagenet"``, ``"none"``/None (pixels / 255, for models that normalise
    inside) or ``(mean, std)`` in [0, 1].
    """
    mean, std = _mean_std(normalize)
    return _declared([*transforms, NormalizeToTensor(mean, std, transpose_mask=True)])


def _declared(transforms: List[Any], p: float = 1.0) -> A.Compose:
    with warnings.catch_warnings():
        # A pipeline without geometric steps (normalise only) still declares boxes/keypoints on purpose.
        warnings.filterwarnings("ignore", message="Got processor for .* but no transform to process it")
        return A.Compose(transforms, bbox_params=bbox_params(), keypoint_params=keypoint_params(), p=p)


def with_targets(transform: A.Compose) -> A.Compose:
    """``transform`` itself when it declares boxes and keypoints, else a Compose of its steps that does."""
    if "bboxes" in transform.processors and "keypoints" in transform.processors:
        return transform
    return _declared(list(transform.transforms), p=transform.p)


def register_preset(
    name: str, *, override: bool = False
) -> Callable[[Callable[[Tuple[int, int]], List[Any]]], Callable]:
    """Register ``fn(size_hw) -> [albumentations transforms]`` (before normalisation) under ``name``.

    A taken name raises :class:`cvkit.registry.RegistryError` unless ``override=True``.
    """

    def decorator(fn: Callable[[Tuple[int, int]], List[Any]]) -> Callable:
        return PRESETS.register(fn, name=name, override=override)

    return decorator


def list_presets(pattern: str = "*") -> List[str]:
    """Names of the registered presets matching a shell-style ``pattern``, sorted."""
    return PRESETS.list(pattern)


def create_preset(name: str, size: Size, normalize: Normalize = "imagenet") -> A.Compose:
    """The preset ``name`` at ``size`` (int or (height, width)), normalised, as a tensor-producing Compose."""
    return compose(PRESETS.get(name)(_hw(size)), normalize)


def default_transform(normalize: Normalize = "imagenet") -> A.Compose:
    """What a dataset uses when given ``transform=None``: normalise and convert to a tensor, no resizing."""
    return compose([], normalize)


def eval_pipeline(spec: EvalSpec) -> A.Compose:
    """The albumentations pipeline of an :class:`~cvkit.data.evalspec.EvalSpec`: a bilinear resize as
    :class:`OneWarp` (reduced decoding included; ``A.Resize`` for another interpolation), then the normalisation."""
    steps: List[Any] = []
    if spec.size:
        steps.append(OneWarp(spec.size, mode="resize") if spec.interpolation == INTER_LINEAR
                     else A.Resize(*spec.size, interpolation=spec.interpolation))
    if spec.max_pixel_value == 255.0:
        return compose(steps, (spec.mean, spec.std))
    return _declared([*steps, A.Normalize(spec.mean, spec.std, max_pixel_value=spec.max_pixel_value),
                      ToTensorV2(transpose_mask=True)])


def _warp(size: Tuple[int, int], scale: Tuple[float, float], affine: float = 0.0,
          affine_scale: Tuple[float, float] = (1.0, 1.0), shift: float = 0.0, rotate: float = 0.0) -> OneWarp:
    """RandomResizedCrop(size, scale) + HorizontalFlip(0.5) + a black-bordered Affine (probability ``affine``)."""
    return OneWarp(size, scale=scale, hflip=0.5, affine=affine, affine_scale=affine_scale,
                   translate_percent=(-shift, shift), rotate=(-rotate, rotate))


@register_preset("resize")
def _resize(size: Tuple[int, int]) -> List[Any]:
    return [OneWarp(size, mode="resize")]


@register_preset("letterbox")
def _letterbox(size: Tuple[int, int]) -> List[Any]:
    return [OneWarp(size, mode="letterbox")]


@register_preset("light")
def _light(size: Tuple[int, int]) -> List[Any]:
    return [
        _warp(size, scale=(0.8, 1.0)),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


@register_preset("medium")
def _medium(size: Tuple[int, int]) -> List[Any]:
    return [
        _warp(size, scale=(0.6, 1.0), affine=0.5, affine_scale=(0.9, 1.1), shift=0.0625, rotate=15),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.OneOf([A.Blur(blur_limit=3), A.GaussianBlur(blur_limit=(3, 5))], p=0.2),
    ]


@register_preset("heavy")
def _heavy(size: Tuple[int, int]) -> List[Any]:
    return [
        _warp(size, scale=(0.4, 1.0), affine=0.7, affine_scale=(0.8, 1.2), shift=0.1, rotate=30),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.7),
        A.OneOf([A.CLAHE(clip_limit=2.0), A.RandomGamma(gamma_limit=(70, 130))], p=0.4),
        A.OneOf([A.Blur(blur_limit=5), A.GaussianBlur(blur_limit=(3, 7)), A.MotionBlur(blur_limit=5)], p=0.3),
        A.ToGray(p=0.1),
    ]


def loader_pipeline(loader: Any) -> Optional[Dict[str, Any]]:
    """The serialised albumentations pipeline of a loader's dataset (looking through wrappers), or None."""
    dataset = getattr(loader, "dataset", None)
    for _ in range(4):
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, A.BaseCompose):
            try:
                return transform_to_dict(transform)
            except (NotImplementedError, ValueError, TypeError):
                return None
        dataset = getattr(dataset, "dataset", None)
    return None


def transform_to_dict(transform: A.BaseCompose) -> Dict[str, Any]:
    """albumentations' own serialisation of a pipeline (JSON-safe), e.g. for ``config.json``."""
    return json.loads(json.dumps(A.to_dict(transform)))


def transform_from_dict(data: Dict[str, Any]) -> A.BaseCompose:
    """Rebuild a pipeline from :func:`transform_to_dict`'s output."""
    return A.from_dict(data)


def save_transform(transform: A.BaseCompose, path: PathLike) -> None:
    """Write a pipeline to ``.json`` or ``.yaml``/``.yml`` (chosen by suffix), atomically."""
    import yaml

    path = Path(path)
    data = transform_to_dict(transform)
    if path.suffix in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    elif path.suffix == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ValueError(f"{path}: expected a .json, .yaml or .yml file for an augmentation pipeline")
    atomic_write_bytes(path, text.encode())


def load_transform(path: PathLike) -> A.BaseCompose:
    """Read a pipeline written by :func:`save_transform` (or ``albumentations.save``)."""
    import yaml

    path = Path(path)
    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    with warnings.catch_warnings():
        # albumentations 2.0.8 writes PadIfNeeded's derived ``padding`` and then warns about it on load.
        warnings.filterwarnings("ignore", message=r"Argument\(s\) 'padding' are not valid for transform PadIfNeeded")
        return transform_from_dict(data)

