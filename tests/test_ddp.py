"""StagedRunner under Catalyst's DDP engine on CPU (gloo, 2 processes)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cvkit.io import load_checkpoint

SCRIPT = Path(__file__).with_name("ddp_script.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(logdir: Path, mode: str) -> None:
    # The script imports this checkout's cvkit (a worktree beside an installed copy included).
    path = os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)])
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(logdir), mode, str(free_port())], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_ddp_shards_disjoint_ranks_agree_and_match_single_process(tmp_path):
    run(tmp_path / "ddp", "ddp")
    run(tmp_path / "single", "single")
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    for stage, epochs in (("head", [1]), ("all", [2, 3])):
        for epoch in epochs:
            r0 = json.loads((ddp / f"indices_{stage}_e{epoch}_r0.json").read_text())
            r1 = json.loads((ddp / f"indices_{stage}_e{epoch}_r1.json").read_text())
            assert not set(r0) & set(r1), f"ranks' shards overlap in epoch {epoch}"
            assert sorted(r0 + r1) == list(range(64))
            one = json.loads((single / f"indices_{stage}_e{epoch}_r0.json").read_text())
            assert sorted(one) == list(range(64))
        w0 = load_checkpoint(ddp / f"weights_{stage}_r0.pth")["model"]
        w1 = load_checkpoint(ddp / f"weights_{stage}_r1.pth")["model"]
        assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks diverged"
        ws = load_checkpoint(single / f"weights_{stage}_r0.pth")["model"]
        for k in w0:
            assert torch.allclose(w0[k], ws[k], atol=1e-4, rtol=1e-3), k
    parent = json.loads((ddp / "parent.json").read_text())
    assert parent["epochs"] == [1, 2, 3], "the parent process lost the workers' history"
    assert (ddp / "best.pth").is_file() and not (ddp / "checkpoints" / "all" / "best.pth.tmp").exists()
