"""A small staged run for the resume tests: ``python resume_script.py LOGDIR KILL_AT_BATCH [--resume] [--sigint]``.

It SIGKILLs itself at the given train batch (0: never), mid-epoch, like a pre-emption, or sends
itself SIGINT (Ctrl-C) with ``--sigint``.
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


def main() -> None:
    logdir, kill_at = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, drop_rate=0.2)
    stages = [
        Stage("a", 2, trainable="head", lr=0.05, optimizer="sgd"),
        Stage("b", 3, lr=0.01, scheduler="onecycle", early_stopping=dict(patience=5)),
    ]
    StagedRunner().fit(
        model, stages, tiny_loaders(), torch.nn.CrossEntropyLoss(), logdir, verbose=False,
        metrics=lambda: [ClassificationMetrics(3)], callbacks=lambda s, kill=KillAt(kill_at, signal.SIGINT if "--sigint" in sys.argv else signal.SIGKILL): [kill],
        resume="--resume" in sys.argv,
    )


if __name__ == "__main__":
    main()
