"""The worst-predicted validation images of each epoch, drawn and sent to TensorBoard.

Looking at the samples a model gets most wrong finds label errors and blind spots faster than
any metric; the keypoints project did it by hand after every run.
"""
from __future__ import annotations

import heapq
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from catalyst.core.callback import Callback, CallbackOrder

from cvkit.io import atomic_write_bytes

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner

Draw = Callable[[np.ndarray, torch.Tensor, torch.Tensor], np.ndarray]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class WorstPredictionsCallback(Callback):
    """Keep the ``k`` samples with the largest loss in a loader; log them as one image per epoch.

    Args:
        per_sample_loss: ``f(outputs, targets) -> (B,)`` loss of each sample.
        draw: ``f(image_uint8, output, target) -> image`` (see :func:`draw_label`, :func:`draw_keypoints`).
        k: how many images.
        loader: which loader to watch.
        save_dir: also write ``worst_e<epoch>.png`` there.
    """

    def __init__(
        self,
        per_sample_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        draw: Draw = draw_label,
        k: int = 8,
        loader: str = "valid",
        input_key: str = "features",
        output_key: str = "logits",
        target_key: str = "targets",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        save_dir: Optional[Path] = None,
    ) -> None:
        super().__init__(order=CallbackOrder.External + 5)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.per_sample_loss, self.draw, self.k, self.loader = per_sample_loss, draw, k, loader
        self.keys = (input_key, output_key, target_key)
        self.reads = self.keys
        self.mean, self.std = mean, std
        self.save_dir = Path(save_dir) if save_dir else None
        self.heap: List[Tuple[float, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._count = 0

    def on_loader_start(self, runner: "IRunner") -> None:
        self.heap, self._count = [], 0

    @torch.no_grad()
    def on_batch_end(self, runner: "IRunner") -> None:
        if runner.loader_key != self.loader:
            return
        x, out, y = (runner.batch[k] for k in self.keys)
        losses = self.per_sample_loss(out.detach(), y).detach().float().cpu()
        for i in range(len(losses)):
            self._count += 1
            item = (float(losses[i]), self._count, x[i].cpu(), out[i].detach().cpu(), y[i].cpu())
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item[0] > self.heap[0][0]:
                heapq.heapreplace(self.heap, item)

    def worst(self) -> List[np.ndarray]:
        """The drawn images, worst first."""
        items = sorted(self.heap, key=lambda t: -t[0])
        return [self.draw(to_uint8(x, self.mean, self.std), out, y) for _, _, x, out, y in items]

    def on_loader_end(self, runner: "IRunner") -> None:
        if runner.loader_key != self.loader or not self.heap:
            return
        image = grid(self.worst())
        runner.log_image(tag=f"worst/{self.loader}", image=image, scope="loader")
        if self.save_dir is not None and runner.engine.is_main_process:
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if ok:
                atomic_write_bytes(self.save_dir / f"worst_e{runner.epoch_step:03d}.png", png.tobytes())
