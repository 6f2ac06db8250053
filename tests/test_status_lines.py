"""Every step that takes seconds says what it does first, in one ``[cvkit] ...`` line on stdout, once:
loading torch in the command, building demo data, training the demo backbone, an lr-find sweep."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import yaml

from cvkit.data import demo, stl10


def _lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if line.startswith(("[cvkit]", "WORK"))]


def _index(lines: List[str], needle: str) -> int:
    """The one line holding ``needle``."""
    found = [i for i, line in enumerate(lines) if needle in line]
    assert len(found) == 1, (needle, lines)
    return found[0]


def _mark_work(monkeypatch, module, name: str) -> None:
    """Print ``WORK`` when ``module.name`` starts: the announcement must come before it."""
    original = getattr(module, name)

    def marked(*args, **kwargs):
        print("WORK")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, marked)


def test_a_demo_set_says_it_builds_once_before_building(tmp_path, capsys, monkeypatch):
    _mark_work(monkeypatch, demo, "_digits")
    demo.build_boxes(tmp_path / "boxes", per_class=1, canvas=32)
    lines = _lines(capsys.readouterr().out)
    start, done = _index(lines, "demo data: building 'boxes' in"), _index(lines, "demo data: 'boxes' built in")
    assert start < lines.index("WORK") < done and str(tmp_path / "boxes") in lines[start]
    demo.build_boxes(tmp_path / "boxes", per_class=1, canvas=32)
    assert not _lines(capsys.readouterr().out), "a kept set is silent"


def test_the_stl10_demo_says_it_builds_once_before_building(tmp_path, capsys, monkeypatch):
    def small(seed: int = 0):  # 40 images instead of 1,797, for speed
        print("WORK")
        rng = np.random.default_rng(seed)
        return rng.integers(0, 255, (40, stl10.SIZE, stl10.SIZE, 3), dtype=np.uint8), np.arange(40) % 10

    monkeypatch.setattr(stl10, "render_digits", small)
    demo.build_stl10(tmp_path)
    lines = _lines(capsys.readouterr().out)
    start, done = _index(lines, "demo data: building 'stl10' in"), _index(lines, "demo data: 'stl10' built in")
    assert start < lines.index("WORK") < done
    demo.build_stl10(tmp_path)
    assert not _lines(capsys.readouterr().out)


def test_the_demo_backbone_says_it_trains_and_where_it_caches_once(tmp_path, capsys, monkeypatch):
    _mark_work(monkeypatch, demo, "digits_canvases")
    path = demo.demo_pretrained("test_resnet", tmp_path, epochs=1)
    lines = _lines(capsys.readouterr().out)
    start = _index(lines, "demo backbone: training test_resnet on digit rotations")
    assert str(path) in lines[start] and start < lines.index("WORK") < _index(lines, "test_resnet trained in")
    demo.demo_pretrained("test_resnet", tmp_path, epochs=1)
    assert not _lines(capsys.readouterr().out), "a cached backbone is silent"


# The command, in a subprocess whose first import of torch prints IMPORT and stops: what it said before
# torch would load is all there is, and torch is never actually loaded (fast).
STOP_AT_TORCH = """
import os, sys
class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("IMPORT torch", flush=True)
            os._exit(0)
sys.meta_path.insert(0, Stop())
from cvkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args, libraries", [
    (["train", "x.yaml"], "torch, timm, catalyst"),
    (["predict", "--checkpoint", "run", "--images", "imgs"], "torch, timm"),
    (["predict", "--model", "model.onnx", "--images", "imgs"], "torch"),
    (["lr-find", "x.yaml"], "torch, timm"),
    (["outliers", "x.yaml"], "torch, timm"),
    (["export", "run"], "torch, timm"),
    (["export", "run", "--image-size", "64"], "torch, timm"),  # the size is checked while parsing
], ids=["train", "predict", "predict-model", "lr-find", "outliers", "export", "export-size"])
def test_torch_heavy_commands_say_they_load_torch_before_importing_it(tmp_path, args, libraries):
    done = subprocess.run([sys.executable, "-c", STOP_AT_TORCH, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.splitlines() == [f"[cvkit] loading {libraries}...", "IMPORT torch"], done.stderr[-2000:]


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "x.yaml", "--folds", "1"]])
def test_help_and_usage_errors_say_nothing_and_load_nothing(tmp_path, args):
    done = subprocess.run([sys.executable, "-c", STOP_AT_TORCH, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert "[cvkit]" not in done.stdout and "IMPORT torch" not in done.stdout, done.stdout[-2000:]


def _experiment(tmp_path: Path) -> Path:
    config = {"name": "lr", "task": "classification", "engine": "cpu", "logdir": str(tmp_path / "runs"), "seed": 1,
              "data": {"kind": "demo", "root": str(tmp_path / "demo"), "limit": 24},
              "model": {"name": "classifier", "arch": "test_resnet"}, "augmentation": {"preset": "resize", "size": 32},
              "stages": [{"name": "all", "epochs": 1, "lr": 0.003, "batch_size": 8}]}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("terminal", [False, True])
def test_lr_find_says_what_it_sweeps_and_where_it_writes_before_sweeping(tmp_path, capsys, monkeypatch, terminal):
    from cvkit.cli import main

    _mark_work(monkeypatch, importlib.import_module("cvkit.tools.lr_find"), "_sweep")  # the module, not the function
    monkeypatch.setattr(importlib.import_module("cvkit.cli.experiment"), "progress_bars_wanted", lambda: terminal)
    out = tmp_path / "lr.png"
    assert main(["lr-find", str(_experiment(tmp_path)), "--group", "head", "--steps", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    start = _index(lines, "[cvkit] lr-find: sweeping stage 'all' (trainable: all), group 'head' (the others at the "
                          "stage's LRs), over 4 batches from lr 1e-07 to 10 on cpu; the plot goes to")
    assert lines[start].endswith(str(out)) and out.is_file()
    assert start < lines.index("WORK") < _index(lines, "[cvkit] lr-find: 4 of 4 batches swept in") < _index(
        lines, "suggested lr for group 'head'")
    assert ("lr_find" in captured.err) == terminal, "a progress bar on a terminal only"
