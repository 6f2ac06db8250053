"""Checkpoints are data: atomic writes, clear errors for cut-off or code-carrying files."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from cvkit.io import CheckpointError, atomic_write_bytes, load_checkpoint, save_checkpoint, state_dict_of


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_round_trip_with_weights_only(tmp_path):
    payload = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "stage": "head", "metrics": {"valid": {"loss": 0.5}}}
    save_checkpoint(tmp_path / "c.pth", payload)
    got = torch.load(tmp_path / "c.pth", weights_only=True)
    assert torch.equal(got["model"]["w"], payload["model"]["w"]) and got["epoch"] == 3
    assert torch.equal(state_dict_of(load_checkpoint(tmp_path / "c.pth"))["w"], torch.arange(4.0))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "c.pth", {"model": {"w": torch.zeros(1000)}})
    data = (tmp_path / "c.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth.*truncated or corrupted"):
        load_checkpoint(tmp_path / "cut.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth is empty"):
        load_checkpoint(tmp_path / "empty.pth")


def test_pickle_that_runs_code_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "evil": Boom()}, tmp_path / "evil.pth", pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused to load .*evil.pth"):
        load_checkpoint(tmp_path / "evil.pth")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "plain.pkl")


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "temporary file left behind"


WRITER = """
import sys, torch
from cvkit.io import save_checkpoint
path = sys.argv[1]
i = 0
while True:
    i += 1
    save_checkpoint(path, {"model": {"w": torch.full((2_000_000,), float(i))}, "epoch": i})
"""


def test_sigkill_while_writing_leaves_a_complete_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "last.pth"
    for delay in (0.05, 0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        deadline = time.time() + 60
        while not target.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = load_checkpoint(target)
        w = got["model"]["w"]
        assert w.numel() == 2_000_000 and bool((w == got["epoch"]).all())
