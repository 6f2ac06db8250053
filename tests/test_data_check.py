"""Validation reports every bad row, with its code and a message naming the row and the expectation."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from cvkit.data.check import SKIPPED_ROWS_FILE, check_dataset, prepare_for_training
from cvkit.data.datasets import BoxDataset, ClassificationDataset, KeypointDataset, SegmentationDataset
from cvkit.data.io import DatasetCheckError


def _write(path, height=16, width=24, seed=0):
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(path.suffix, image)
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


@pytest.fixture
def box_csv(tmp_path):
    """Six rows: good, truncated JPEG, zero-byte, unknown label, box outside, missing file; plus a duplicate."""
    for i in range(4):
        _write(tmp_path / f"ok{i}.jpg", seed=i)
    (tmp_path / "cut.jpg").write_bytes(_write(tmp_path / "full.jpg")[:200])
    (tmp_path / "zero.jpg").write_bytes(b"")
    rows = [
        ("ok0.jpg", "cat", 1, 1, 10, 10),
        ("cut.jpg", "cat", 1, 1, 10, 10),
        ("zero.jpg", "dog", 1, 1, 10, 10),
        ("ok1.jpg", "horse", 1, 1, 10, 10),
        ("ok2.jpg", "dog", 5, 5, 30, 10),
        ("gone.jpg", "dog", 1, 1, 10, 10),
        ("ok3.jpg", "dog", 12, 1, 4, 10),
        ("ok0.jpg", "cat", 1, 1, 10, 10),
    ]
    pd.DataFrame(rows, columns=["path", "label", "x1", "y1", "x2", "y2"]).to_csv(tmp_path / "train.csv", index=False)
    return tmp_path / "train.csv"


def test_every_bad_row_is_reported_with_its_code(box_csv):
    dataset = BoxDataset(box_csv, class_map={"cat": 0, "dog": 1})
    report = check_dataset(dataset, workers=2)
    codes = {(p.row, p.code) for p in report.problems}
    assert codes == {(1, "truncated"), (2, "empty_file"), (3, "unknown_label"), (4, "bad_box"),
                     (5, "missing_file"), (6, "bad_box"), (7, "duplicate_path")}
    messages = {p.row: p.message for p in report.problems}
    assert "train.csv row 3 (ok1.jpg): label 'horse' is not in the class map (expected one of ['cat', 'dog'])" \
        in messages[3]
    assert "row 4 (ok2.jpg)" in messages[4] and "outside the 24x16 image" in messages[4]
    assert "inverted" in messages[6] and "cut.jpg: JPEG is truncated" in messages[1]
    assert "zero.jpg: file is empty (0 bytes)" in messages[2] and "repeats row 0" in messages[7]
    assert report.bad_indices == [1, 2, 3, 4, 5, 6, 7] and not report.ok
    assert "7 of 8 rows have problems" in report.summary()


def test_training_refuses_bad_data_or_skips_and_lists_rows(box_csv, tmp_path):
    dataset = BoxDataset(box_csv, class_map={"cat": 0, "dog": 1})
    with pytest.raises(DatasetCheckError, match="7 of 8 rows have problems") as info:
        prepare_for_training(dataset)
    assert len(info.value.report.problems) == 7
    kept = prepare_for_training(dataset, logdir=tmp_path / "logs", skip_errors=True)
    assert len(kept) == 1 and kept.where(0).endswith("row 0 (ok0.jpg)")
    skipped = pd.read_csv(tmp_path / "logs" / SKIPPED_ROWS_FILE)
    assert sorted(skipped["row"]) == [1, 2, 3, 4, 5, 6, 7] and set(skipped.columns) >= {"path", "code", "message"}
    assert kept[0]["boxes"].shape == (4,)


def test_keypoint_count_and_mask_size_rows(tmp_path):
    for i in range(3):
        _write(tmp_path / f"{i}.png", seed=i)
    frame = pd.DataFrame({"path": ["0.png", "1.png", "2.png"],
                          "points": ["1 2 3 4", "1 2 3", "1 2 300 4"]})
    report = check_dataset(KeypointDataset(frame, "points", root=tmp_path, num_keypoints=2))
    assert [(p.row, p.code) for p in report.problems] == [(1, "keypoint_count"), (2, "keypoint_outside")]
    assert "3 keypoint coordinates, expected 4 (2 x, y pairs)" in report.problems[0].message

    cv2.imwrite(str(tmp_path / "m_ok.png"), np.zeros((16, 24), np.uint8))
    cv2.imwrite(str(tmp_path / "m_small.png"), np.zeros((8, 24), np.uint8))
    seg = SegmentationDataset(pd.DataFrame({"path": ["0.png", "1.png", "2.png"],
                                            "mask": ["m_ok.png", "m_small.png", "m_none.png"]}), root=tmp_path)
    report = check_dataset(seg)
    assert [(p.row, p.code) for p in report.problems] == [(1, "mask_size"), (2, "mask_missing_file")]
    assert "mask" in report.problems[0].message and "is 24x8, expected the image size 24x16" in report.problems[0].message


def test_a_corrupt_jpeg_with_an_intact_end_marker_is_reported(tmp_path, capfd):
    from test_data_formats import corrupt_jpeg, textured_jpeg

    for i in range(6):
        (tmp_path / f"ok{i}.jpg").write_bytes(textured_jpeg(seed=i))
    (tmp_path / "bad.jpg").write_bytes(corrupt_jpeg(textured_jpeg(seed=3)))
    _write(tmp_path / "ok.png")
    names = ["ok0.jpg", "ok1.jpg", "bad.jpg", "ok2.jpg", "ok.png", "ok3.jpg", "ok4.jpg", "ok5.jpg"]
    dataset = ClassificationDataset(pd.DataFrame({"path": names, "label": ["a", "b"] * 4}), root=tmp_path)
    capfd.readouterr()
    report = check_dataset(dataset, workers=4)
    assert [(p.row, p.code) for p in report.problems] == [(2, "corrupt_data")]
    assert "table row 2 (bad.jpg)" in report.problems[0].message
    assert "libjpeg reports 'Corrupt JPEG data" in report.problems[0].message
    assert "Corrupt JPEG" not in capfd.readouterr().err
    with pytest.raises(DatasetCheckError, match="corrupt_data: 1"):
        prepare_for_training(dataset)


def _keypoint_table(tmp_path, xs, ys):
    for i in range(len(xs)):
        _write(tmp_path / f"{i}.png", seed=i)
    return pd.DataFrame({"path": [f"{i}.png" for i in range(len(xs))], "x1": xs, "y1": ys,
                         "x2": [np.nan] * len(xs), "y2": [np.nan] * len(xs)})


def test_keypoints_missing_in_every_row_are_refused_up_front(tmp_path):
    frame = _keypoint_table(tmp_path, [np.nan, np.nan, ""], [np.nan, np.nan, ""])
    dataset = KeypointDataset(frame, ["x1", "y1", "x2", "y2"], root=tmp_path)
    report = check_dataset(dataset)
    assert [(p.index, p.code) for p in report.problems] == [(-1, "no_keypoints")]
    assert report.problems[0].message == ("table: all 2 keypoints are missing (empty/NaN) in every one of the 3 rows; "
                                          "expected labelled points in columns x1, y1, x2, y2")
    assert report.bad_indices == [] and not report.ok
    for skip in (False, True):  # dropping rows cannot fix it
        with pytest.raises(DatasetCheckError, match="whole dataset") as info:
            prepare_for_training(dataset, logdir=tmp_path / "logs", skip_errors=skip)
        assert "no_keypoints: 1" in str(info.value)
    frame.loc[1, ["x1", "y1"]] = ["3", "4"]
    assert check_dataset(KeypointDataset(frame, ["x1", "y1", "x2", "y2"], root=tmp_path)).ok


def test_a_text_cell_in_a_keypoint_column_is_a_bad_row_not_a_missing_point(tmp_path):
    frame = _keypoint_table(tmp_path, [1.0, "12,5", 3.0], [2.0, 4.0, 5.0])  # a decimal comma
    report = check_dataset(KeypointDataset(frame, ["x1", "y1", "x2", "y2"], root=tmp_path))
    assert [(p.row, p.code) for p in report.problems] == [(1, "bad_keypoints")]
    assert "table row 1 (1.png): column 'x1' = '12,5' is not a number" in report.problems[0].message


def test_skipping_cannot_leave_an_empty_dataset(tmp_path):
    dataset = ClassificationDataset(pd.DataFrame({"path": ["gone1.png", "gone2.png"], "label": ["a", "b"]}),
                                    root=tmp_path)
    with pytest.raises(DatasetCheckError, match="leave nothing to train on"):
        prepare_for_training(dataset, logdir=tmp_path / "logs", skip_errors=True)
    empty = ClassificationDataset(pd.DataFrame({"path": [], "label": []}), root=tmp_path, class_map={"a": 0})
    report = check_dataset(empty)
    assert [(p.code, p.message) for p in report.problems] == [
        ("no_rows", "table: no rows; expected at least one image to train on")]
    with pytest.raises(DatasetCheckError, match="no_rows"):
        prepare_for_training(empty, skip_errors=True)
