"""Epoch metrics that gather statistics batch by batch and reduce once (constant memory).

A metric has ``reset()``, ``update(outputs, targets)`` and ``compute() -> {name: value}``.
The same objects serve the validation loop (through :class:`cvkit.callbacks.MetricsCallback`)
and the final test evaluation, so a number in ``metrics.json`` means what it meant in training.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Type

import torch

_METRICS: Dict[str, Type["Metric"]] = {}


def register_metric(cls: Type["Metric"]) -> Type["Metric"]:
    """Class decorator: make a metric creatable by its ``name`` attribute."""
    _METRICS[cls.name] = cls
    return cls


def list_metrics() -> List[str]:
    """Names of every registered metric."""
    return sorted(_METRICS)


def create_metric(name: str, **kwargs) -> "Metric":
    """Build a registered metric by name; unknown names list the close matches."""
    if name not in _METRICS:
        close = difflib.get_close_matches(name, list(_METRICS), n=3)
        raise KeyError(f"unknown metric {name!r}" + (f"; did you mean {close}?" if close else "") + f" valid: {list_metrics()}")
    return _METRICS[name](**kwargs)


class Metric:
    """Base class: statistics over a loader, reduced once in :meth:`compute`."""

    name = "metric"

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError

    def sync(self) -> None:
        """Sum the statistics over all processes (called under DDP before :meth:`compute`)."""
        raise NotImplementedError(f"{type(self).__name__} does not support distributed training")


@register_metric
class ClassificationMetrics(Metric):
    """Accuracy and macro F1 from a confusion matrix; targets are class indices or one-hot rows."""

    name = "classification"

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pred = outputs.detach().argmax(dim=1).cpu()
        true = targets.detach().cpu()
        if true.ndim == 2:
            true = true.argmax(dim=1)
        index = true.long() * self.num_classes + pred.long()
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def sync(self) -> None:
        torch.distributed.all_reduce(self.confusion)

    def compute(self) -> Dict[str, float]:
        cm = self.confusion.double()
        tp = cm.diag()
        support = cm.sum(dim=1)
        predicted = cm.sum(dim=0)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
        present = support > 0
        total = cm.sum().item()
        return {
            "accuracy": float(tp.sum().item() / total) if total else 0.0,
            "f1_macro": float(f1[present].mean().item()) if present.any() else 0.0,
        }


MetricFactory = Callable[[], Metric]
