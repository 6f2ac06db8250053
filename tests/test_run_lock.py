"""The run lock covers every write into a run folder (issue #24): a second `cvkit train` on the same
logdir, started at any point of the first run's life, refuses in one line and writes nothing there.

The second command runs in another process that loads cvkit once and then runs each command it is sent
(``cvkit.cli.main``, the `cvkit` command itself): a fresh interpreter per command would spend most of
the test importing torch and Catalyst.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import yaml

from conftest import demo_experiment
from cvkit.config import load_config
from cvkit.lock import LOCK_NAME, RunLock, RunLockedError

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
SECOND = """
import contextlib, io, json, sys
import cvkit.export, cvkit.kfold, cvkit.training
from cvkit.cli import main
print("ready", flush=True)
for line in sys.stdin:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(json.loads(line))
    print(json.dumps({"code": code, "stderr": err.getvalue()}), flush=True)
"""


class Second:
    """Another process running `cvkit` commands on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SECOND], env=ENV, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = False

    def __call__(self, args: List[str]) -> Tuple[int, str]:
        """Exit code and stderr of ``cvkit ARGS``."""
        if not self.ready:
            assert self.proc.stdout.readline().strip() == "ready"
            self.ready = True
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["code"], reply["stderr"]


@pytest.fixture(scope="module")
def second() -> Iterator[Second]:
    """Started first, so it loads cvkit while the first run trains."""
    process = Second()
    yield process
    process.proc.stdin.close()
    process.proc.wait(timeout=60)


def experiment(demo_root: Path, logdir: Path) -> dict:
    """One epoch of test_resnet on 24 demo digits per split, no TensorBoard (its writer thread would touch
    the folder while the first run waits)."""
    return demo_experiment("locked", demo_root, logdir, 24, loggers=[])


