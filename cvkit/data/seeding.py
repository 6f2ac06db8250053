"""Make albumentations follow the run's seed.

albumentations 2.x gives every ``Compose`` its own random state, untouched by ``torch``/``numpy``
seeding, so two runs with the same seed (or a resumed run) would augment differently. cvkit
datasets reseed the pipeline for every sample from torch's RNG, which Catalyst reseeds from
``seed + epoch`` in the main process and DataLoader seeds per worker: augmentations become a
function of (seed, epoch, worker, sample order), with or without ``num_workers``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def reseed_transform(transform: Any) -> None:
    """Reseed an albumentations pipeline from torch's current RNG (no-op for other callables)."""
    set_state = getattr(transform, "set_random_state", None)
    if set_state is None:
        return
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    set_state(np.random.default_rng(seed), random.Random(seed))
