"""Exponential moving average of the weights (timm's ``ModelEmaV3``), validated in place of the raw weights."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional

import torch
from catalyst.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class EmaCallback(Callback):
    """Keep an EMA of the model after every optimizer step; put it in the model for validation.

    Args:
        options: ModelEmaV3 keyword arguments (``decay``, ``use_warmup``...), see
            :func:`cvkit.stages.ema_options`; ``validate`` is read by :mod:`cvkit.stage_callbacks`, not here.
        ema_loaders: loaders that run with the EMA weights (the valid loader); others see the raw ones.
        resume: ``state_dict()`` of a killed run's EMA, restored at the stage start.

    The update follows timm's ``step`` convention: the first update copies the weights (decay 0),
    then ``ema = decay * ema + (1 - decay) * weights``, after every batch whose optimizer step happened
    (``run_state.stepped``). Its state goes to ``run_state.ema_state`` at every epoch end, for the
    checkpoints (beside the raw weights). While an EMA loader runs, the model holds
    the EMA weights and its raw weights wait in a copy; they are back before the epoch ends.
    """

    def __init__(
        self,
        options: Mapping[str, Any],
        ema_loaders: tuple = ("valid",),
        resume: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Optimizer + 3)
        self.options = {k: v for k, v in options.items() if k != "validate"}
        self.ema_loaders = tuple(ema_loaders)
        self.resume = resume
        self.ema: Any = None
        self.updates = 0
        self._raw: Optional[Dict[str, torch.Tensor]] = None

    @staticmethod
    def _model(runner: "IRunner") -> torch.nn.Module:
        return runner.engine.unwrap_model(runner.model)

    def on_experiment_start(self, runner: "IRunner") -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(self._model(runner), **self.options)
        self.updates = 0
        if self.resume is not None:
            self.ema.module.load_state_dict(self.resume["weights"])
            self.updates = int(self.resume["updates"])

    def on_batch_end(self, runner: "IRunner") -> None:
        if runner.is_train_loader and runner.run_state.stepped:
            self.updates += 1
            self.ema.update(self._model(runner), step=self.updates)

    def on_loader_start(self, runner: "IRunner") -> None:
        if runner.loader_key in self.ema_loaders:
            model = self._model(runner)
            self._raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(self.ema.module.state_dict())

    def on_loader_end(self, runner: "IRunner") -> None:
        if self._raw is not None:
            self._model(runner).load_state_dict(self._raw)
            self._raw = None

    def on_epoch_end(self, runner: "IRunner") -> None:
        runner.run_state.ema_state = self.state_dict()

    def weights(self) -> Dict[str, torch.Tensor]:
        """The EMA weights (CPU copies), e.g. for checkpoints."""
        return {k: v.detach().cpu().clone() for k, v in self.ema.module.state_dict().items()}

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed stage needs to continue the average exactly: weights and update count."""
        return {"weights": self.weights(), "updates": self.updates}


__all__ = ["EmaCallback"]
