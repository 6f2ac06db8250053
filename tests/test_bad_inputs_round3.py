"""Bad inputs of the `cvkit` command, third sweep (issue #24): k-fold folders missing a fold, a run
folder as the only --checkpoint, commands writing over their input, empty tables, senseless sizes and
class weights, code-carrying weights in the examples, fractional areas, repeated runs, logdir and lock
races, the console's header. Each refusal is exit code 2 and one line on stderr, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import demo_experiment
from cvkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cvkit(*args: object, script: str = "-m cvkit") -> subprocess.CompletedProcess:
    """``python -m cvkit ARGS`` (or ``python SCRIPT ARGS``) in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, *script.split(), *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(done: subprocess.CompletedProcess, *culprits: str) -> None:
    assert done.returncode == 2, done.stdout[-1000:] + done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for culprit in culprits:
        assert culprit in done.stderr, done.stderr


def experiment(tmp: Path, logdir: Path) -> dict:
    return demo_experiment("r3", tmp / "demo", logdir, 24)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """One tiny trained run, and a k-fold folder of three copies of it with the cv.json k-fold writes."""
    tmp = tmp_path_factory.mktemp("round3")
    (tmp / "exp.yaml").write_text(yaml.safe_dump(experiment(tmp, tmp / "run")))
    assert main(["train", str(tmp / "exp.yaml"), "--quiet"]) == 0
    (tmp / "kfold").mkdir()
    for k in range(3):
        shutil.copytree(tmp / "run", tmp / "kfold" / f"fold_{k}")
    (tmp / "kfold" / "cv.json").write_text(json.dumps({"folds": 3, "valid_metric": "accuracy"}))
    test_csv = next((tmp / "demo").rglob("test.csv"))
    return SimpleNamespace(tmp=tmp, run=tmp / "run", kfold=tmp / "kfold", test_csv=test_csv)


def kfold_without(trained, tmp_path: Path, missing: str) -> Path:
    folder = tmp_path / "kfold"
    shutil.copytree(trained.kfold, folder)
    target = folder / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return folder


# --- 1. a k-fold folder missing a fold ---------------------------------------------------------------

@pytest.mark.parametrize("missing", ["fold_1", "fold_2/best.pth"])
def test_a_kfold_folder_missing_a_fold_is_refused_naming_it(trained, tmp_path, missing):
    folder = kfold_without(trained, tmp_path, missing)
    done = cvkit("predict", "--checkpoint", folder, "--images", trained.test_csv, "--out", tmp_path / "sub.csv",
                 "--device", "cpu")
    assert_one_line_error(done, f"without {missing} (cv.json lists 3 folds)", "--allow-missing-folds")
    assert not (tmp_path / "sub.csv").exists()


def test_allow_missing_folds_averages_the_others_and_says_so(trained, tmp_path, capsys):
    folder = kfold_without(trained, tmp_path, "fold_1")
    out = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(folder), "--images", str(trained.test_csv), "--out", str(out),
                 "--device", "cpu", "--allow-missing-folds"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out} (") and f"without {folder}/fold_1, as --allow-missing-folds allows" in line
    assert len(pd.read_csv(out)) == len(pd.read_csv(trained.test_csv))


# --- 2. --checkpoint RUN_FOLDER alone ----------------------------------------------------------------

def test_a_run_or_kfold_folder_alone_is_enough_to_predict(trained, tmp_path, capsys):
    for name, checkpoint in (("run", trained.run), ("best", trained.run / "best.pth"), ("kfold", trained.kfold)):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(trained.test_csv), "--out", str(out),
                     "--device", "cpu"]) == 0, capsys.readouterr().err
    alone = pd.read_csv(tmp_path / "run.csv")
    assert main(["predict", "--checkpoint", str(trained.run), "--config", str(trained.run / "config.json"), "--images",
                 str(trained.test_csv), "--out", str(tmp_path / "given.csv"), "--device", "cpu"]) == 0
    assert alone.equals(pd.read_csv(tmp_path / "given.csv")) and alone.equals(pd.read_csv(tmp_path / "kfold.csv"))


