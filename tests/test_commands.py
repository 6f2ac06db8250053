"""The experiment commands through ``cvkit.cli.main``: train, predict, report, lr-find, outliers."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cvkit.cli import build_parser, main
from cvkit.data.rle import rle_decode
from cvkit.tasks import get_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "configs" / "classification_demo.yaml"
FAST = ["--set", "data.per_class=20", "--set", "data.limit=40", "--set", "stages.0.epochs=1",
        "--set", "stages.1.epochs=1", "--set", "stages.0.batch_size=16", "--set", "stages.1.batch_size=16"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The classification demo YAML trained through ``cvkit train`` with tiny overrides."""
    logdir = tmp_path_factory.mktemp("runs") / "demo"
    assert main(["train", str(EXAMPLE), "--quiet", "--set", f"logdir={logdir}", *FAST]) == 0
    return logdir


def test_train_writes_metrics_and_a_config_that_reruns(run_dir, capsys):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"best", "valid", "test", "epochs"} <= set(metrics)
    assert {"loss", "accuracy", "f1_macro"} <= set(metrics["valid"])
    assert {"loss", "accuracy", "f1_macro"} <= set(metrics["test"])
    again = run_dir.parent / "again"
    assert main(["train", str(run_dir / "config.json"), "--quiet", "--set", f"logdir={again}"]) == 0
    first, second = (json.loads((d / "config.json").read_text()) for d in (run_dir, again))
    drop = {"started", "logdir"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}
    assert "repeat it with: cvkit train" in capsys.readouterr().out
    # one seed, one run: the repeat from config.json gives the same metrics.json and best.pth
    assert (run_dir / "metrics.json").read_text() == (again / "metrics.json").read_text()
    a, b = (torch.load(d / "best.pth", weights_only=True) for d in (run_dir, again))
    assert a["epoch"] == b["epoch"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_typo_fails_with_the_key_and_nearest_spelling_exit_2(tmp_path):
    config = yaml.safe_load(EXAMPLE.read_text())
    config["optimzer"] = "sgd_v1"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    script = "import sys; from cvkit.cli import main; sys.exit(main())"  # what the console script runs
    done = subprocess.run([sys.executable, "-c", script, "train", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "typo.yaml" in done.stderr
    assert "unknown key 'optimzer'; did you mean 'optimizer'" in done.stderr


def test_override_typo_names_the_stage_key(capsys):
    assert main(["train", str(EXAMPLE), "--set", "stages.0.epoch=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stages[0]: unknown key 'epoch'; did you mean 'epochs'" in err


def test_predict_writes_one_row_per_image(run_dir, tmp_path, capsys):
    test_csv = run_dir.parent / "demo_data" / "classification_20_per_class" / "test.csv"
    out = tmp_path / "submission.csv"
    args = ["predict", "--checkpoint", str(run_dir / "best.pth"), "--config", str(run_dir / "config.json"),
            "--images", str(test_csv), "--out", str(out), "--probs", "--device", "cpu"]
    assert main(args + ["--tta", "hflip,vflip"]) == 0
    frame = pd.read_csv(out)
    classes = json.loads((run_dir / "classes.json").read_text())
    assert list(frame["path"]) == list(pd.read_csv(test_csv)["path"])
    assert list(frame.columns) == ["path", "label", *[f"prob_{c}" for c in classes]]
    probs = frame[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert (np.asarray(classes)[probs.argmax(axis=1)] == frame["label"]).all()
    assert main(args + ["--tta", "hflip,vflip"]) == 0
    assert pd.read_csv(out).equals(frame), "prediction is not deterministic"
    assert f"({len(frame)} rows)" in capsys.readouterr().out


def test_segmentation_rows_are_rle_that_decodes_to_the_mask():
    torch.manual_seed(0)
    probs = torch.rand(2, 4, 6)
    task = get_task("segmentation")
    rows = task.rows("a.png", task.decode(probs, 4, 6, []), [], threshold=0.5)
    assert [list(r) for r in rows] == [["ImageId", "EncodedPixels", "ClassId"]] * 2
    assert [(r["ImageId"], r["ClassId"]) for r in rows] == [("a.png", 1), ("a.png", 2)]
    for row, p in zip(rows, probs):
        assert np.array_equal(rle_decode(row["EncodedPixels"], (4, 6)), (p > 0.5).numpy().astype(np.uint8))


def test_report_has_one_row_per_run(run_dir, tmp_path, capsys):
    out = tmp_path / "results.md"
    assert main(["report", str(run_dir), str(run_dir.parent / "again"), "--out", str(out)]) == 0
    lines = out.read_text().strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["run", "model", "epochs", "image size", "best"]
    assert {"valid accuracy", "test accuracy", "test f1_macro"} <= set(header)
    assert len(lines) == 4 and lines[2].startswith("| demo | efficientnet_lite0 | 2 | 64 |")
    assert main(["report", str(tmp_path), "--out", str(out)]) == 2
    assert "metrics.json not found" in capsys.readouterr().err


def test_lr_find_plots_and_prints_the_suggestion(run_dir, tmp_path, capsys):
    out = tmp_path / "lr.png"
    before = (run_dir / "best.pth").read_bytes()
    assert main(["lr-find", str(run_dir / "config.json"), "--stage", "full", "--group", "head", "--steps", "12",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested lr for group 'head'" in capsys.readouterr().out
    assert (run_dir / "best.pth").read_bytes() == before
    assert main(["lr-find", str(run_dir / "config.json"), "--stage", "ful", "--out", str(out)]) == 2
    assert "--stage 'ful' is not a stage" in capsys.readouterr().err


def test_outliers_writes_a_ranked_csv_and_sheet(run_dir, tmp_path):
    out, sheet = tmp_path / "outliers.csv", tmp_path / "sheet.png"
    assert main(["outliers", str(run_dir / "config.json"), "--method", "centroid", "--top", "10",
                 "--out", str(out), "--sheet", str(sheet)]) == 0
    frame = pd.read_csv(out)
    assert list(frame["rank"]) == list(range(1, 11))
    assert (np.diff(frame["score"]) <= 0).all()
    assert frame["path"].map(lambda p: Path(p).is_file()).all() and frame["label"].str.startswith("digit_").all()
    assert sheet.read_bytes()[:4] == b"\x89PNG"


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "predict", "lr-find", "outliers", "report"):
        for action in sub.choices[name]._actions:
            assert action.help, f"cvkit {name}: option {action.option_strings or action.dest} has no help"


def test_keypoint_mirror_tta_needs_flip_pairs(tmp_path, capsys):
    logdir = tmp_path / "kp"
    config = EXAMPLE.with_name("keypoints_demo.yaml")
    fast = ["--set", "data.per_class=4", "--set", "stages.0.epochs=1", "--set", "stages.1.epochs=1",
            "--set", "augmentation.size=32"]
    assert main(["train", str(config), "--quiet", "--set", f"logdir={logdir}", *fast]) == 0
    test_csv = next((tmp_path / "demo_data").rglob("test.csv"))
    base = ["predict", "--checkpoint", str(logdir / "best.pth"), "--config", str(logdir / "config.json"),
            "--images", str(test_csv), "--device", "cpu", "--tta", "hflip"]
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "none.csv")]) != 0
    assert "flip_pairs" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "none.csv"), "--flip-pairs", "none"]) == 0
    assert main([*base, "--out", str(tmp_path / "pairs.csv"), "--flip-pairs", "0-1,2-3"]) == 0
    plain, paired = pd.read_csv(tmp_path / "none.csv"), pd.read_csv(tmp_path / "pairs.csv")
    assert list(plain.columns) == list(paired.columns) and len(plain) == len(paired)
    # swapping the mirrored top-left/top-right predictions changes them; the centre (4) has no partner
    assert not np.allclose(plain[["x0", "x1"]], paired[["x0", "x1"]])
    assert np.allclose(plain[["x4", "y4"]], paired[["x4", "y4"]])


def test_a_run_without_logdir_gets_a_time_stamped_folder_and_a_latest_link(tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(EXAMPLE.read_text())
    config.pop("logdir", None)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--quiet", *FAST]) == 0
    runs = [p for p in (tmp_path / "runs" / "classification_demo").iterdir() if p.name not in ("latest", "demo_data")]
    assert len(runs) == 1
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_efficientnet_lite0_bs16_lr0\.001", runs[0].name)
    latest = tmp_path / "runs" / "classification_demo" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[0].resolve()
    assert (latest / "metrics.json").is_file()
    stamp = (latest / "best.pth").stat().st_mtime_ns
    assert main(["train", str(path), "--quiet", "--resume", *FAST]) == 0  # resumes the latest run: finished
    assert (latest / "best.pth").stat().st_mtime_ns == stamp
    assert len([p for p in runs[0].parent.iterdir() if p.name not in ("latest", "demo_data")]) == 1
