"""A 2-process CPU DDP staged run (gloo) or its single-process twin, for tests/test_ddp.py.

    python ddp_script.py LOGDIR ddp|single PORT
Writes, per rank and epoch, the sample indices it trained on, and each rank's final weights.
"""
import json
import sys
from pathlib import Path

import torch
from catalyst import dl
from catalyst.core.callback import Callback
from torch.utils.data import DataLoader

from conftest import TinyImages
from cvkit.distributed import ddp_engine
from cvkit.io import save_checkpoint
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


class Record(Callback):
    def __init__(self, logdir: str) -> None:
        super().__init__(order=200)
        self.logdir = Path(logdir)
        self.seen = []

    def on_loader_start(self, runner) -> None:
        self.seen = []

    def on_batch_end(self, runner) -> None:
        if runner.is_train_loader:
            self.seen += runner.batch["index"].tolist()

    def on_loader_end(self, runner) -> None:
        if runner.is_train_loader:
            name = f"indices_{runner.stage.name}_e{runner.epoch_step}_r{runner.engine.process_index}.json"
            (self.logdir / name).write_text(json.dumps(self.seen))

    def on_experiment_end(self, runner) -> None:
        model = runner.engine.unwrap_model(runner.model)
        save_checkpoint(self.logdir / f"weights_{runner.stage.name}_r{runner.engine.process_index}.pth",
                        {"model": model.state_dict()})


def main() -> None:
    logdir, mode, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    Path(logdir).mkdir(parents=True, exist_ok=True)
    per_rank = 8 if mode == "ddp" else 16
    loaders = {
        "train": DataLoader(TinyImages(64, seed=0), batch_size=per_rank, shuffle=True,
                            generator=torch.Generator().manual_seed(0)),
        "valid": DataLoader(TinyImages(32, seed=1), batch_size=16),
    }
    engine = ddp_engine(port=port, workers=2, cpu=True) if mode == "ddp" else dl.CPUEngine()
    torch.manual_seed(0)
    model = create_model("test_vit", 3)
    stages = [Stage("head", 1, trainable="head", lr=0.1, optimizer="sgd", optimizer_kwargs=dict(momentum=0.0)),
              Stage("all", 2, trainable="blocks.3", lr={"head": 0.05, "backbone": 0.01}, optimizer="sgd")]
    runner = StagedRunner().fit(model, stages, loaders, torch.nn.CrossEntropyLoss(), logdir, engine=engine,
                                metrics=lambda: [ClassificationMetrics(3)], callbacks=lambda s: [Record(logdir)],
                                verbose=False, seed=3)
    (Path(logdir) / "parent.json").write_text(json.dumps({"epochs": [r["epoch"] for r in runner.history],
                                                          "best": runner.best}))


if __name__ == "__main__":
    main()
