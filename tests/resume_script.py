"""A small staged run for the resume tests: ``python resume_script.py LOGDIR KILL_AT_BATCH [--resume] [--sigint] [--ema]``.

It SIGKILLs itself at the given train batch (0: never), mid-epoch, like a pre-emption, or sends
itself SIGINT (Ctrl-C) with ``--sigint``. With ``--ema`` the second stage keeps an EMA of the
weights (with warm-up) and validates both the EMA and the raw weights. The data are JPEG files
read through the ``medium`` (train) and ``resize`` (valid) presets, so the resumed run also repeats
the one-warp augmentation and the reduced JPEG decoding.
"""
import os
import signal
import sys
from pathlib import Path
from typing import Dict

import cv2
import numpy as np
import pandas as pd
import torch
from catalyst.core.callback import Callback
from torch.utils.data import DataLoader

from cvkit.data import ClassificationDataset, create_preset
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


class KillAt(Callback):
    def __init__(self, batch: int, sig: int) -> None:
        super().__init__(order=200)
        self.batch, self.sig = batch, sig
        self.seen = 0

    def on_batch_end(self, runner) -> None:
        if runner.is_train_loader:
            self.seen += 1
            if self.seen == self.batch:
                os.kill(os.getpid(), self.sig)


def jpeg_table(folder: Path, n: int, seed: int) -> pd.DataFrame:
    """``n`` 128x160 JPEGs whose class brightens the red channel, written the same way every time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    folder.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        image = cv2.resize(rng.integers(0, 120, (16, 20, 3), dtype=np.uint8), (160, 128))
        image[..., 2] = np.clip(image[..., 2].astype(int) + 60 * int(label), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{seed}_{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return pd.DataFrame({"path": [f"{seed}_{i}.jpg" for i in range(n)], "label": [str(v) for v in labels]})


def jpeg_loaders(folder: Path) -> Dict[str, DataLoader]:
    """48 train images (``medium`` at 32 px: crops decoded at 1/2 or 1/4) and 32 valid (``resize``: 1/4)."""
    classes = {"0": 0, "1": 1, "2": 2}
    train = ClassificationDataset(jpeg_table(folder, 48, 0), root=folder, class_map=classes,
                                  transform=create_preset("medium", 32))
    valid = ClassificationDataset(jpeg_table(folder, 32, 1), root=folder, class_map=classes,
                                  transform=create_preset("resize", 32))
    return {"train": DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)),
            "valid": DataLoader(valid, batch_size=16)}


def train(logdir: str, kill_at: int = 0, resume: bool = False, sigint: bool = False, ema: bool = False) -> None:
    """The run; in a test process too (the uninterrupted reference needs no kill)."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, drop_rate=0.2)
    stages = [
        Stage("a", 2, trainable="head", lr=0.05, optimizer="sgd"),
        Stage("b", 3, lr=0.01, scheduler="onecycle", early_stopping=dict(patience=5),
              ema=dict(decay=0.8, use_warmup=True, validate="both") if ema else None),
    ]
    kill = KillAt(kill_at, signal.SIGINT if sigint else signal.SIGKILL)
    StagedRunner().fit(
        model, stages, jpeg_loaders(Path(logdir).parent / f"{Path(logdir).name}_data"), torch.nn.CrossEntropyLoss(),
        logdir, verbose=False,
        metrics=lambda: [ClassificationMetrics(3)], callbacks=lambda s: [kill], resume=resume,
    )


def main() -> None:
    train(sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv, "--sigint" in sys.argv, "--ema" in sys.argv)


if __name__ == "__main__":
    main()
