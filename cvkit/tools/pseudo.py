"""Pseudo-labelling: label unlabelled images with a trained model's confident predictions.

The STL-10 project predicted its 100k unlabelled images with light augmentation, kept the
predictions above a confidence threshold and trained on labelled + pseudo-labelled images with
strong augmentation. :func:`pseudo_label` does the first two steps, :class:`PseudoLabelled`
serves the kept images with their new labels (concatenate it with the labelled set).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class PseudoLabels:
    """The kept predictions: positions in the unlabelled set, their labels and confidences."""

    indices: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    total: int

    @property
    def kept_fraction(self) -> float:
        """Share of the unlabelled images that got a label."""
        return len(self.indices) / self.total if self.total else 0.0

    def class_counts(self, num_classes: int) -> np.ndarray:
        """How many images each class received."""
        return np.bincount(self.labels, minlength=num_classes)

    def summary(self) -> Dict[str, Any]:
        """Plain numbers for config.json / logs."""
        return {"kept": int(len(self.indices)), "total": int(self.total), "kept_fraction": round(self.kept_fraction, 4),
                "mean_confidence": float(self.confidence.mean()) if len(self.confidence) else None}


@torch.no_grad()
def pseudo_label(
    model: nn.Module,
    loader: DataLoader,
    threshold: float = 0.9,
    max_per_class: Optional[int] = None,
    predict: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
) -> PseudoLabels:
    """Predict every image of ``loader`` and keep those whose top softmax probability is >= ``threshold``.

    Args:
        model: a classifier giving logits ``(B, C)``; run in eval mode on its own device.
        loader: the unlabelled images (batches with ``features`` and ``index``), with weak or no
            augmentation.
        threshold: minimum confidence, in (0, 1].
        max_per_class: keep at most this many per class (the most confident), so one easy class
            cannot swamp the others.
        predict: ``f(model, images) -> probabilities`` instead of ``softmax(model(images))`` (e.g. TTA).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a probability in (0, 1], got {threshold}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    from cvkit.inference.loop import outputs_over

    def forward(x: torch.Tensor) -> torch.Tensor:
        return predict(model, x) if predict is not None else model(x).float().softmax(dim=1)

    indices, probs = [], []
    for batch, p in outputs_over(model, loader, forward=forward):
        probs.append(p.float().cpu())
        indices.append(torch.as_tensor(batch["index"]).long())
    if not probs:
        raise ValueError("the unlabelled loader is empty")
    confidence, labels = torch.cat(probs).max(dim=1)
    index = torch.cat(indices)
    keep = confidence >= threshold
    index, labels, confidence = index[keep].numpy(), labels[keep].numpy(), confidence[keep].numpy()
    if max_per_class is not None:
        chosen = [np.flatnonzero(labels == c)[np.argsort(-confidence[labels == c], kind="stable")[:max_per_class]]
                  for c in np.unique(labels)]
        order = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
        index, labels, confidence = index[order], labels[order], confidence[order]
    return PseudoLabels(index.astype(np.int64), labels.astype(np.int64), confidence.astype(np.float32), total=len(keep))


class PseudoLabelled(Dataset):
    """The kept images of an unlabelled dataset, with ``targets`` replaced by their pseudo-labels.

    ``index_offset`` is added to each item's ``index`` so that, concatenated after a labelled set
    of that length, indices stay unique.
    """

    def __init__(self, unlabelled: Dataset, labels: PseudoLabels, index_offset: int = 0) -> None:
        self.unlabelled, self.labels, self.index_offset = unlabelled, labels, index_offset

    def __len__(self) -> int:
        return len(self.labels.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = dict(self.unlabelled[int(self.labels.indices[i])])
        item["targets"] = torch.tensor(int(self.labels.labels[i]), dtype=torch.int64)
        item["index"] = self.index_offset + i
        return item


__all__ = ["PseudoLabelled", "PseudoLabels", "pseudo_label"]