# --- 6. a folder without a readable image; a GIF is an image ----------------------------------------

def test_predict_on_a_gif_folder_and_on_a_folder_without_images(trained, tmp_path):
    from PIL import Image

    (tmp_path / "gif").mkdir()
    Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(tmp_path / "gif" / "a.gif")
    assert main(["predict", "--checkpoint", str(trained.run), "--images", str(tmp_path / "gif"), "--out",
                 str(tmp_path / "gif.csv"), "--device", "cpu"]) == 0
    assert pd.read_csv(tmp_path / "gif.csv")["path"].tolist() == ["a.gif"]


@pytest.mark.parametrize("case", ["no images", "no config", "out is the input"])
def test_predict_refusals_are_one_line(trained, tmp_path, case):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    if case == "no images":
        done = cvkit("predict", "--checkpoint", trained.run, "--images", tmp_path / "notes", "--device", "cpu")
        assert_one_line_error(done, f"{tmp_path / 'notes'}: no images (", ".png", ".gif")
    elif case == "no config":
        shutil.copy(trained.run / "best.pth", tmp_path / "loose.pth")
        done = cvkit("predict", "--checkpoint", tmp_path / "loose.pth", "--images", trained.test_csv)
        assert_one_line_error(done, f"{tmp_path / 'config.json'} not found; give --config")
    else:
        images = shutil.copy(trained.test_csv, tmp_path / "test.csv")
        before = Path(images).read_bytes()
        done = cvkit("predict", "--checkpoint", trained.run, "--images", images, "--out", images)
        assert_one_line_error(done, f"{images} is an input of this command; refusing to write over it")
        assert Path(images).read_bytes() == before


# --- 3, 4, 5. data commands ------------------------------------------------------------------------

def table(path: Path, rows: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": [f"{i}.png" for i in range(rows)], "label": ["ab"[i % 2] for i in range(rows)]}).to_csv(
        path, index=False)
    return path


@pytest.mark.parametrize("args, culprit", [
    (["--valid-fraction", "0.2"], "train.csv is an input of this command; refusing to write over it (give --out-dir"),
    (["--folds", "0"], "--folds must be at least 2 (each row is valid in one fold), got 0"),
    (["--folds", "1"], "--folds must be at least 2 (each row is valid in one fold), got 1"),
])
def test_split_never_writes_over_its_input_and_needs_two_folds(tmp_path, args, culprit):
    before = table(tmp_path / "data" / "train.csv", 80).read_bytes()
    assert_one_line_error(cvkit("split", tmp_path / "data" / "train.csv", *args), culprit)
    assert (tmp_path / "data" / "train.csv").read_bytes() == before and not (tmp_path / "data" / "valid.csv").exists()
    assert main(["split", str(tmp_path / "data" / "train.csv"), "--out-dir", str(tmp_path / "splits")]) == 0
    assert len(pd.read_csv(tmp_path / "splits" / "train.csv")) == 64
    assert (tmp_path / "data" / "train.csv").read_bytes() == before


@pytest.mark.parametrize("command", ["inventory", "stats", "eda-test", "eda-max-images", "inventory-over-input"])
def test_data_commands_refuse_empty_tables_and_empty_samples(tmp_path, command):
    empty = tmp_path / "header_only.csv"
    empty.write_text("path,label\n")
    full = table(tmp_path / "full.csv", 4)
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), 50 * i, np.uint8))
    runs = {
        "inventory": (["inventory", empty, "--out", tmp_path / "inv.csv"],
                      f"{empty}: no rows; expected one image path per row in column 'path'"),
        "stats": (["stats", empty], f"{empty}: no rows"),
        "eda-test": (["eda", full, empty, "--out-dir", tmp_path / "eda"], f"{empty}: no rows"),
        "eda-max-images": (["eda", full, full, "--out-dir", tmp_path / "eda", "--max-images", "0"],
                           "--max-images must be at least 1"),
        "inventory-over-input": (["inventory", full, "--out", full], f"{full} is an input of this command"),
    }
    args, culprit = runs[command]
    assert_one_line_error(cvkit(*args), culprit)
    assert not (tmp_path / "eda").exists() or not list((tmp_path / "eda").iterdir())


