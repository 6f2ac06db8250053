"""DataLoaders with defaults chosen for cvkit's runner: fast, and reproducible across resume and DDP.

- ``num_workers``: all cores but one (at most 8) unless told; 0 keeps everything in-process.
- ``pin_memory`` on when a GPU is present (faster host-to-device copies), off on CPU.
- ``prefetch_factor`` 4 with workers, so the model step, not decoding, sets the pace.
- a seeded ``generator`` on train loaders: StagedRunner reseeds it from ``seed + epoch``, so
  every DDP rank shuffles the same way (disjoint shards) and a resumed run replays the same order.
- ``persistent_workers`` stays off by default: workers restarted each epoch are seeded from the
  runner's per-epoch RNG, which is what makes a resumed run equal an uninterrupted one. Turn it on
  when worker start-up is expensive and exact resume does not matter.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset


def default_workers() -> int:
    """All available cores but one, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: Optional[int] = None,
    seed: int = 0,
    pin_memory: Optional[bool] = None,
    persistent_workers: bool = False,
    drop_last: Optional[bool] = None,
    sampler: Optional[Any] = None,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader for a train (shuffled, seeded) or evaluation (in order) pass; see module doc.

    A ``sampler`` with its own ``generator`` (e.g. :class:`cvkit.data.samplers.BalancedSampler`)
    replaces shuffling; the loader shares that generator, so the runner's per-epoch reseeding sets
    the draw and a resumed run replays it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    options: dict = dict(
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=(train and len(dataset) > batch_size) if drop_last is None else drop_last,
    )
    if train:
        options["generator"] = getattr(sampler, "generator", None) or torch.Generator().manual_seed(seed)
    if workers > 0:
        options.update(prefetch_factor=4, persistent_workers=persistent_workers)
    options.update(kwargs)
    return DataLoader(dataset, **options)
