"""Same seed, same data on CPU: identical metrics and weights, also with DataLoader workers
and albumentations (which keeps its own RNG unless cvkit reseeds it)."""
from __future__ import annotations

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader

from cvkit.data.stl10 import ArrayDataset
from cvkit.io import load_checkpoint
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def run(logdir, workers: int):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 48)
    images = rng.integers(0, 60, (48, 32, 32, 3), dtype=np.uint8)
    images[..., 0] += (labels * 60).astype(np.uint8)[:, None, None]
    aug = A.Compose([A.Affine(rotate=(-20, 20), translate_percent=(-0.1, 0.1), p=1), A.RandomBrightnessContrast(p=1),
                     A.Normalize(), ToTensorV2()])
    plain = A.Compose([A.Normalize(), ToTensorV2()])
    loaders = {
        "train": DataLoader(ArrayDataset(images, labels, aug), 16, shuffle=True, num_workers=workers),
        "valid": DataLoader(ArrayDataset(images[:16], labels[:16], plain), 16, num_workers=workers),
    }
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, drop_rate=0.2)
    StagedRunner().fit(model, [Stage("s", 2, lr=0.01)], loaders, torch.nn.CrossEntropyLoss(), logdir,
                       metrics=lambda: [ClassificationMetrics(3)], verbose=False, seed=7)
    return pd.read_csv(logdir / "log.csv"), load_checkpoint(logdir / "checkpoints" / "s" / "last.pth")["model"]


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_result(tmp_path, workers):
    log_a, weights_a = run(tmp_path / "a", workers)
    log_b, weights_b = run(tmp_path / "b", workers)
    pd.testing.assert_frame_equal(log_a, log_b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
