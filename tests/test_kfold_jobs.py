"""Folds as independent jobs (issue #25): `cvkit train exp.yaml --folds K --fold k` trains one fold into the
shared k-fold folder; the job that finishes the last fold (or `cvkit kfold collect`) writes oof.csv and
cv.json, the same as one `kfold()` call over every fold writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import pandas as pd
import pytest
import yaml

import cvkit.kfold
from conftest import demo_experiment
from cvkit.cli import main
from cvkit.config import ConfigError, load_config
from cvkit.experiment import build
from cvkit.kfold import collect, kfold
from cvkit.run_folder import KFOLD_FILE as SETUP_FILE
from cvkit.lock import LOCK_NAME, RunLock, RunLockedError

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
COLLECTING = "folds finished: writing oof.csv and cv.json"


def experiment(demo_root: Path, logdir: Path) -> dict:
    return demo_experiment("kfj", demo_root, logdir, 20)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Iterator[Path]:
    """Fold 0 and fold 1 of a 2-fold experiment trained at once by two `cvkit train --fold` processes."""
    folder = tmp_path_factory.mktemp("kfold_jobs")
    build(load_config(experiment(folder / "demo", folder / "warm")))  # the demo data, before two jobs read it
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(folder / "demo", folder / "run")))
    command = [sys.executable, "-m", "cvkit", "train", str(path), "--folds", "2", "--fold"]
    procs = [subprocess.Popen([*command, str(k)], env=ENV, cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    (folder / "outputs.json").write_text(json.dumps([out for out, _ in outputs]))
    yield folder


def test_two_fold_jobs_at_once_write_cv_json_once_equal_to_one_kfold_call(jobs, tmp_path):
    base = jobs / "run"
    outputs: List[str] = json.loads((jobs / "outputs.json").read_text())
    assert sum(out.count(COLLECTING) for out in outputs) == 1, "exactly one job collects"
    assert sum("all 2 folds finished: out-of-fold predictions in" in out for out in outputs) == 1
    assert sum("other folds are unfinished" in out for out in outputs) == 1
    assert not (base / LOCK_NAME).exists() and all(not (base / f"fold_{k}" / LOCK_NAME).exists() for k in (0, 1))
    setup = json.loads((base / SETUP_FILE).read_text())
    assert setup["folds"] == 2 and setup["group_col"] is None and setup["experiment"]["stages"][0]["lr"] == 0.003

    sequential = kfold(load_config(experiment(jobs / "demo", tmp_path / "seq")), 2, verbose=False)
    parallel = json.loads((base / "cv.json").read_text())
    assert parallel["per_fold"] == pytest.approx(sequential["per_fold"], abs=1e-6)
    assert parallel["oof"] == pytest.approx(sequential["oof"], abs=1e-6)
    assert {k: v for k, v in parallel.items() if k not in ("per_fold", "oof", "mean", "std")} == \
        {k: v for k, v in json.loads(json.dumps(sequential)).items() if k not in ("per_fold", "oof", "mean", "std")}
    oof, seq_oof = pd.read_csv(base / "oof.csv"), pd.read_csv(tmp_path / "seq" / "oof.csv")
    assert oof[["path", "label", "fold", "row"]].equals(seq_oof[["path", "label", "fold", "row"]])


def test_collect_names_a_missing_or_unfinished_fold_and_otherwise_rewrites_the_same_summary(jobs, tmp_path, capsys):
    import shutil

    base = tmp_path / "run"
    shutil.copytree(jobs / "run", base)
    written = json.loads((base / "cv.json").read_text())
    (base / "cv.json").unlink()
    assert main(["kfold", "collect", str(base), "--quiet"]) == 0
    assert json.loads((base / "cv.json").read_text()) == written

    (base / "fold_1" / "metrics.json").unlink()
    assert main(["kfold", "collect", str(base)]) == 2
    err = capsys.readouterr().err
    assert err == f"cvkit kfold: error: fold 1 of 2 is not finished: {base / 'fold_1'} has no metrics.json\n"
    shutil.rmtree(base / "fold_1")
    assert main(["kfold", "collect", str(base)]) == 2
    assert f"fold 1 of 2 is missing: {base / 'fold_1'} does not exist" in capsys.readouterr().err
    assert main(["kfold", "collect", str(tmp_path)]) == 2
    assert f"{tmp_path / SETUP_FILE} not found" in capsys.readouterr().err


def test_a_job_with_another_setup_for_the_folder_is_refused_naming_the_key(jobs, tmp_path, capsys):
    base = jobs / "run"
    config = experiment(jobs / "demo", base)
    stamps = [(base / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in (0, 1)]
    with pytest.raises(ConfigError, match=r"kfold\.json: this k-fold folder was set up with folds=2, this job has "
                                          r"folds=3"):
        kfold(load_config(config), 3, verbose=False, fold=2)
    with pytest.raises(ConfigError, match=r"set up with group_col=None, this job has group_col='label'"):
        kfold(load_config(config), 2, group_col="label", verbose=False, fold=0)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--folds", "2", "--fold", "1", "--set", "stages.0.lr=0.01", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "another experiment (it differs in stages.0.lr)" in err
    assert [(base / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in (0, 1)] == stamps, "nothing retrained"


def test_fold_options_are_checked_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = experiment(tmp_path / "demo", tmp_path / "run")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "logdir"}))
    for args, message in ((["--fold", "0"], "--fold only applies with --folds"),
                          (["--folds", "2", "--fold", "2"], "--fold must be a fold of --folds 2: 0 to 1, got 2")):
        assert main(["train", str(path), *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", str(unnamed), "--folds", "2", "--fold", "0"]) == 2
    assert "--fold trains into the k-fold folder every fold's job shares" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="name it in the experiment"):
        kfold(load_config({k: v for k, v in config.items() if k != "logdir"}), 2, fold=0)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_fold_job_holds_only_its_fold_while_training_and_waits_for_the_folder_to_collect(tmp_path, monkeypatch):
    from cvkit.callbacks.lr import LRMonitorCallback

    base = tmp_path / "run"
    config = load_config(experiment(tmp_path / "demo", base))
    seen: List[tuple] = []
    on_loader_end, out_of_fold = LRMonitorCallback.on_loader_end, cvkit.kfold.out_of_fold

    def in_fold(self, runner) -> None:
        seen.append(("training", (base / LOCK_NAME).exists(), (Path(runner.run_state.logdir) / LOCK_NAME).exists()))
        on_loader_end(self, runner)

    def predicting(*args, **kwargs):
        seen.append(("collecting", (base / LOCK_NAME).exists()))
        return out_of_fold(*args, **kwargs)

    monkeypatch.setattr(LRMonitorCallback, "on_loader_end", in_fold)
    monkeypatch.setattr(cvkit.kfold, "out_of_fold", predicting)
    assert kfold(config, 2, verbose=False, fold=0) is None and not (base / "cv.json").exists()
    assert seen and set(seen) == {("training", False, True)}, "the k-fold folder stays free while a fold trains"

    held, release = threading.Event(), threading.Event()

    def other_job() -> None:  # another thread holds the folder as another process's collect would
        with RunLock(base):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=other_job)
    holder.start()
    held.wait(30)
    monkeypatch.setattr(cvkit.kfold, "COLLECT_WAIT_S", 0.5)
    with pytest.raises(RunLockedError, match=f"fold 1 of 2 finished, but .*collect later: cvkit kfold collect {base}"):
        kfold(config, 2, verbose=False, fold=1)
    assert (base / "fold_1" / "metrics.json").is_file() and not (base / "cv.json").exists()

    monkeypatch.setattr(cvkit.kfold, "COLLECT_WAIT_S", 60.0)
    threading.Timer(1.0, release.set).start()
    seen.clear()
    summary = kfold(config, 2, verbose=False, fold=1, resume=True)  # finished: waits for the folder, collects
    holder.join(30)
    assert seen == [("collecting", True)] and json.loads((base / "cv.json").read_text()) == summary
    stamp = (base / "cv.json").stat().st_mtime_ns
    assert kfold(config, 2, verbose=False, fold=0, resume=True) == summary and not seen[1:]
    assert (base / "cv.json").stat().st_mtime_ns == stamp, "a current cv.json is not written again"
    assert collect(base, verbose=False) == summary and seen[1:] == [("collecting", True)]


def test_cvkit_kfold_stays_callable_after_import_cvkit_kfold(monkeypatch):
    import cvkit

    monkeypatch.delitem(sys.modules, "cvkit.kfold")  # as in a fresh interpreter (restored afterwards)
    monkeypatch.delattr(cvkit, "kfold")
    first = cvkit.kfold  # the package's lazy attribute imports the module
    import cvkit.kfold as module
    from cvkit import kfold as imported

    calls = []
    monkeypatch.setattr(module, "kfold", lambda config, folds=5, **kw: calls.append((config, folds)) or len(calls))
    assert first is cvkit.kfold is imported is sys.modules["cvkit.kfold"]
    assert (cvkit.kfold({"a": 1}, folds=5), cvkit.kfold({"b": 2}, folds=3), first({"c": 3})) == (1, 2, 3)
    assert calls == [({"a": 1}, 5), ({"b": 2}, 3), ({"c": 3}, 5)]
