"""Frozen BatchNorm stays frozen: Catalyst's ``model.train()`` at every loader start would undo it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from catalyst.core.callback import Callback, CallbackOrder

from cvkit.models.groups import set_bn_eval

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class FreezeBatchNormCallback(Callback):
    """Keep frozen BatchNorm modules in eval mode, so their running statistics never move.

    Catalyst calls ``model.train()`` at every loader start, before any callback; this runs after it.
    """

    def __init__(self, bn_names: Sequence[str]) -> None:
        super().__init__(order=CallbackOrder.Internal + 5)
        self.bn_names = list(bn_names)

    def on_loader_start(self, runner: "IRunner") -> None:
        if runner.is_train_loader and self.bn_names:
            set_bn_eval(runner.engine.unwrap_model(runner.model), self.bn_names)


__all__ = ["FreezeBatchNormCallback"]
