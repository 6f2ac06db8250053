"""One evaluation of a model over a loader: mean loss and cvkit metrics, in eval mode, without Catalyst's loop.

The runner's test evaluation at the end of a fit, the examples and tests use this one function.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

import torch
from catalyst.core.engine import Engine
from torch import nn
from torch.utils.data import DataLoader

from cvkit.metrics import Metric

MetricsFactory = Callable[[], Iterable[Metric]]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: Optional[nn.Module] = None,
    metrics: Optional[MetricsFactory] = None,
    engine: Union[None, str, Engine] = None,
    input_key: str = "features",
    target_key: str = "targets",
) -> Dict[str, float]:
    """Loss (mean over samples) and metrics of ``model`` on ``loader``, in eval mode."""
    device = torch.device("cuda") if isinstance(engine, Engine) and engine.device.type == "cuda" else torch.device("cpu")
    model = model.to(device).eval()
    if criterion is not None:
        criterion = criterion.to(device)
    metric_objs = list(metrics()) if metrics else []
    for metric in metric_objs:
        metric.reset()
    total, count = 0.0, 0
    for batch in loader:
        if not isinstance(batch, Mapping):
            batch = {input_key: batch[0], target_key: batch[1]}
        x = batch[input_key].to(device)
        y = batch[target_key].to(device)
        out = model(x)
        if criterion is not None:
            loss = criterion(out, y)
            n = len(x)
            total += float(loss.mean()) * n
            count += n
        for metric in metric_objs:
            metric.update(out, y)
    result: Dict[str, float] = {"loss": total / count} if count else {}
    for metric in metric_objs:
        result.update(metric.compute())
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in result.items()}


__all__ = ["MetricsFactory", "evaluate"]
