"""The one loop that runs a model over a loader: inputs to the device, eval mode, no gradients.

Prediction (:func:`cvkit.inference.predict.prediction_loop`, for checkpoints and exported models
alike), out-of-fold scoring, outlier features and pseudo-labelling all read batches and their
outputs from :func:`outputs_over` instead of writing the loop again.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from cvkit.data.batch import as_batch


def outputs_over(
    model: nn.Module,
    loader: Iterable[Any],
    device: Union[None, str, torch.device] = None,
    forward: Optional[Callable[[Tensor], Tensor]] = None,
    inputs: Union[str, Callable[[Any], Tensor]] = "features",
    failed: Optional[Callable[[Any, RuntimeError], Exception]] = None,
) -> Iterator[Tuple[Any, Tensor]]:
    """``(batch, outputs)`` for each batch of ``loader``, in its order.

    The batch's inputs (``batch[inputs]`` as :func:`cvkit.data.batch.as_batch` reads a batch, or
    ``inputs(batch)`` when it is a function) go to ``device`` (default:
    where ``model``'s parameters are, else the CPU) and through ``forward`` (default ``model``: a TTA, an
    ensemble or a feature extractor instead) without gradients, ``model`` in eval mode; each module's
    train/eval mode is restored when the loop ends. ``failed(batch, error)``: the exception to raise
    instead of a RuntimeError of the model (a one-line error naming the batch's images).
    """
    forward = forward or model
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        for batch in loader:
            x = _inputs(batch, inputs)
            try:
                with torch.no_grad():
                    out = forward(x.to(device))
            except RuntimeError as exc:
                if failed is None:
                    raise
                raise failed(batch, exc) from None
            yield batch, out
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode


def _inputs(batch: Any, inputs: Union[str, Callable[[Any], Tensor]]) -> Tensor:
    if callable(inputs):
        return inputs(batch)
    return as_batch(batch, inputs, need_target=False)[inputs]


__all__ = ["outputs_over"]
