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


def _word_ends(line: str) -> set:
    return {i + 1 for i, c in enumerate(line) if c != " " and (i + 1 == len(line) or line[i + 1] == " ")}


def _names(header: str, row: str) -> list:
    """The header cut where the row's cells end: each column's name, whole (names may hold spaces)."""
    ends = sorted(_word_ends(row))
    return [header[start:end].strip() for start, end in zip([0, *ends], ends)]


def test_validate_both_rows_show_both_scores_and_the_kept_weights_under_whole_names():
    from types import SimpleNamespace

    from cvkit.callbacks.console import ConsoleTableCallback

    lines = []
    console = ConsoleTableCallback("valid", "accuracy", write=lines.append)
    runner = SimpleNamespace(engine=SimpleNamespace(is_main_process=True),
                             run_state=SimpleNamespace(history=[], kept_weights=None))
    for epoch, (ema, raw) in enumerate([(0.91, 0.87), (0.88, 0.93)], 1):
        runner.run_state.history.append({"stage": "s", "epoch": epoch, "train/loss": 0.5, "valid/loss": 0.4,
                                         "valid/accuracy": ema, "valid_raw/accuracy": raw, "valid_raw/loss": 0.3,
                                         "lr/head": 0.01})
        runner.run_state.kept_weights = "ema" if ema >= raw else "raw"  # what the checkpoint callback chose
        console.on_epoch_start(runner)
        console.on_epoch_end(runner)
    title, header, first, second = lines
    assert title.startswith("-- stage s (valid: EMA weights, valid_raw: raw weights, kept: the better)")
    assert _names(header, first) == ["stage", "epoch", "train loss", "valid loss", "valid accuracy",
                                     "valid_raw accuracy", "kept", "lr head", "seconds"]
    assert first.split()[4:7] == ["0.9100", "0.8700", "ema"] and second.split()[4:7] == ["0.8800", "0.9300", "raw"]
    for line in (first, second):  # every cell ends where its column's whole name ends
        assert len(line) == len(header) and _word_ends(line) <= _word_ends(header), line


def test_a_tiny_ema_run_prints_the_weights_its_checkpoint_kept(tmp_path, capsys):
    from test_accumulation import TinyNet

    from cvkit.io import load_checkpoint

    stages = [Stage("avg", 2, lr=0.05, optimizer="sgd", ema={"decay": 0.5, "validate": "both"}), Stage("plain", 1)]
    runner = StagedRunner().fit(TinyNet(), stages, tiny_loaders(8), torch.nn.CrossEntropyLoss(), tmp_path,
                                engine="cpu", verbose=True)
    lines = capsys.readouterr().out.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("-- stage avg"))
    assert "valid_raw: raw weights" in lines[title]
    assert _names(lines[title + 1], lines[title + 2])[2:6] == ["train loss", "valid loss", "valid_raw loss", "kept"]
    rows = [line.split() for line in lines if line.split()[:1] == ["avg"]]
    expected = ["raw" if row["valid_raw/loss"] < row["valid/loss"] else "ema" for row in runner.history[:2]]
    assert [r[5] for r in rows] == expected
    assert rows[-1][5] == load_checkpoint(tmp_path / "checkpoints" / "avg" / "last.pth")["weights"]
    plain = next(i for i, line in enumerate(lines) if line.startswith("-- stage plain"))
    assert "kept" not in lines[plain + 1] and "valid_raw" not in lines[plain + 1], "a stage without EMA: no extra column"
