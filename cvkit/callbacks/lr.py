"""Learning rate and momentum of every named parameter group, logged per epoch."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
from catalyst.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class LRMonitorCallback(Callback):
    """Log the learning rate (and momentum) of every named parameter group as ``lr/<group>``.

    Catalyst logs group 0 only; cvkit's groups carry a ``name`` (head, backbone, a block).
    Values are taken at the end of each train loader, i.e. the LR the epoch trained with
    (for per-batch schedules, the LR of its last batch). Runs after the scheduler callback.
    """

    GROUP0_KEYS = ("lr", "momentum")  # what Catalyst's optimizer/scheduler callbacks log for group 0 only

    def __init__(self) -> None:
        super().__init__(order=CallbackOrder.Scheduler + 2)

    @staticmethod
    def group_values(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
        """``{"lr/<name>": lr, "momentum/<name>": m}`` for each named group (momentum omitted when None)."""
        out: Dict[str, float] = {}
        for i, group in enumerate(optimizer.param_groups):
            name = group.get("name", f"group{i}")
            out[f"lr/{name}"] = float(group["lr"])
            momentum = group.get("momentum", group.get("betas", (None,))[0])
            if momentum is not None:
                out[f"momentum/{name}"] = float(momentum)
        return out

    def on_loader_end(self, runner: "IRunner") -> None:
        for key in self.GROUP0_KEYS:
            runner.loader_metrics.pop(key, None)
        if runner.is_train_loader and runner.optimizer is not None:
            runner.epoch_metrics["_epoch_"].update(self.group_values(runner.optimizer))

    def on_epoch_end(self, runner: "IRunner") -> None:
        for key in self.GROUP0_KEYS:
            runner.epoch_metrics["_epoch_"].pop(key, None)


__all__ = ["LRMonitorCallback"]
