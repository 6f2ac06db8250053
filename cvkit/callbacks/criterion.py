"""Criterion callbacks: the loss of each batch (its batch keys declared), and a criterion attribute set per stage."""
from __future__ import annotations

from typing import Any

from catalyst.callbacks.criterion import CriterionCallback as _CatalystCriterionCallback
from catalyst.core.callback import Callback, CallbackOrder


class CriterionCallback(_CatalystCriterionCallback):
    """Catalyst's ``CriterionCallback``: ``criterion(batch[input_key], batch[target_key])`` into
    ``batch_metrics[metric_key]``; declares those keys and sits just after Catalyst's Metric order."""

    def __init__(self, input_key: str, target_key: str, metric_key: str, **kwargs: Any) -> None:
        super().__init__(input_key=input_key, target_key=target_key, metric_key=metric_key, **kwargs)
        self.order = CallbackOrder.Metric + 1
        self.reads, self.writes = (input_key, target_key), (metric_key,)


class SetCriterionAttribute(Callback):
    """At the start of a stage set ``runner.criterion.<name> = value`` (e.g. a loss weight that changes per stage).

    Give a StagedRunner one per stage (its ``callbacks(stage)`` factory); a criterion without that
    attribute is refused at the stage's start, so a misspelt name cannot be silently ignored.
    """

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(order=CallbackOrder.Internal + 1)
        self.name, self.value = name, value

    def on_experiment_start(self, runner: Any) -> None:
        if not hasattr(runner.criterion, self.name):
            raise AttributeError(f"criterion {type(runner.criterion).__name__} has no attribute {self.name!r} to set")
        setattr(runner.criterion, self.name, self.value)


__all__ = ["CriterionCallback", "SetCriterionAttribute"]
