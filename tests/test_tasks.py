"""Every registered task, through the same checks: its submission round-trips, its data options
become YAML keys and command flags, and nothing else in cvkit needs to know it."""
from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cvkit.data.rle import rle_encode
from cvkit.tasks import TASKS, get_task, list_tasks, read_rle_table

CLASSES = ["cat", "dog", "emu"]


@pytest.mark.parametrize("name", list_tasks())
def test_submission_round_trips(name):
    task = get_task(name)
    generator = torch.Generator().manual_seed(0)
    try:
        outputs = [task.example_output(CLASSES, generator) for _ in range(3)]
    except NotImplementedError:
        pytest.skip(f"task {name} gives no example output")
    sizes = [(40, 30), (17, 23), (8, 8)]
    decoded = [task.decode(out, h, w, CLASSES) for out, (h, w) in zip(outputs, sizes)]
    rows = [row for k, d in enumerate(decoded) for row in task.rows(f"img{k}.png", d, CLASSES)]
    frame = pd.read_csv(io.StringIO(pd.DataFrame(rows).to_csv(index=False)), keep_default_na=False, na_values=[""])
    assert tuple(frame.columns[: len(task.submission_columns)]) == task.submission_columns
    back = task.read_submission(frame, CLASSES)
    assert sorted(back) == [f"img{k}.png" for k in range(3)]
    for k, d in enumerate(decoded):
        got = back[f"img{k}.png"]
        if "label" in got:
            assert got["label"] == d["label"]
        if "box" in got:
            assert np.allclose(got["box"], d["box"], atol=0.01) and (got["box"][:2] <= got["box"][2:]).all()
        if "points" in got:
            assert np.allclose(got["points"], d["points"], atol=0.01)
        if "rle" in got:
            masks = d["probs"] > 0.5
            assert got["rle"] == {c + 1: rle_encode(masks[c].astype(np.uint8)) for c in range(len(masks))}


def test_class_box_decode_maps_to_original_pixels_and_sorts_corners():
    task = get_task("class_box")
    out = torch.tensor([0.1, 0.7, 0.2, 0.5, 0.25, 0.1, 0.75])
    decoded = task.decode(out, 200, 100, CLASSES)
    assert decoded["label"] == 1
    assert np.allclose(decoded["box"], [10, 50, 50, 150])


def test_segmentation_decode_resizes_to_the_original_image():
    task = get_task("segmentation")
    decoded = task.decode(torch.zeros(2, 8, 16), 256, 1600, [])
    assert decoded["probs"].shape == (2, 256, 1600)


def test_both_historical_severstal_layouts_read_the_same(tmp_path):
    new = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg"], "ClassId": [1, 3], "EncodedPixels": ["1 3", "5 2"]})
    old = pd.DataFrame({"ImageId_ClassId": ["a.jpg_1", "b.jpg_3"], "EncodedPixels": ["1 3", "5 2"]})
    new.to_csv(tmp_path / "new.csv", index=False)
    old.to_csv(tmp_path / "old.csv", index=False)
    a = read_rle_table(tmp_path / "new.csv")
    b = read_rle_table(tmp_path / "old.csv")
    assert a[["ImageId", "ClassId", "EncodedPixels"]].astype(str).equals(b[["ImageId", "ClassId", "EncodedPixels"]].astype(str))


@pytest.mark.parametrize("name", list_tasks())
def test_data_options_are_yaml_keys_and_command_flags(name):
    task = get_task(name)
    parser = argparse.ArgumentParser()
    for option in task.options:
        option.add_to(parser)
        assert option.key in task.data_keys("csv")
    flags = {a.dest for a in parser._actions}
    assert {o.key for o in task.options} <= flags


def test_boxes_is_an_alias_of_class_box_with_a_warning():
    with pytest.warns(FutureWarning, match="'boxes' is now 'class_box'"):
        assert get_task("boxes") is get_task("class_box")


def test_unknown_task_names_the_nearest():
    with pytest.raises(KeyError, match="did you mean 'keypoints'"):
        get_task("keypoint")


def test_nothing_outside_tasks_branches_on_a_task_name():
    package = Path(__file__).resolve().parents[1] / "cvkit"
    pattern = re.compile(r"""(\btask|\["task"\]|\.task)\s*(==|!=|\bin\b)\s*["'(\[]""")
    offenders = [f"{path.relative_to(package)}:{n}" for path in package.rglob("*.py") if "tasks" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
    names = "|".join(re.escape(n) for n in TASKS.list())
    by_name = re.compile(rf"""task\w*\s*==\s*["']({names})["']""")
    assert [p for p in package.rglob("*.py") if "tasks" not in p.parts and by_name.search(p.read_text())] == []
