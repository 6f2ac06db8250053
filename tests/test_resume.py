"""A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cvkit.io import load_checkpoint

SCRIPT = Path(__file__).with_name("resume_script.py")


def run(logdir: Path, kill_at: int, resume: bool = False, sigint: bool = False) -> int:
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parent), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), str(logdir), str(kill_at)]
    args += (["--resume"] if resume else []) + (["--sigint"] if sigint else [])
    return subprocess.run(args, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("resume") / "full"
    assert run(logdir, 0) == 0
    return logdir


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,sigint", [(5, False), (11, False), (8, True)],
                         ids=["sigkill-mid-stage-a", "sigkill-mid-stage-b", "ctrl-c-mid-stage-b"])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, uninterrupted, kill_at, sigint):
    # 3 train batches per epoch: batch 5 is inside epoch 2 (stage a), 8 and 11 inside stage b.
    code = run(tmp_path / "killed", kill_at, sigint=sigint)
    assert code != 0 and (sigint or code == -signal.SIGKILL)
    assert (tmp_path / "killed" / "checkpoints" / "resume.pth").is_file()
    assert run(tmp_path / "killed", 0, resume=True) == 0
    full = load_checkpoint(uninterrupted / "best.pth")
    resumed = load_checkpoint(tmp_path / "killed" / "best.pth")
    assert full["epoch"] == resumed["epoch"]
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    a = pd.read_csv(uninterrupted / "log.csv")
    b = pd.read_csv(tmp_path / "killed" / "log.csv")
    pd.testing.assert_frame_equal(a, b)
    last_full = load_checkpoint(uninterrupted / "checkpoints" / "b" / "last.pth")["model"]
    last_resumed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "b" / "last.pth")["model"]
    assert all(torch.equal(last_full[k], last_resumed[k]) for k in last_full)


def test_resume_without_state_is_a_clear_error(tmp_path):
    from conftest import tiny_loaders

    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    with pytest.raises(FileNotFoundError, match="nothing to resume.*resume.pth"):
        StagedRunner().fit(create_model("test_resnet", 3), [Stage("a", 1)], tiny_loaders(),
                           torch.nn.CrossEntropyLoss(), tmp_path, verbose=False, resume=True)
