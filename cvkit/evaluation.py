"""One evaluation of a model over a loader: mean loss and cvkit metrics, in eval mode, without Catalyst's loop.

The runner's test evaluation at the end of a fit, the examples and tests use this one function.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from catalyst.core.engine import Engine
from torch import nn
from torch.utils.data import DataLoader

from cvkit.data.batch import as_batch
from cvkit.inference.loop import outputs_over
from cvkit.metrics import Metric

MetricsFactory = Callable[[], Iterable[Metric]]


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: Optional[nn.Module] = None,
    metrics: Optional[MetricsFactory] = None,
    engine: Union[None, str, Engine] = None,
    input_key: str = "features",
    target_key: str = "targets",
) -> Dict[str, float]:
    """Loss (mean over samples) and metrics of ``model`` on ``loader``, in eval mode (through
    :func:`cvkit.inference.loop.outputs_over`, the one model-over-loader loop)."""
    device = torch.device("cuda") if isinstance(engine, Engine) and engine.device.type == "cuda" else torch.device("cpu")
    model = model.to(device)
    if criterion is not None:
        criterion = criterion.to(device)
    metric_objs = list(metrics()) if metrics else []
    for metric in metric_objs:
        metric.reset()
    total, count = 0.0, 0
    batches = (as_batch(batch, input_key, target_key) for batch in loader)
    for batch, out in outputs_over(model, batches, device, inputs=input_key):
        y = batch[target_key].to(device)
        if criterion is not None:
            with torch.no_grad():
                loss = criterion(out, y)
            total += float(loss.mean()) * len(y)
            count += len(y)
        for metric in metric_objs:
            metric.update(out, y)
    result: Dict[str, float] = {"loss": total / count} if count else {}
    for metric in metric_objs:
        result.update(metric.compute())
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in result.items()}


__all__ = ["MetricsFactory", "evaluate"]
