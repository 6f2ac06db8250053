"""A run killed after its last epoch resumes to the uninterrupted run's metrics.json and postprocess.json.

The final phase writes the last epoch's checkpoint, the root best.pth, evaluates the test split, tunes
the post-processing (postprocess.json) and writes metrics.json last. A kill is an exception raised from
the writer (or the evaluation) at each point; the killed folder is copied once per point, since a
resume after the last epoch trains nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

import cvkit.run_folder
import cvkit.runners
from cvkit.experiment import load_experiment
from cvkit.training import run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "segmentation_demo.yaml"


class Killed(Exception):
    """The run stopped here, as a SIGKILL would stop it."""


def config(folder: Path, logdir: Path) -> dict:
    return load_experiment(EXAMPLE, [f"logdir={logdir}", f"data.root={folder / 'demo'}", "data.limit=16",
                                     "stages.1.epochs=1", "loggers=[]"])


def results(logdir: Path) -> tuple:
    return (json.loads((logdir / "metrics.json").read_text()), json.loads((logdir / "postprocess.json").read_text()),
            pd.read_csv(logdir / "log.csv"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run, and the same run killed just after its last epoch's checkpoint (before the
    root best.pth)."""
    folder = tmp_path_factory.mktemp("final_phase")
    run(config(folder, folder / "full"), verbose=False)
    save = cvkit.run_folder.save_checkpoint

    def saving(path, payload) -> None:
        if Path(path) == folder / "killed" / "best.pth":
            raise Killed
        save(path, payload)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cvkit.run_folder, "save_checkpoint", saving)
        with pytest.raises(Killed):
            run(config(folder, folder / "killed"), verbose=False)
    assert not (folder / "killed" / "best.pth").exists()
    return folder


def kill_during_test_evaluation(patch: pytest.MonkeyPatch, logdir: Path) -> None:
    def evaluating(*args, **kwargs):
        assert (logdir / "best.pth").is_file()
        raise Killed

    patch.setattr(cvkit.runners, "evaluate", evaluating)


def kill_before_metrics(patch: pytest.MonkeyPatch, logdir: Path) -> None:
    write = cvkit.run_folder.atomic_write_json

    def writing(path, obj) -> None:
        if Path(path).name == "metrics.json":
            assert (logdir / "postprocess.json").is_file()
            raise Killed
        write(path, obj)

    patch.setattr(cvkit.run_folder, "atomic_write_json", writing)


@pytest.mark.parametrize("kill", [None, kill_during_test_evaluation, kill_before_metrics],
                         ids=["after-last-epoch-checkpoint", "after-root-best.pth", "after-postprocess.json"])
def test_a_kill_after_the_last_epoch_resumes_to_the_same_result(runs, tmp_path, kill):
    logdir = tmp_path / "killed"
    shutil.copytree(runs / "killed", logdir)
    if kill is not None:  # killed again, later in the final phase, while resuming
        with pytest.MonkeyPatch.context() as patch:
            kill(patch, logdir)
            with pytest.raises(Killed):
                run(config(runs, logdir), resume=True, verbose=False)
        assert not (logdir / "metrics.json").exists()
    resumed = run(config(runs, logdir), resume=True, verbose=False)
    full, tuned, log = results(runs / "full")
    assert resumed == full and results(logdir)[0] == full and "loss" in full["test"]
    assert results(logdir)[1] == tuned
    pd.testing.assert_frame_equal(results(logdir)[2], log)


def test_a_finished_run_is_left_alone(runs, tmp_path):
    logdir = tmp_path / "finished"
    shutil.copytree(runs / "full", logdir)
    files = {p: p.stat().st_mtime_ns for p in logdir.rglob("*") if p.is_file()}
    assert run(config(runs, logdir), resume=True, verbose=False) == results(runs / "full")[0]
    assert {p: p.stat().st_mtime_ns for p in logdir.rglob("*") if p.is_file()} == files
