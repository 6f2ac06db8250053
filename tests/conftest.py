"""Shared fixtures: tiny separable image data and a timm test model, all on CPU."""
from __future__ import annotations

import warnings
from typing import Dict

import pytest
import torch
from catalyst.core.callback import Callback
from torch.utils.data import DataLoader, Dataset

warnings.filterwarnings("ignore", message=".*tensor.detach.*")
# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads that
# spin-wait on each other make them 10-100x slower; subprocess tests set OMP_NUM_THREADS=1 too.
torch.set_num_threads(1)


def demo_experiment(name: str, demo_root: object, logdir: object, limit: int, **extra: object) -> Dict[str, object]:
    """One epoch of test_resnet at 32 px on ``limit`` demo digits per split: the k-fold, lock and
    bad-input tests' experiment (``extra`` keys replace its top-level ones)."""
    return {"name": name, "task": "classification", "engine": "cpu", "logdir": str(logdir), "seed": 1,
            "data": {"kind": "demo", "root": str(demo_root), "limit": limit},
            "model": {"name": "classifier", "arch": "test_resnet"}, "augmentation": {"preset": "resize", "size": 32},
            "stages": [{"name": "all", "epochs": 1, "lr": 0.003, "batch_size": 8}], **extra}


class TinyImages(Dataset):
    """Random 3x32x32 images whose class shifts the first channel, so a model can learn them."""

    def __init__(self, n: int, num_classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.x[:, 0] += self.y[:, None, None].float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, object]:
        return {"features": self.x[i], "targets": self.y[i], "index": i}


def tiny_loaders(batch_size: int = 16, n_train: int = 48, n_valid: int = 32) -> Dict[str, DataLoader]:
    return {
        "train": DataLoader(TinyImages(n_train, seed=0), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(0)),
        "valid": DataLoader(TinyImages(n_valid, seed=1), batch_size=batch_size),
    }


class Interrupt(Exception):
    """Raised by :class:`StopAtEpoch`: a run cut off between epochs, in-process."""


class StopAtEpoch(Callback):
    """Interrupts a run when epoch ``epoch`` starts (the resume tests continue it)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(order=201)
        self.epoch = epoch

    def on_epoch_start(self, runner) -> None:
        if runner.epoch_step == self.epoch:
            raise Interrupt


@pytest.fixture
def loaders() -> Dict[str, DataLoader]:
    return tiny_loaders()
