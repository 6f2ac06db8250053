"""Tiled inference for masks: a large image predicted in overlapping windows at its own resolution.

The image is padded (reflected) at the bottom and right to a multiple of the model's stride, cut
into ``tile`` x ``tile`` windows that overlap by ``overlap`` pixels (the last window of a row or
column is moved back inside the image), and the windows go through the model in batches of
``batch_size``, each batch through :func:`~cvkit.inference.tta.tta_predict`. Window predictions
are blended with a weight that is 1 inside and falls smoothly (raised cosine) to near 0 over the
``overlap`` pixels at each side that meets another window, so a window's edge, where its
convolutions saw padding, counts for little and there are no seams. Memory beyond the output
itself is bounded by one batch of windows.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvkit.layouts import OutputLayout, get_layout


def check_tiling(layout: Union[str, OutputLayout], tile: int, overlap: int, multiple: int = 1) -> None:
    """Refuse a tiling that cannot work: a tileable output layout (masks), ``0 <= overlap < tile``, ``tile`` a
    multiple of ``multiple``."""
    layout = get_layout(layout)
    if not layout.tileable:
        raise ValueError(f"tiled inference needs mask outputs (segmentation); this task's output is {layout.name!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"overlap must be a whole number of pixels in [0, tile={tile}), got {overlap!r}")
    if tile % multiple:
        raise ValueError(f"tile={tile} must be a multiple of {multiple}, the size the model's input must divide by")


def window_starts(length: int, window: int, overlap: int) -> List[int]:
    """Start offsets of windows of ``window`` pixels covering ``length``, ``overlap`` apart, the last flush with the end."""
    if window >= length:
        return [0]
    step = window - overlap
    starts = list(range(0, length - window, step))
    return starts + [length - window]


def _ramp(n: int) -> Tensor:
    """Raised-cosine rise over ``n`` pixels, > 0 at the first pixel."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return torch.sin(t * math.pi / 2) ** 2


def window_weight(start: int, size: int, length: int, overlap: int) -> Tensor:
    """1-D blending weight of one window: 1, falling over ``overlap`` pixels at each side that meets another window."""
    w = torch.ones(size)
    if overlap <= 0:
        return w
    ramp = min(overlap, max(size // 2, 1))
    if start > 0:
        w[:ramp] = _ramp(ramp)
    if start + size < length:
        w[size - ramp:] = torch.minimum(w[size - ramp:], _ramp(ramp).flip(0))
    return w


def _pad(image: Tensor, height: int, width: int) -> Tensor:
    """``image`` (C, H, W) padded at the bottom/right to ``height`` x ``width``, reflecting where it can."""
    dh, dw = height - image.shape[-2], width - image.shape[-1]
    if not dh and not dw:
        return image
    mode = "reflect" if dh < image.shape[-2] and dw < image.shape[-1] else "replicate"
    return F.pad(image[None], (0, dw, 0, dh), mode=mode)[0]


@torch.no_grad()
def tiled_predict(
    model: nn.Module,
    image: Tensor,
    tile: int = 512,
    overlap: int = 64,
    transforms: Sequence[Any] = ("identity",),
    batch_size: int = 8,
    multiple: int = 32,
    device: Optional[str] = None,
    layout: Union[str, OutputLayout] = "mask",
    **tta_kwargs: Any,
) -> Tensor:
    """The de-augmented mask probabilities ``(K, H, W)`` of one normalised ``(C, H, W)`` image, window by window.

    ``transforms`` and ``tta_kwargs`` (``activation``...) are :func:`~cvkit.inference.tta.tta_predict`'s;
    ``multiple``: the image is padded to a multiple of it (32 for the usual U-Net/FPN encoders);
    ``layout``: the task's output layout (a tileable one: masks).
    """
    from cvkit.inference.tta import tta_predict

    check_tiling(layout, tile, overlap, multiple)
    if image.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    height, width = image.shape[-2:]
    padded_h, padded_w = (math.ceil(n / multiple) * multiple for n in (height, width))
    padded = _pad(image, padded_h, padded_w)
    th, tw = min(tile, padded_h), min(tile, padded_w)
    boxes = [(y, x) for y in window_starts(padded_h, th, overlap) for x in window_starts(padded_w, tw, overlap)]
    device = device or str(image.device)
    total: Optional[Tensor] = None
    norm = torch.zeros(padded_h, padded_w)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first:first + batch_size]
        x = torch.stack([padded[:, y:y + th, x:x + tw] for y, x in chunk]).to(device)
        out = tta_predict(model, x, list(transforms), target=layout, **tta_kwargs).float().cpu()
        if out.shape[-2:] != (th, tw):
            out = F.interpolate(out, size=(th, tw), mode="bilinear", align_corners=False)
        if total is None:
            total = torch.zeros(out.shape[1], padded_h, padded_w)
        for (y, x), pred in zip(chunk, out):
            weight = window_weight(y, th, padded_h, overlap)[:, None] * window_weight(x, tw, padded_w, overlap)[None]
            total[:, y:y + th, x:x + tw] += pred * weight
            norm[y:y + th, x:x + tw] += weight
    return (total / norm)[:, :height, :width]


def normalize_only(transform: Any) -> Any:
    """The normalisation (and tensor conversion) of an eval spec (:class:`cvkit.data.evalspec.EvalSpec`) or
    of an albumentations eval pipeline (read once by :func:`~cvkit.data.evalspec.derive_eval_spec`), without
    its resize: tiles keep the image's own resolution."""
    from cvkit.data.augment import eval_pipeline, transform_to_dict
    from cvkit.data.evalspec import EvalSpec, derive_eval_spec

    if not isinstance(transform, EvalSpec):
        try:
            transform = derive_eval_spec(transform_to_dict(transform), "tiled inference: the eval pipeline")
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ValueError(f"{exc} (tiled inference needs the eval pipeline's normalisation step: "
                             "NormalizeToTensor or Normalize + ToTensorV2, and at most a resize)") from None
    return eval_pipeline(transform.at(None))


__all__ = ["check_tiling", "normalize_only", "tiled_predict", "window_starts", "window_weight"]
