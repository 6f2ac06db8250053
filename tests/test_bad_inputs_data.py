"""Bad data through the data layer's Python API: one clear error (or report) naming every culprit.

The command-line side of the same inputs is in test_bad_inputs.py.
"""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from cvkit.data.check import check_dataset
from cvkit.data.datasets import IMAGE_EXTENSIONS, ClassificationDataset, SegmentationDataset, list_image_files
from cvkit.data.io import DataError


def _png(path, value=0, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((*size, 3), value, np.uint8))
    return path


def _rle_table(tmp_path, rows):
    _png(tmp_path / "images" / "a.png")
    frame = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    frame.to_csv(tmp_path / "train.csv", index=False)
    return tmp_path / "train.csv"


def test_rle_table_lists_every_bad_row_in_one_line(tmp_path):
    csv = _rle_table(tmp_path, [
        ("a.png", 1, "1 3"),
        ("a.png", "x", "1 3"),
        ("a.png", 2, "1 " + "1" + "0" * 24),  # used to raise OverflowError from numpy
        ("a.png", 5, "1 3"),
        ("a.png", 2, "4 1 2"),
    ])
    with pytest.raises(DataError) as info:
        SegmentationDataset.from_rle(csv, tmp_path / "images", num_classes=4)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{csv}: 4 bad RLE row(s): row 1: ClassId 'x' is not an integer; expected 1..4; "
                              "row 2: EncodedPixels holds 1000000000000000000000000 (25 digits), too large")
    assert "row 3: ClassId 5 outside 1..4; row 4: EncodedPixels has 3 numbers" in message


def test_rle_runs_past_the_image_are_found_by_the_check_for_every_row(tmp_path):
    csv = _rle_table(tmp_path, [("a.png", 1, "60 10"), ("a.png", 2, "1 2"), ("a.png", 3, "70 1")])
    dataset = SegmentationDataset.from_rle(csv, tmp_path / "images", num_classes=3)
    report = check_dataset(dataset)
    assert [p.code for p in report.problems] == ["bad_mask"]
    message = report.problems[0].message
    assert "train.csv row 0 ClassId 1: a run lies outside a 8x8 image" in message
    assert "train.csv row 2 ClassId 3: a run lies outside" in message and "row 1" not in message


@pytest.mark.parametrize("class_map, message", [
    ({"a": 0, "c": 2}, r"class_map given for table: indices \[0, 2\] are not 0..1 without gaps \(index 1 is missing\)"),
    ({"a": 0, "b": 1, "c": 1}, r"class_map given for table: index 1 is used by 2 labels \['b', 'c'\]"),
    ({"a": 0, "b": "1"}, r"class_map given for table: index of 'b' is '1'; expected integer indices"),
])
def test_a_class_map_dict_with_a_gap_or_repeat_is_refused(tmp_path, class_map, message):
    frame = pd.DataFrame({"path": ["x.png"], "label": ["a"]})
    with pytest.raises(DataError, match=message) as info:  # used to build a model of the wrong size
        ClassificationDataset(frame, root=tmp_path, class_map=class_map)
    assert "\n" not in str(info.value)


def test_a_class_map_file_with_a_gap_names_the_file(tmp_path):
    (tmp_path / "encode_classes.json").write_text('{"a": 0, "c": 2}')
    frame = pd.DataFrame({"path": ["x.png"], "label": ["a"]})
    with pytest.raises(DataError, match=r"encode_classes.json: indices \[0, 2\] are not 0..1 without gaps"):
        ClassificationDataset(frame, root=tmp_path, class_map=tmp_path / "encode_classes.json")


def test_every_row_with_a_label_outside_the_class_map_is_listed(tmp_path):
    frame = pd.DataFrame({"path": [f"i{i}.png" for i in range(5)], "label": ["cat", "lion", "dog", "tiger", "cat"]})
    for i in range(5):
        _png(tmp_path / f"i{i}.png")
    report = check_dataset(ClassificationDataset(frame, root=tmp_path, class_map={"cat": 0, "dog": 1}))
    assert [(p.row, p.code) for p in report.problems] == [(1, "unknown_label"), (3, "unknown_label")]
    assert "label 'tiger' is not in the class map" in report.problems[1].message


def test_list_image_files_returns_images_sorted_and_what_it_skipped(tmp_path):
    assert ".gif" in IMAGE_EXTENSIONS
    for name in ("b.PNG", "a.jpg", "c.gif", "sub/d.webp", ".ipynb_checkpoints/e.png",
                 "notes.txt", ".DS_Store", "._a.jpg", "sub/labels.csv"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")  # listing goes by name; reading is read_image's job
    files, skipped = list_image_files(tmp_path)
    assert [p.name for p in files] == ["a.jpg", "b.PNG", "c.gif"]
    assert [p.name for p in skipped] == [".DS_Store", "._a.jpg", "notes.txt"]
    files, skipped = list_image_files(tmp_path, recursive=True)
    assert [str(p.relative_to(tmp_path)) for p in files] == ["a.jpg", "b.PNG", "c.gif", "sub/d.webp"]
    assert [str(p.relative_to(tmp_path)) for p in skipped] == [".DS_Store", "._a.jpg", "notes.txt", "sub/labels.csv"]
    with pytest.raises(DataError, match="image folder not found: .*absent"):
        list_image_files(tmp_path / "absent")


def test_from_folders_reads_gif_ignores_hidden_folders_and_lists_skipped_files(tmp_path):
    from PIL import Image

    _png(tmp_path / "cat" / "1.png", 10)
    (tmp_path / "dog").mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "dog" / "2.gif")
    _png(tmp_path / ".ipynb_checkpoints" / "3.png")  # Jupyter's folder used to become a class
    (tmp_path / "cat" / "readme.txt").write_text("x")
    _png(tmp_path / "loose.png")
    dataset = ClassificationDataset.from_folders(tmp_path)
    assert dataset.class_map == {"cat": 0, "dog": 1}
    assert dataset.frame.path.tolist() == ["cat/1.png", "dog/2.gif"]
    assert [str(p.relative_to(tmp_path)) for p in dataset.skipped_files] == ["cat/readme.txt", "loose.png"]
    assert dataset[1]["targets"].item() == 1 and check_dataset(dataset).ok
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "cat" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images with .* in class sub-folders \(left out 1 other files: cat/a.txt\)"):
        ClassificationDataset.from_folders(empty)


def test_csv_image_paths_may_leave_root_as_documented(tmp_path):
    _png(tmp_path / "shared" / "a.png", 30)
    _png(tmp_path / "abs.png", 60)
    (tmp_path / "tables").mkdir()
    frame = pd.DataFrame({"path": ["../shared/a.png", str(tmp_path / "abs.png")], "label": ["x", "y"]})
    frame.to_csv(tmp_path / "tables" / "train.csv", index=False)
    dataset = ClassificationDataset(tmp_path / "tables" / "train.csv")
    assert dataset.path(0) == tmp_path / "tables" / "../shared/a.png" and dataset.path(1) == tmp_path / "abs.png"
    assert check_dataset(dataset).ok and dataset[0]["features"].shape == (3, 8, 8)
