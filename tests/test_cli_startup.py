"""The `cvkit` command starts at once: --help and the data commands import neither torch nor Catalyst.

``cvkit check`` scans the torch-free rows of each task (:mod:`cvkit.data.rows`); its report must be
exactly :func:`cvkit.data.check.check_dataset`'s on the torch dataset, so the two cannot drift.
"""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

HEAVY = ("torch", "catalyst", "timm", "segmentation_models_pytorch", "albumentations", "matplotlib")
SCRIPT = f"""
import sys
from cvkit.cli import main
code = main(sys.argv[1:])
print("HEAVY", sorted(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(code)
"""


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _heavy(done: subprocess.CompletedProcess) -> str:
    line = [l for l in done.stdout.splitlines() if l.startswith("HEAVY")]
    assert line, done.stderr[-2000:]
    return line[0]


@pytest.mark.parametrize("args", [["split", "t.csv", "--out-dir", "out"], ["split", "t.csv", "--folds", "2"]])
def test_data_commands_do_not_import_torch(tmp_path, args):
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(20)], "label": ["a", "b"] * 10}).to_csv(tmp_path / "t.csv",
                                                                                         index=False)
    assert _heavy(_run(args, tmp_path)) == "HEAVY []"


def test_help_does_not_import_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from cvkit.cli import main\ntry:\n main(['--help'])\n"
                           "except SystemExit: pass\nprint('torch' in sys.modules)"], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().endswith("False") and "train" in done.stdout


def _image(path, height=16, width=24, seed=0) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    data = cv2.imencode(path.suffix, image)[1].tobytes()
    path.write_bytes(data)
    return data


def _csv(tmp_path, name, rows, columns) -> str:
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / name, index=False)
    return name


def _classification(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.jpg", seed=i)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "classes.json").write_text(json.dumps({"cat": 0, "dog": 1}))
    rows = [("0.jpg", "cat"), ("1.jpg", "horse"), ("gone.jpg", "dog"), ("zero.jpg", "dog"), ("2.jpg", "dog"),
            ("./0.jpg", "cat")]
    return [_csv(tmp_path, "t.csv", rows, ["path", "label"]), "--class-map", "classes.json"]


def _folders(tmp_path):
    for label in ("cat", "dog"):
        for i in range(2):
            _image(tmp_path / "images" / label / f"{i}.png", seed=i)
    (tmp_path / "images" / "dog" / "cut.jpg").write_bytes(_image(tmp_path / "full.jpg")[:150])
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return ["images"]


def _class_box(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png", seed=i)
    rows = [("0.png", "a", 1, 1, 10, 10), ("1.png", "b", 5, 5, 30, 10), ("2.png", "a", 12, 1, 4, 10)]
    return [_csv(tmp_path, "t.csv", rows, ["path", "label", "x1", "y1", "x2", "y2"]), "--task", "class_box"]


def _keypoints(tmp_path):
    for i in range(4):
        _image(tmp_path / f"{i}.png", seed=i)
    rows = [("0.png", 1, 2, 3, 4), ("1.png", 1, 2, 300, 4), ("2.png", 1, "", 3, 4), ("3.png", "x", 2, 3, 4)]
    return [_csv(tmp_path, "t.csv", rows, ["path", "x0", "y0", "x1", "y1"]), "--task", "keypoints",
            "--keypoint-cols", "x0,y0,x1,y1"]


def _segmentation_png(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.png", seed=i)
    cv2.imwrite(str(tmp_path / "m0.png"), np.full((16, 24), 2, np.uint8))
    cv2.imwrite(str(tmp_path / "m1.png"), np.zeros((8, 24), np.uint8))
    rows = [("0.png", "m0.png"), ("1.png", "m1.png"), ("2.png", "gone.png")]
    return [_csv(tmp_path, "t.csv", rows, ["path", "mask"]), "--task", "segmentation", "--num-classes", "2"]


def _segmentation_rle(tmp_path):
    for name in ("a.png", "b.png"):
        _image(tmp_path / "images" / name, height=8, width=8)
    rows = [("a.png", 1, "60 10"), ("a.png", 2, "1 2"), ("b.png", 1, "1 3"), ("gone.png", 1, "1 1")]
    return [_csv(tmp_path, "t.csv", rows, ["ImageId", "ClassId", "EncodedPixels"]), "--task", "segmentation",
            "--rle", "--root", "images", "--num-classes", "2"]


def _segmentation_demo(tmp_path):
    from cvkit.data import demo

    demo.build_segmentation(tmp_path / "demo", per_class=1, canvas=32, num_classes=2)
    return ["demo/train_rle.csv", "--task", "segmentation", "--rle", "--root", "demo/images", "--num-classes", "2"]


CASES = {"classification_csv": _classification, "class_folders": _folders, "class_box": _class_box,
         "keypoints": _keypoints, "segmentation_png": _segmentation_png, "segmentation_rle": _segmentation_rle,
         "segmentation_demo": _segmentation_demo}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_imports_no_torch_and_reports_what_the_torch_dataset_reports(tmp_path, monkeypatch, case):
    from cvkit.cli import build_parser, dataset_from_args
    from cvkit.data.check import check_dataset
    from cvkit.data.datasets import TableDataset

    args = ["check", *CASES[case](tmp_path), "--report", "report.csv", "--limit", "100", "--workers", "2"]
    done = _run(args, tmp_path)
    assert _heavy(done) == "HEAVY []", done.stderr[-2000:]

    monkeypatch.chdir(tmp_path)
    dataset = dataset_from_args(build_parser().parse_args(args))
    assert isinstance(dataset, TableDataset)
    report = check_dataset(dataset, workers=2)
    printed = done.stdout[:done.stdout.rindex("HEAVY")]
    assert printed == report.summary(limit=100) + "\n"
    assert done.returncode == (0 if report.ok else 1)
    written = pd.read_csv(tmp_path / "report.csv", keep_default_na=False)
    assert written.astype(str).values.tolist() == report.to_frame().astype(str).values.tolist()
    if case != "segmentation_demo":
        assert not report.ok, "each hand-made case holds bad rows, so the comparison covers the messages"
