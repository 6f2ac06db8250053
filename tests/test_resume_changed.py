"""Resuming with changed stage settings (`--resume-changed`): the interrupted stage continues on the new
settings' schedule, as an uninterrupted run with them would be at that epoch, and config.json says so."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
import torch
from conftest import Interrupt, StopAtEpoch, tiny_loaders

import cvkit.runners
from cvkit.config import load_config
from cvkit.training import run
from cvkit.io import load_checkpoint
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def fit(logdir: Path, stage: Stage, stop_at: Optional[int] = None, resume: bool = False) -> None:
    torch.manual_seed(0)
    StagedRunner().fit(create_model("test_resnet", 3), [stage], tiny_loaders(), torch.nn.CrossEntropyLoss(), logdir,
                       verbose=False, loggers=[], resume=resume,
                       callbacks=lambda s: [StopAtEpoch(stop_at)] if stop_at else [])


def lrs(logdir: Path) -> pd.DataFrame:
    """The ``lr/<group>`` columns of log.csv, one row per epoch."""
    log = pd.read_csv(logdir / "log.csv")
    return log[[c for c in log.columns if c.startswith("lr/")]].reset_index(drop=True)


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
@pytest.mark.parametrize("change", [{"epochs": 4}, {"lr": 0.03}], ids=["more-epochs", "new-lr"])
def test_the_interrupted_stage_continues_on_the_new_schedule(tmp_path, monkeypatch, scheduler, change):
    old = {"epochs": 3, "lr": 0.01, "scheduler": scheduler, "optimizer": "sgd"}
    new = {**old, **change}
    with pytest.raises(Interrupt):
        fit(tmp_path / "run", Stage("a", **old), stop_at=3)  # two epochs done
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "resume.pth")["optimizer"]["state"]
    restored, restore = [], cvkit.runners.restore_schedule

    def restoring(state, stage, optimizer, *args) -> None:
        restore(state, stage, optimizer, *args)
        restored.append(copy.deepcopy(optimizer.state_dict()["state"]))  # training moves the live tensors on

    monkeypatch.setattr(cvkit.runners, "restore_schedule", restoring)
    fit(tmp_path / "run", Stage("a", **new), resume=True)
    assert saved and all(torch.equal(saved[i]["momentum_buffer"], restored[0][i]["momentum_buffer"]) for i in saved)
    fit(tmp_path / "reference", Stage("a", **new))
    resumed, reference = lrs(tmp_path / "run"), lrs(tmp_path / "reference")
    assert len(resumed) == new["epochs"] and (resumed.iloc[-1] > 0).all()
    pd.testing.assert_frame_equal(resumed.iloc[2:], reference.iloc[2:])


def test_more_epochs_for_a_run_killed_after_its_last_epoch_train_on_and_are_recorded(tmp_path, monkeypatch):
    spec = {"name": "grow", "task": "classification", "engine": "cpu", "logdir": str(tmp_path / "run"), "loggers": [],
            "data": {"kind": "demo", "root": str(tmp_path / "demo"), "limit": 24},
            "model": {"name": "classifier", "arch": "test_resnet"}, "augmentation": {"preset": "resize", "size": 32},
            "stages": [{"name": "all", "epochs": 2, "lr": 0.01, "scheduler": "cosine", "batch_size": 8}]}
    save = cvkit.run_folder.save_checkpoint

    def saving(path, payload) -> None:
        if Path(path) == tmp_path / "run" / "best.pth":
            raise Interrupt  # killed after the last epoch's checkpoint
        save(path, payload)

    with monkeypatch.context() as patch:
        patch.setattr(cvkit.run_folder, "save_checkpoint", saving)
        with pytest.raises(Interrupt):
            run(load_config(spec), verbose=False)
    spec["stages"][0]["epochs"] = 3
    run(load_config(spec), resume=True, verbose=False, allow_changes=True)
    # epochs 1-2 on the 2-epoch cosine they ran with; epoch 3 where a 3-epoch cosine is (not 0)
    cosine = [0.01, 0.005, 0.01 * (1 + math.cos(math.pi * 2 / 3)) / 2]
    assert lrs(tmp_path / "run").iloc[:, 0].tolist() == pytest.approx(cosine)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["stages"][0]["epochs"] == 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 3
    assert saved["resumed_with_changes"] == [{"keys": ["stages.0.epochs"], "before": {"stages.0.epochs": 2},
                                              "resumed_after": {"stage": "all", "epoch": 2}}]
