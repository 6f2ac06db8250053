"""A small staged run for the resume tests: ``python resume_script.py LOGDIR KILL_AT_BATCH [--resume] [--sigint] [--ema]``.

It SIGKILLs itself at the given train batch (0: never), mid-epoch, like a pre-emption, or sends
itself SIGINT (Ctrl-C) with ``--sigint``. With ``--ema`` the second stage keeps an EMA of the
weights (with warm-up) and validates both the EMA and the raw weights.
"""
import os
import signal
import sys

import torch
from catalyst.core.callback import Callback

from conftest import tiny_loaders
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
        model, stages, tiny_loaders(), torch.nn.CrossEntropyLoss(), logdir, verbose=False,
        metrics=lambda: [ClassificationMetrics(3)], callbacks=lambda s: [kill], resume=resume,
    )


def main() -> None:
    train(sys.argv[1], int(sys.argv[2]), "--resume" in sys.argv, "--sigint" in sys.argv, "--ema" in sys.argv)


if __name__ == "__main__":
    main()
