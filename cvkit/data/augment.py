"""Named augmentation presets and their exact record as albumentations' own YAML/JSON.

Every pipeline cvkit builds declares the box (``"albumentations"`` = xyxy in [0, 1]) and
keypoint (``"xy"`` pixels, kept when they leave the image) targets, so the same Compose moves an
image, its mask, its box and its keypoints together. Presets resize first and augment at the
target size, which keeps them cheap for large source images. Register your own with
``@register_preset("name")``; :func:`transform_to_dict` is what a run stores in ``config.json``.
"""
from __future__ import annotations

import difflib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from cvkit.io import atomic_write_bytes

PathLike = Union[str, os.PathLike]
Size = Union[int, Tuple[int, int]]
Normalize = Union[str, None, Tuple[Sequence[float], Sequence[float]]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PRESETS: Dict[str, Callable[[Tuple[int, int]], List[Any]]] = {}


def _hw(size: Size) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def bbox_params() -> A.BboxParams:
    """The box declaration every cvkit pipeline carries: normalised xyxy, nothing dropped for size."""
    return A.BboxParams(format="albumentations", label_fields=[], min_area=0.0, min_visibility=0.0, clip=True)


def keypoint_params() -> A.KeypointParams:
    """The keypoint declaration: pixel (x, y), kept when they leave the image (the dataset masks them)."""
    return A.KeypointParams(format="xy", remove_invisible=False)


def normalization(normalize: Normalize = "imagenet") -> A.Normalize:
    """``"imagenet"``, ``"none"``/None (pixels / 255, for models that normalise inside) or ``(mean, std)`` in [0, 1]."""
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize in (None, "none"):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    elif isinstance(normalize, (tuple, list)) and len(normalize) == 2:
        mean, std = tuple(normalize[0]), tuple(normalize[1])
    else:
        raise ValueError(f"normalize={normalize!r}; expected 'imagenet', 'none' or (mean, std)")
    return A.Normalize(mean=mean, std=std, max_pixel_value=255.0)


def compose(transforms: Sequence[Any], normalize: Normalize = "imagenet") -> A.Compose:
    """A Compose of ``transforms`` + normalisation + ToTensorV2, declaring image/mask/box/keypoint targets."""
    return _declared([*transforms, normalization(normalize), ToTensorV2(transpose_mask=True)])


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


def register_preset(name: str) -> Callable[[Callable[[Tuple[int, int]], List[Any]]], Callable]:
    """Register ``fn(size_hw) -> [albumentations transforms]`` (before normalisation) under ``name``."""

    def decorator(fn: Callable[[Tuple[int, int]], List[Any]]) -> Callable:
        if name in _PRESETS:
            warnings.warn(f"augmentation preset {name!r} is being overwritten", UserWarning, stacklevel=2)
        _PRESETS[name] = fn
        return fn

    return decorator


def list_presets() -> List[str]:
    """Names of the registered presets, sorted."""
    return sorted(_PRESETS)


def create_preset(name: str, size: Size, normalize: Normalize = "imagenet") -> A.Compose:
    """The preset ``name`` at ``size`` (int or (height, width)), normalised, as a tensor-producing Compose."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown augmentation preset {name!r}{hint}; registered: {', '.join(list_presets())}")
    return compose(_PRESETS[name](_hw(size)), normalize)


def default_transform(normalize: Normalize = "imagenet") -> A.Compose:
    """What a dataset uses when given ``transform=None``: normalise and convert to a tensor, no resizing."""
    return compose([], normalize)


def _black_affine(scale: Tuple[float, float], shift: float, rotate: float, p: float) -> A.Affine:
    return A.Affine(scale=scale, translate_percent=(-shift, shift), rotate=(-rotate, rotate),
                    border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=p)


@register_preset("resize")
def _resize(size: Tuple[int, int]) -> List[Any]:
    return [A.Resize(*size)]


@register_preset("letterbox")
def _letterbox(size: Tuple[int, int]) -> List[Any]:
    return [A.LongestMaxSize(max_size=max(size)),
            A.PadIfNeeded(*size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)]


@register_preset("light")
def _light(size: Tuple[int, int]) -> List[Any]:
    return [
        A.RandomResizedCrop(size=size, scale=(0.8, 1.0)),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]


@register_preset("medium")
def _medium(size: Tuple[int, int]) -> List[Any]:
    return [
        A.RandomResizedCrop(size=size, scale=(0.6, 1.0)),
        A.HorizontalFlip(p=0.5),
        _black_affine(scale=(0.9, 1.1), shift=0.0625, rotate=15, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.OneOf([A.Blur(blur_limit=3), A.GaussianBlur(blur_limit=(3, 5))], p=0.2),
    ]


@register_preset("heavy")
def _heavy(size: Tuple[int, int]) -> List[Any]:
    return [
        A.RandomResizedCrop(size=size, scale=(0.4, 1.0)),
        A.HorizontalFlip(p=0.5),
        _black_affine(scale=(0.8, 1.2), shift=0.1, rotate=30, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3, p=0.7),
        A.OneOf([A.CLAHE(clip_limit=2.0), A.RandomGamma(gamma_limit=(70, 130))], p=0.4),
        A.OneOf([A.Blur(blur_limit=5), A.GaussianBlur(blur_limit=(3, 7)), A.MotionBlur(blur_limit=5)], p=0.3),
        A.ToGray(p=0.1),
    ]


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

