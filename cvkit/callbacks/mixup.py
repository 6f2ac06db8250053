"""Mixup / CutMix of classification train batches through timm's ``Mixup``; targets become soft."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Tuple

import torch
from catalyst.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


def mix_batch(mixer: Any, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm ``Mixup`` on a batch of any size: an odd batch's last sample is left unmixed (timm needs pairs).

    Returns images and soft targets ``(B, num_classes)`` whose rows sum to one.
    """
    from timm.data.mixup import mixup_target

    n = len(x) - len(x) % 2
    if n == 0:
        return x, mixup_target(y, mixer.num_classes, 1.0, mixer.label_smoothing)
    mixed, soft = mixer(x[:n].clone(), y[:n])
    if n == len(x):
        return mixed, soft
    rest = mixup_target(y[n:], mixer.num_classes, 1.0, mixer.label_smoothing).to(soft.dtype)
    return torch.cat([mixed, x[n:]]), torch.cat([soft, rest])


class MixupCallback(Callback):
    """Mix each train batch (images and targets) before the forward pass; valid/infer batches untouched.

    Targets must be class indices (integer, shape ``(B,)``); anything else (boxes, keypoints,
    masks, soft labels) is refused at the first batch, since mixing has no meaning there. The
    number of classes comes from ``options["num_classes"]`` or the model's ``num_classes``. timm
    draws from NumPy's global RNG, which Catalyst reseeds every epoch, so a resumed run mixes alike.
    """

    def __init__(self, options: Mapping[str, Any], input_key: str = "features", target_key: str = "targets",
                 where: str = "") -> None:
        super().__init__(order=CallbackOrder.Internal + 7)
        self.options = dict(options)
        self.input_key, self.target_key, self.where = input_key, target_key, where
        self.reads = (input_key, target_key)
        self.writes = (input_key, target_key)
        self.mixer: Optional[Any] = None

    def on_experiment_start(self, runner: "IRunner") -> None:
        from timm.data import Mixup

        options = dict(self.options)
        if options.get("num_classes") is None:
            classes = getattr(runner.engine.unwrap_model(runner.model), "num_classes", None)
            if not isinstance(classes, int) or classes < 2:
                raise ValueError(f"{self.where}mixup needs the number of classes: the model has no num_classes, "
                                 "so give mixup={'num_classes': N, ...}")
            options["num_classes"] = classes
        self.mixer = Mixup(**options)

    def on_batch_start(self, runner: "IRunner") -> None:
        if not runner.is_train_loader:
            return
        x, y = runner.batch[self.input_key], runner.batch[self.target_key]
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            dtype = y.dtype if isinstance(y, torch.Tensor) else ""
            raise ValueError(f"{self.where}mixup needs class-index targets (integer, shape (B,)); got {dtype} {shape}: "
                             "mixup/cutmix has no meaning for this task, remove 'mixup' from the stage")
        runner.batch[self.input_key], runner.batch[self.target_key] = mix_batch(self.mixer, x, y)


__all__ = ["MixupCallback", "mix_batch"]