def snapshot(folder: Path) -> Dict[str, Tuple[int, int]]:
    """Every file and folder under ``folder``: size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def refused(second: Second, args: List[str], folder: Path) -> None:
    """``cvkit ARGS`` in the other process while this one holds ``folder``: exit 2, one line naming this
    process, nothing in ``folder`` created, changed or removed."""
    before = snapshot(folder)
    assert LOCK_NAME in before, f"{folder} is not held at this point"
    code, stderr = second(args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert f"{folder} is being written by another run (pid {os.getpid()}" in lines[0]
    assert snapshot(folder) == before


def test_a_second_train_refuses_before_fit_in_an_epoch_in_post_processing_and_at_metrics(second, tmp_path, monkeypatch):
    import cvkit.run_folder
    import cvkit.runners
    import cvkit.training
    from cvkit.callbacks.lr import LRMonitorCallback
    from cvkit.training import run

    logdir = tmp_path / "run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "demo", logdir)))
    seen: List[str] = []

    def probe(point: str) -> None:
        if point not in seen:
            seen.append(point)
            refused(second, ["train", str(path), "--quiet"], logdir)

    fit, on_loader_end = cvkit.runners.StagedRunner.fit, LRMonitorCallback.on_loader_end
    tune, write_json = cvkit.training._tune, cvkit.run_folder.atomic_write_json

    def before_fit(self, *args, **kwargs):
        assert (logdir / "classes.json").is_file()
        probe("before fit")
        return fit(self, *args, **kwargs)

    def in_epoch(self, runner) -> None:
        probe("during an epoch")
        on_loader_end(self, runner)

    def tuning(experiment, model):
        probe("post-processing")
        return tune(experiment, model)

    def writing(target, obj) -> None:
        if Path(target).name == "metrics.json":
            probe("metrics.json")
        write_json(target, obj)

    monkeypatch.setattr(cvkit.runners.StagedRunner, "fit", before_fit)
    monkeypatch.setattr(LRMonitorCallback, "on_loader_end", in_epoch)
    monkeypatch.setattr(cvkit.training, "_tune", tuning)
    monkeypatch.setattr(cvkit.run_folder, "atomic_write_json", writing)
    result = run(load_config(experiment(tmp_path / "demo", logdir)), verbose=False)
    assert seen == ["before fit", "during an epoch", "post-processing", "metrics.json"]
    assert json.loads((logdir / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert not (logdir / LOCK_NAME).exists()


def test_kfold_holds_its_folder_while_folds_and_the_summaries_are_written(second, tmp_path, monkeypatch):
    import cvkit.kfold
    import cvkit.run_folder
    from cvkit.callbacks.lr import LRMonitorCallback
    from cvkit.kfold import kfold

    logdir = tmp_path / "kf"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "demo", logdir)))
    again = ["train", str(path), "--folds", "2", "--quiet"]
    seen: List[str] = []
    on_loader_end, out_of_fold = LRMonitorCallback.on_loader_end, cvkit.kfold.out_of_fold
    write_json = cvkit.run_folder.atomic_write_json

    def in_fold(self, runner) -> None:
        if not seen:  # fold 0's first epoch: the k-fold folder and the fold's own are both held
            seen.append("fold 0")
            refused(second, again, logdir)
            refused(second, ["train", str(logdir / "fold_0" / "config.json"), "--resume", "--quiet"],
                                   logdir / "fold_0")
        on_loader_end(self, runner)

    def predicting(*args, **kwargs):
        seen.append("oof")
        refused(second, again, logdir)
        return out_of_fold(*args, **kwargs)

    def writing(target, obj) -> None:
        if Path(target) == logdir / "cv.json":
            seen.append("cv.json")
            refused(second, again, logdir)
        write_json(target, obj)

    monkeypatch.setattr(LRMonitorCallback, "on_loader_end", in_fold)
    monkeypatch.setattr(cvkit.kfold, "out_of_fold", predicting)
    monkeypatch.setattr(cvkit.run_folder, "atomic_write_json", writing)
    kfold(load_config(experiment(tmp_path / "demo", logdir)), 2, verbose=False)
    assert seen == ["fold 0", "oof", "cv.json"] and not (logdir / LOCK_NAME).exists()


def test_export_into_the_run_folder_holds_it(second, tmp_path, monkeypatch):
    pytest.importorskip("onnx", reason="export needs the 'export' extra")
    pytest.importorskip("onnxruntime", reason="export needs the 'export' extra")
    import cvkit.io
    from cvkit.training import run
    from cvkit.export import export_run

    logdir = tmp_path / "run"
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "demo", logdir)))
    run(load_config(experiment(tmp_path / "demo", logdir)), verbose=False)
    seen: List[str] = []
    write_json = cvkit.io.atomic_write_json

    def writing(target, obj) -> None:
        if Path(target).name == "model.onnx.json":
            seen.append("contract")
            refused(second, ["train", str(path), "--quiet"], logdir)
        write_json(target, obj)

    monkeypatch.setattr(cvkit.io, "atomic_write_json", writing)
    export_run(logdir)
    assert seen == ["contract"] and (logdir / "export" / "model.onnx.json").is_file()
    assert not (logdir / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_its_thread_only(tmp_path):
    import threading

    outer, inner = RunLock(tmp_path / "new"), RunLock(tmp_path / "new")
    with outer:
        with inner:
            assert (tmp_path / "new" / LOCK_NAME).is_file()
        assert (tmp_path / "new" / LOCK_NAME).is_file(), "the inner hold must not release the outer one"
        refused: List[BaseException] = []
        other = threading.Thread(target=lambda: _try(RunLock(tmp_path / "new"), refused))
        other.start()
        other.join()
        assert len(refused) == 1 and isinstance(refused[0], RunLockedError)
    assert not (tmp_path / "new").exists(), "a folder only the lock created goes with it"


def _try(lock: RunLock, errors: List[BaseException]) -> None:
    try:
        lock.acquire()
    except RunLockedError as exc:
        errors.append(exc)
