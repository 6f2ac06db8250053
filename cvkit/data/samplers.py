"""Class-balanced sampling: draw train samples with inverse class frequency (``Stage(sampler="balanced")``).

Catalyst's own samplers import ``torch._six`` and fail on torch 2, hence this one. Its order
depends only on the seed and the epoch, so a resumed run draws exactly what the killed one would.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import Sampler


class BalancedSampler(Sampler[int]):
    """Dataset indices drawn with probability proportional to ``1 / count(label)`` (each class equally often).

    Args:
        labels: the class of every dataset row.
        num_samples: draws per epoch (default: the dataset's length).
        replacement: draw with replacement (needed to repeat rare classes).
        generator: a ``torch.Generator`` to draw from; pass the DataLoader's own ``generator`` so
            the StagedRunner's per-epoch reseeding (seed + epoch) sets the draw. Without one, the
            sampler seeds its own from ``seed + epoch`` (call :meth:`set_epoch` every epoch).
        seed: the seed used without a generator.
        num_replicas / rank: shard the epoch's draw for plain DDP (rank ``r`` takes draws
            ``r, r + n, ...``: disjoint shards of one shared draw). Leave them at None under
            Catalyst/accelerate, which shard the loader's batches themselves.
    """

    def __init__(
        self,
        labels: Sequence[int],
        num_samples: Optional[int] = None,
        replacement: bool = True,
        generator: Optional[torch.Generator] = None,
        seed: int = 0,
        num_replicas: Optional[int] = None,
        rank: Optional[int] = None,
    ) -> None:
        labels_t = torch.as_tensor(list(labels), dtype=torch.long)
        if labels_t.dim() != 1 or not len(labels_t):
            raise ValueError(f"BalancedSampler needs one class index per row; got {tuple(labels_t.shape)} labels")
        if bool((labels_t < 0).any()):
            raise ValueError("BalancedSampler labels must be class indices >= 0")
        counts = torch.bincount(labels_t).double()
        self.weights = 1.0 / counts[labels_t]
        self.num_samples = int(num_samples) if num_samples is not None else len(labels_t)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
        if not replacement and self.num_samples > len(labels_t):
            raise ValueError(f"without replacement at most {len(labels_t)} draws fit, got num_samples={self.num_samples}")
        self.num_replicas = int(num_replicas or 1)
        self.rank = int(rank or 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {rank!r}")
        self.replacement, self.generator, self.seed = replacement, generator, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw comes next (used when no generator was given)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=generator)
        if self.num_replicas > 1:
            padded = len(self) * self.num_replicas
            draws = torch.cat([draws, draws[: padded - len(draws)]])[self.rank::self.num_replicas]
        return iter(draws.tolist())


__all__ = ["BalancedSampler"]
