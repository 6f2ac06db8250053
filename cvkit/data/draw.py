"""Drawing a sample with its prediction: what a task shows for its worst-predicted images."""
from __future__ import annotations

from typing import List, Sequence

import cv2
import numpy as np
import torch

from cvkit.data.augment import IMAGENET_MEAN, IMAGENET_STD


def to_uint8(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Undo normalisation of a CxHxW tensor and return an HxWx3 uint8 RGB array."""
    x = image.detach().float().cpu()
    if x.shape[0] == 1:
        x = x.repeat(3, 1, 1)
    x = x[:3] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().copy()


def draw_label(image: np.ndarray, output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Write ``true -> predicted (probability)`` on a classification sample."""
    probs = torch.softmax(output.float(), dim=0)
    pred = int(probs.argmax())
    true = int(target.argmax()) if target.ndim else int(target)
    cv2.putText(image, f"{true}->{pred} {probs[pred]:.2f}", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1)
    return image


def draw_keypoints(image: np.ndarray, output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """True points in green, predicted in red, joined; coordinates are (x, y) pairs in [0, 1]."""
    h, w = image.shape[:2]
    pred = output.detach().float().view(-1, 2).cpu().numpy() * (w, h)
    true = target.detach().float().view(-1, 2).cpu().numpy() * (w, h)
    for (px, py), (tx, ty) in zip(pred, true):
        if np.isfinite([tx, ty]).all():
            cv2.line(image, (int(tx), int(ty)), (int(px), int(py)), (255, 255, 0), 1)
            cv2.circle(image, (int(tx), int(ty)), 2, (0, 255, 0), -1)
        cv2.circle(image, (int(px), int(py)), 2, (255, 0, 0), -1)
    return image


def grid(images: List[np.ndarray], ncols: int = 4) -> np.ndarray:
    """Tile same-size HxWx3 images into one image (row-major), padding the last row with black."""
    h, w = images[0].shape[:2]
    rows = (len(images) + ncols - 1) // ncols
    out = np.zeros((rows * h, ncols * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = cv2.resize(img, (w, h)) if img.shape[:2] != (h, w) else img
    return out


__all__ = ["draw_keypoints", "draw_label", "grid", "to_uint8"]