# --- 7, 8. sizes and class weights refused when the experiment is read ------------------------------

@pytest.mark.parametrize("override, culprit", [
    ("augmentation.size=1", "augmentation.size: expected an image size in pixels from 8 to 4096, got 1"),
    ("stages.0.image_size=5000", "stages[0].image_size: expected an image size in pixels from 8 to 4096, got 5000"),
    ("data.folds=1", "data.folds: expected an integer >= 2, got 1"),
    ("criterion={name: cross_entropy, weight: [1, 2]}", "criterion.weight: 2 values; expected 10, one per class"),
])
def test_senseless_sizes_folds_and_weights_fail_before_training(trained, tmp_path, capsys, override, culprit):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(trained.tmp, tmp_path / "run")))
    assert main(["train", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and culprit in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_senseless_size_fails_in_one_line_from_the_command_as_a_user_runs_it(trained, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(trained.tmp, tmp_path / "run")))
    assert_one_line_error(cvkit("train", path, "--set", "augmentation.size=1"), "augmentation.size: expected an image size")
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- 9. an example given a weights file that would run code -----------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_an_example_refuses_code_carrying_weights_in_one_line(tmp_path, capsys, monkeypatch):
    import torch

    import examples_loader

    torch.save({"model": _RunsCode()}, tmp_path / "evil.pth")
    args = ["--logdir", tmp_path / "runs" / "sports", "--limit", "8", "--epochs", "1", "--quiet"]
    done = cvkit("--weights", tmp_path / "evil.pth", *args, script="examples/sports_train.py")  # as a user runs it
    assert_one_line_error(done, f"sports_train.py: error: weights: refused to load {tmp_path / 'evil.pth'}",
                          "could run code")
    example = examples_loader.load("sports_train")  # the same path in-process, for the other flag
    monkeypatch.setattr(sys, "argv", ["sports_train.py"])
    with pytest.raises(SystemExit) as exit_:
        example.run_script(lambda: example.main(["--pretrained", str(tmp_path / "evil.pth"), *map(str, args)]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"sports_train.py: error: model.pretrained: refused to load {tmp_path / 'evil.pth'}" in err
    assert "could run code" in err


# --- 10. fractional areas in postprocess.json -------------------------------------------------------

def test_postprocess_json_refuses_fractional_areas_naming_the_file_and_key(tmp_path):
    from cvkit.postprocess import load_postprocess

    entry = {"name": "1", "threshold": 0.5, "min_area": 2.7, "min_total": 0}
    (tmp_path / "postprocess.json").write_text(json.dumps({"classes": [entry]}))
    with pytest.raises(ValueError, match=r"postprocess.json: classes\[0\].min_area must be a whole number of pixels "
                                         r">= 0; got 2.7"):
        load_postprocess(tmp_path)
    (tmp_path / "postprocess.json").write_text(json.dumps({"classes": [{**entry, "min_area": 3.0}]}))
    assert load_postprocess(tmp_path).min_areas == [3]


# --- 11. repeating a saved run writes a new run beside it -------------------------------------------

def test_repeating_a_saved_run_writes_a_new_folder_beside_it(trained, tmp_path, capsys):
    import re

    original = tmp_path / "runs" / "x"
    shutil.copytree(trained.run, original)
    files = {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()}
    assert main(["train", str(original / "config.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()} == files, "the original is untouched"
    new = [p for p in original.parent.iterdir() if p.is_dir() and not p.is_symlink() and p != original]
    assert len(new) == 1 and re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_test_resnet_bs8_lr0\.003", new[0].name)
    assert f"repeating the run in {original} as a new run in {new[0]}" in out and f"run written to {new[0]}" in out
    assert (new[0] / "metrics.json").read_text() == (original / "metrics.json").read_text()
    assert main(["train", str(original / "config.json"), "--resume"]) == 0  # continues the same folder
    assert f"{original} is a finished run" in capsys.readouterr().out
    assert len([p for p in original.parent.iterdir() if p.is_dir() and not p.is_symlink()]) == 2


# --- 12. time-stamped folders and the run lock under races -------------------------------------------

def test_runs_started_in_the_same_second_claim_distinct_folders(tmp_path, monkeypatch):
    from cvkit.config import claim_logdir

    monkeypatch.chdir(tmp_path)
    frozen = time.localtime(0)
    monkeypatch.setattr(time, "localtime", lambda *_: frozen)
    config = {"name": "exp", "model": {"arch": "resnet18"}, "stages": [{"name": "a", "batch_size": 4, "lr": 0.1}]}
    start, claimed = threading.Barrier(6), []

    def claim() -> None:
        start.wait()
        claimed.append(claim_logdir(config))

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    base = time.strftime("%Y-%m-%d_%H-%M-%S", frozen) + "_resnet18_bs4_lr0.1"
    assert sorted(Path(c).name for c in claimed) == sorted([base] + [f"{base}_{k}" for k in range(2, 7)])


LOCK_CYCLES = """
import sys, time
from cvkit.lock import RunLock
end = time.time() + float(sys.argv[2])
while time.time() < end:
    with RunLock(sys.argv[1]):
        pass
"""


def test_a_lock_is_never_seen_half_written(tmp_path):
    from cvkit.lock import LOCK_NAME

    proc = subprocess.Popen([sys.executable, "-c", LOCK_CYCLES, str(tmp_path), "3"], env=ENV)
    seen, bad = 0, []
    while proc.poll() is None:
        try:
            text = (tmp_path / LOCK_NAME).read_text()
        except FileNotFoundError:
            continue
        seen += 1
        try:
            assert isinstance(json.loads(text)["pid"], int)
        except (ValueError, KeyError, AssertionError):
            bad.append(text)
    assert proc.returncode == 0 and seen > 0 and bad == [], f"{len(bad)} of {seen} reads were half-made: {bad[:3]}"


def test_one_of_many_simultaneous_lockers_wins_and_none_takes_over(tmp_path):
    from cvkit.lock import RunLock, RunLockedError

    start, outcomes = threading.Barrier(8), []

    def take() -> None:
        lock = RunLock(tmp_path)
        start.wait()
        try:
            lock.acquire()
            outcomes.append("held")
        except RunLockedError:
            outcomes.append("refused")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=take) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(outcomes) == ["held"] + ["refused"] * 7 and not [w for w in caught if "stale" in str(w.message)]


# --- 13. the console table ---------------------------------------------------------------------------

def test_console_headers_keep_metric_names_and_many_lr_groups_share_one_column():
    from cvkit.callbacks.console import ConsoleTableCallback

    lines = []
    console = ConsoleTableCallback("valid", "accuracy", write=lines.append)
    rows = [{"stage": "fine_tune_all_blocks", "epoch": e, "train/loss": 0.5, "valid/loss": 0.4, "valid/accuracy": 0.9,
             **{f"lr/blocks.{k}": 10.0 ** -(k + 1) for k in range(6)}} for e in (1, 2)]
    runner = SimpleNamespace(engine=SimpleNamespace(is_main_process=True), run_state=SimpleNamespace(history=[]))
    for row in rows:
        runner.run_state.history.append(row)
        console.on_epoch_start(runner)
        console.on_epoch_end(runner)
    header, first, second = lines[1:]
    assert "valid accuracy" in header and "valid loss" in header and "lr min..max" in header
    assert "blocks" not in header, "six LR groups share one column"
    assert first.split()[:2] == ["fine_tune_all_blocks", "1"] and "1.0e-06..1.0e-01" in first.split()

    def word_ends(line: str) -> set:
        return {i + 1 for i, c in enumerate(line) if c != " " and (i + 1 == len(line) or line[i + 1] == " ")}

    for line in (first, second):  # seven cells, each ending where its column's name ends
        assert len(line) == len(header) and len(word_ends(line)) == 7 and word_ends(line) <= word_ends(header), line
