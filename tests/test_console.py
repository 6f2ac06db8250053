"""The console is a fixed-column table, one line per epoch, stage boundaries marked, no progress bars
when the output is not a terminal."""
from __future__ import annotations

import io

import torch

from conftest import tiny_loaders
from cvkit.callbacks.console import progress_bars_wanted
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def test_one_line_per_epoch_with_stage_headers(tmp_path, capsys):
    stages = [Stage("head", 2, trainable="head", lr=0.01), Stage("all", 1, lr={"head": 0.01, "backbone": 0.001})]
    StagedRunner().fit(create_model("test_resnet", 3), stages, tiny_loaders(), torch.nn.CrossEntropyLoss(), tmp_path,
                       metrics=lambda: [ClassificationMetrics(3)], valid_metric="accuracy",
                       minimize_valid_metric=False, verbose=True)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err, "no carriage-return progress bars off a terminal"
    lines = captured.out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("-- stage ")]
    assert [lines[i] for i in headers] == [l for l in lines if l.startswith("-- stage head")] + \
        [l for l in lines if l.startswith("-- stage all")]
    columns = lines[headers[1] + 1].split()
    assert columns[:2] == ["stage", "epoch"] and "accuracy" in columns and columns[-1] == "seconds"
    assert "backbone" in columns and "head" in columns, "every group's LR has a column"
    rows = [l.split() for l in lines if l.split()[:1] in (["head"], ["all"])]
    assert [(r[0], r[1]) for r in rows] == [("head", "1"), ("head", "2"), ("all", "3")]
    assert all(len(r) == len(rows[0]) or r[0] == "all" for r in rows)
    assert "loss/std" not in captured.out and "momentum" not in captured.out


def test_progress_bars_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_bars_wanted(Tty()) and not progress_bars_wanted(io.StringIO())
