"""A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cvkit.io import load_checkpoint

SCRIPT = Path(__file__).with_name("resume_script.py")


def run(logdir: Path, kill_at: int, resume: bool = False, sigint: bool = False, ema: bool = False) -> int:
    # The script imports this checkout's cvkit (a worktree beside an installed copy included).
    path = os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)])
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = [sys.executable, str(SCRIPT), str(logdir), str(kill_at)]
    args += (["--resume"] if resume else []) + (["--sigint"] if sigint else []) + (["--ema"] if ema else [])
    return subprocess.run(args, env=env, capture_output=True, timeout=300).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("resume") / "full"
    assert run(logdir, 0) == 0
    return logdir


@pytest.fixture(scope="module")
def killed_in_stage_b(tmp_path_factory) -> Path:
    """A run SIGKILLed at train batch 11 (inside stage b), shared by the cases that damage its resume.pth."""
    logdir = tmp_path_factory.mktemp("resume") / "killed"
    assert run(logdir, 11) == -signal.SIGKILL
    return logdir


@pytest.mark.slow
# A plain SIGKILL mid stage b is the EMA test's case below (stage b there also keeps an EMA).
@pytest.mark.parametrize("kill_at,sigint,damage", [(5, False, None), (8, True, None),
                                                  (11, False, "delete"), (11, False, "truncate")],
                         ids=["sigkill-mid-stage-a", "ctrl-c-mid-stage-b", "resume.pth-deleted",
                              "resume.pth-truncated"])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, uninterrupted, request, kill_at, sigint, damage):
    # 3 train batches per epoch: batch 5 is inside epoch 2 (stage a), 8 and 11 inside stage b.
    if damage:
        shutil.copytree(request.getfixturevalue("killed_in_stage_b"), tmp_path / "killed", symlinks=True)
    else:
        code = run(tmp_path / "killed", kill_at, sigint=sigint)
        assert code != 0 and (sigint or code == -signal.SIGKILL)
    resume_file = tmp_path / "killed" / "checkpoints" / "resume.pth"
    assert resume_file.is_file()
    assert (tmp_path / "killed" / ".cvkit.lock").is_file() or sigint, "a SIGKILL leaves its lock behind"
    if damage == "delete":
        resume_file.unlink()
    elif damage == "truncate":
        data = resume_file.read_bytes()
        resume_file.unlink()  # a hard link to last.pth: write a new, cut-off file instead of cutting both
        resume_file.write_bytes(data[: len(data) // 2])
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


@pytest.mark.slow
def test_a_killed_ema_stage_resumes_bit_identically(tmp_path):
    # Stage b (batches 7-15) keeps an EMA and validates both weights; SIGKILL at batch 11, mid-epoch.
    # The uninterrupted reference runs in this process (one thread, as the subprocesses).
    from resume_script import train

    train(str(tmp_path / "full"), ema=True)
    assert run(tmp_path / "killed", 11, ema=True) == -signal.SIGKILL
    cut = load_checkpoint(tmp_path / "killed" / "checkpoints" / "resume.pth")
    assert cut["stage"] == "b" and cut["ema"]["updates"] == 3  # one epoch of b done: 3 optimizer steps
    stage_a = (tmp_path / "killed" / "checkpoints" / "a" / "last.pth").stat().st_mtime_ns
    assert run(tmp_path / "killed", 0, resume=True, ema=True) == 0
    assert (tmp_path / "killed" / "checkpoints" / "a" / "last.pth").stat().st_mtime_ns == stage_a  # resumed, not rerun
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "b" / "last.pth")
    resumed = load_checkpoint(tmp_path / "killed" / "checkpoints" / "b" / "last.pth")
    assert full["ema"]["updates"] == resumed["ema"]["updates"] == 9
    for part in ("model", "model_ema"):
        assert all(torch.equal(full[part][k], resumed[part][k]) for k in full[part]), part
    assert not torch.equal(full["model_ema"]["fc.weight"], full["model"]["fc.weight"])
    best_full, best_resumed = load_checkpoint(tmp_path / "full" / "best.pth"), load_checkpoint(tmp_path / "killed" / "best.pth")
    assert (best_full["epoch"], best_full["weights"]) == (best_resumed["epoch"], best_resumed["weights"])
    assert all(torch.equal(best_full["model"][k], best_resumed["model"][k]) for k in best_full["model"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "full" / "log.csv"), pd.read_csv(tmp_path / "killed" / "log.csv"))


def test_resume_before_any_epoch_finished_starts_from_the_beginning(tmp_path):
    from conftest import tiny_loaders

    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    (tmp_path / "log.csv").write_text("stage,epoch\n")  # killed between the first log row and resume.pth
    with pytest.warns(UserWarning, match="no epoch of this run finished; starting from the beginning"):
        StagedRunner().fit(create_model("test_resnet", 3), [Stage("a", 1)], tiny_loaders(),
                           torch.nn.CrossEntropyLoss(), tmp_path, verbose=False, resume=True)
    assert (tmp_path / "metrics.json").is_file()


def test_a_cut_off_resume_file_without_last_checkpoints_is_one_clear_error(tmp_path):
    from conftest import tiny_loaders

    from cvkit.io import CheckpointError
    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resume.pth").write_bytes(b"PK\x03\x04cut")
    with pytest.raises(CheckpointError, match="cannot resume .*last.pth are missing or unreadable"):
        StagedRunner().fit(create_model("test_resnet", 3), [Stage("a", 1)], tiny_loaders(),
                           torch.nn.CrossEntropyLoss(), tmp_path, verbose=False, resume=True)


def test_resume_with_another_architecture_is_one_line(tmp_path):
    from conftest import tiny_loaders

    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    stages = [Stage("a", 2, lr=0.01)]
    StagedRunner().fit(create_model("test_resnet", 3), stages, tiny_loaders(), torch.nn.CrossEntropyLoss(),
                       tmp_path, verbose=False)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(ValueError, match="holds weights of another model than EfficientNet"):
        StagedRunner().fit(create_model("test_efficientnet", 3), stages, tiny_loaders(),
                           torch.nn.CrossEntropyLoss(), tmp_path, verbose=False, resume=True)


def test_two_runs_on_one_logdir_refuse_and_a_stale_lock_is_taken_over(tmp_path):
    import json
    import socket

    from conftest import tiny_loaders

    from cvkit.lock import LOCK_NAME, RunLockedError
    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    def fit():
        StagedRunner().fit(create_model("test_resnet", 3), [Stage("a", 1)], tiny_loaders(),
                           torch.nn.CrossEntropyLoss(), tmp_path, verbose=False)

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(RunLockedError, match=f"being written by another run \\(pid {live.pid}"):
            fit()
        assert not (tmp_path / "config.json").exists()
    finally:
        live.kill()
        live.wait()
    with pytest.warns(UserWarning, match="taking over a stale lock"):
        fit()
    assert (tmp_path / "metrics.json").is_file() and not (tmp_path / LOCK_NAME).exists()
