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

from cvkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
from cvkit.data.draw import draw_label, grid, to_uint8
from cvkit.io import atomic_write_bytes

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner

Draw = Callable[[np.ndarray, torch.Tensor, torch.Tensor], np.ndarray]
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
