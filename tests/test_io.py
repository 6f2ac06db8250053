"""Checkpoints are data: atomic writes, clear errors for cut-off or code-carrying files."""
from __future__ import annotations

import errno
import os
import pickle
import stat
import time
import zipfile

import pytest
import torch

from cvkit.io import (
    CheckpointError,
    DiskFullError,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    clean_stale_temporaries,
    load_checkpoint,
    safe_child,
    save_checkpoint,
    state_dict_of,
)


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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        save_checkpoint(tmp_path / "c.pth", {"w": torch.zeros(1)})
        with open(tmp_path / "plain", "wb"):
            pass
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["a.bin", "m.json", "c.pth", "plain"], 0o666 & ~umask)


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old")
    target.chmod(0o640)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640


def _fill_then_fail(error):
    def write(f):
        f.write(b"partial" * 1000)
        raise error
    return write


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4288"),
])
def test_full_disk_is_one_clear_error_and_the_old_file_survives(tmp_path, monkeypatch, error):
    target = tmp_path / "best.pth"
    save_checkpoint(target, {"model": {"w": torch.ones(3)}})
    before = target.read_bytes()

    def save(obj, f, *args, **kwargs):
        _fill_then_fail(error)(f)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFullError) as info:
        save_checkpoint(target, {"model": {"w": torch.zeros(3)}})
    message = str(info.value)
    assert message.startswith(f"no space left on {target} (") and "\n" not in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pth"]


def test_other_write_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "x.json", _fill_then_fail(OSError(errno.EIO, "I/O error")))
    assert not isinstance(info.value, DiskFullError) and info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


HANGING_WRITER = """
import sys, time
from cvkit.io import atomic_write
def write(f):
    f.write(b"half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], write)
"""


def test_clean_stale_temporaries_removes_only_those_of_dead_writers(tmp_path):
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, str(run / "checkpoints" / "last.pth")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        left = [p for p in (run / "checkpoints").iterdir()]
        assert len(left) == 1 and left[0].name.startswith(".last.pth.") and left[0].name.endswith(".cvkit-tmp")
        assert clean_stale_temporaries(run) == [] and left[0].exists(), "removed a live writer's file"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (run / ".hidden").write_text("mine")
    (run / "notes.tmp").write_text("mine")
    other_host_fresh = run / ".best.pth.0badc0de-12-0123abcd.cvkit-tmp"
    other_host_old = run / ".best.pth.0badc0de-13-0123abcd.cvkit-tmp"
    before_names = run / ".config.json.k3j_9xqa.tmp"  # an old mkstemp temporary
    for p in (other_host_fresh, other_host_old, before_names):
        p.write_bytes(b"x")
    for p in (other_host_old, before_names):
        os.utime(p, (time.time() - 7200, time.time() - 7200))
    removed = clean_stale_temporaries(run)
    assert removed == sorted([left[0], other_host_old, before_names])
    assert sorted(p.name for p in run.rglob("*") if p.is_file()) == sorted(
        [".hidden", "notes.tmp", other_host_fresh.name])
    assert clean_stale_temporaries(tmp_path / "absent") == []


def _assert_one_line(info, *parts):
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_every_bad_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    save_checkpoint(tmp_path / "good.pth", {"model": {"w": torch.zeros(1000)}, "epoch": 1})
    data = (tmp_path / "good.pth").read_bytes()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "missing.pth")
    _assert_one_line(info, "missing.pth", "not found", "expected a .pth or .safetensors file")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "run")
    _assert_one_line(info, str(tmp_path / "run"), "folder without best.pth", "expected a checkpoint file")
    for cut in (30, len(data) // 2, len(data) - 10):  # the last one used to leak "negative seek value"
        (tmp_path / "cut.pth").write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / "cut.pth")
        _assert_one_line(info, "cut.pth", "truncated or corrupted")
    torch.save({"model": {"w": torch.zeros(1)}, "evil": Boom()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pth")
    _assert_one_line(info, "refused to load", "evil.pth", "GLOBAL posix.system", "safetensors")
    foreign = {"notes.txt": b"hello world, not a checkpoint", "config.json": b'{"lr": 0.1}',
               "image.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}
    for name, content in foreign.items():  # text used to leak KeyError, JSON was "refused ... could run code"
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        _assert_one_line(info, name, "is not a checkpoint", "expected a torch .pth file")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("a.txt", "hi")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "images.zip")
    _assert_one_line(info, "images.zip", "not a torch checkpoint (no data.pkl")
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "tensor.pth")
    _assert_one_line(info, "tensor.pth", "holds a Tensor, expected a dict")


def test_a_run_folder_loads_its_best_pth_and_safetensors_are_recognised_by_content(tmp_path):
    from safetensors.torch import save_file

    save_checkpoint(tmp_path / "best.pth", {"model": {"w": torch.arange(3.0)}})
    assert torch.equal(load_checkpoint(tmp_path)["model"]["w"], torch.arange(3.0))
    save_file({"w": torch.arange(2.0)}, str(tmp_path / "model.bin"))
    assert torch.equal(load_checkpoint(tmp_path / "model.bin")["w"], torch.arange(2.0))


def test_safe_child_refuses_names_that_leave_the_folder(tmp_path):
    assert safe_child(tmp_path, "cat") == tmp_path / "cat"
    assert safe_child(tmp_path, "a/b/../c") == tmp_path / "a" / "c"
    for name in ("", " ", ".", "..", "../x", "../../x", "a/../../x", "/abs/x", str(tmp_path / "x"), "a\0b"):
        with pytest.raises(ValueError) as info:
            safe_child(tmp_path, name)
        assert "\n" not in str(info.value) and repr(name) in str(info.value)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        safe_child(tmp_path, "link/x")
