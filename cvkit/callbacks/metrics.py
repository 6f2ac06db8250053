"""cvkit metrics (:mod:`cvkit.metrics`) computed on every loader of a Catalyst run."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch
from catalyst.core.callback import Callback, CallbackOrder

from cvkit.metrics import Metric

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class MetricsCallback(Callback):
    """Feed ``runner.batch[input_key]`` and ``[target_key]`` to cvkit metrics; write them at loader end."""

    def __init__(
        self,
        metrics: Iterable[Metric],
        input_key: str = "logits",
        target_key: str = "targets",
        loaders: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(order=CallbackOrder.Metric + 2)
        self.metrics = list(metrics)
        self.input_key, self.target_key = input_key, target_key
        self.reads = (input_key, target_key)
        self.loaders = loaders

    def _active(self, runner: "IRunner") -> bool:
        return self.loaders is None or runner.loader_key in self.loaders

    def on_loader_start(self, runner: "IRunner") -> None:
        for metric in self.metrics:
            metric.reset()

    def on_batch_end(self, runner: "IRunner") -> None:
        if self._active(runner):
            for metric in self.metrics:
                metric.update(runner.batch[self.input_key], runner.batch[self.target_key])

    def on_loader_end(self, runner: "IRunner") -> None:
        if self._active(runner):
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            for metric in self.metrics:
                if distributed:
                    metric.sync()
                runner.loader_metrics.update(metric.compute())


__all__ = ["MetricsCallback"]
