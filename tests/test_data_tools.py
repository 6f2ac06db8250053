"""Split, smoke-run limits, folds, inventory, mean/std, EDA, demo data and the ``cvkit`` command."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from cvkit import cli
from cvkit.data import demo
from cvkit.data.io import DataError, read_image
from cvkit.data.tools import add_folds, eda, inventory, limit_items, mean_std, split_train_valid, take_items


def _labels_frame():
    return pd.DataFrame({"path": [f"{i}.png" for i in range(100)],
                         "label": ["a"] * 60 + ["b"] * 30 + ["c"] * 10,
                         "patient": [i // 4 for i in range(100)]})


def test_split_is_stratified_and_reproducible():
    frame = _labels_frame()
    train, valid = split_train_valid(frame, 0.2, label_col="label", seed=1)
    assert valid["label"].value_counts().to_dict() == {"a": 12, "b": 6, "c": 2}
    assert len(train) == 80 and not set(train.path) & set(valid.path)
    again, _ = split_train_valid(frame, 0.2, label_col="label", seed=1)
    other, _ = split_train_valid(frame, 0.2, label_col="label", seed=2)
    assert train.path.tolist() == again.path.tolist() and train.path.tolist() != other.path.tolist()


def test_limit_keeps_the_first_rows_or_the_first_of_every_class():
    from cvkit.data.stl10 import ArrayDataset

    frame = _labels_frame()
    assert limit_items(frame, None) is frame and limit_items(frame, 500) is frame
    assert limit_items(frame, 7)["path"].tolist() == [f"{i}.png" for i in range(7)]  # only class "a"
    balanced = limit_items(frame, 7, label_col="label")  # 7 // 3 classes = 2 of each, in table order
    assert balanced["path"].tolist() == ["0.png", "1.png", "60.png", "61.png", "90.png", "91.png"]
    assert limit_items(frame, 2, label_col="label")["label"].tolist() == ["a", "b", "c"]  # at least one of each
    assert limit_items(list("abcde"), 2) == ["a", "b"]
    arrays = ArrayDataset(np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3), np.arange(5))
    kept = limit_items(arrays, 3)
    assert type(kept) is ArrayDataset and kept.labels.tolist() == [0, 1, 2] and len(arrays) == 5
    assert take_items(arrays, [4, 0]).labels.tolist() == [4, 0]
    with pytest.raises(ValueError, match="label_col='label' needs a table"):
        limit_items(arrays, 2, label_col="label")
    with pytest.raises(DataError, match="'kind'"):
        limit_items(frame, 2, label_col="kind")


def test_folds_are_stratified_or_grouped():
    frame = _labels_frame()
    folds = add_folds(frame, 5, label_col="label", seed=0)
    assert (folds.groupby("fold")["label"].value_counts().unstack().to_numpy() == [12, 6, 2]).all()
    grouped = add_folds(frame, 5, group_col="patient", seed=0)
    assert (grouped.groupby("patient")["fold"].nunique() == 1).all() and set(grouped.fold) == set(range(5))
    assert add_folds(frame, 5, label_col="label", seed=0).fold.tolist() == folds.fold.tolist()


def test_mean_std_equals_numpy_over_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate([(5, 7), (9, 4), (6, 6)]):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        names.append(f"{i}.png")
    pd.DataFrame({"path": names}).to_csv(tmp_path / "t.csv", index=False)
    stats = mean_std(tmp_path / "t.csv", workers=2)
    pixels = np.concatenate([read_image(tmp_path / n).reshape(-1, 3) for n in names]).astype(np.float64) / 255
    assert stats["pixels"] == len(pixels) == 35 + 36 + 36
    assert np.allclose(stats["mean"], pixels.mean(axis=0), atol=1e-12)
    assert np.allclose(stats["std"], pixels.std(axis=0), atol=1e-12)
    assert mean_std([tmp_path / n for n in names]) == stats


def test_inventory_lists_sizes_modes_and_unreadable(tmp_path):
    cv2.imwrite(str(tmp_path / "rgb.png"), np.zeros((4, 6, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "gray.png"), np.zeros((3, 5), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"junk")
    frame = pd.DataFrame({"path": ["rgb.png", "gray.png", "bad.png"], "label": ["x", "y", "x"]})
    inv, summary = inventory(frame, root=tmp_path)
    assert inv[["width", "height", "channels", "mode"]].iloc[:2].values.tolist() == [[6, 4, 3, "RGB"], [5, 3, 1, "L"]]
    assert inv.file_size[2] == 4 and "bad.png: not a readable image" in inv.error[2] and inv.label.tolist()[2] == "x"
    assert summary["unreadable"] == 1 and summary["modes"] == {"RGB": 1, "L": 1}
    assert summary["counts_label"] == {"x": 2, "y": 1}


def test_demo_is_deterministic_and_eda_writes_plots(tmp_path):
    a = demo.build_boxes(tmp_path / "a", seed=5, per_class=3, canvas=48)
    b = demo.build_boxes(tmp_path / "b", seed=5, per_class=3, canvas=48)
    first = pd.read_csv(a / "train.csv")
    assert first.equals(pd.read_csv(b / "train.csv"))
    assert (a / first.path[0]).read_bytes() == (b / first.path[0]).read_bytes()
    row = first.iloc[0]
    image = read_image(a / row.path)
    inside = image[row.y1 : row.y2, row.x1 : row.x2].mean()
    assert inside > image.mean()  # the digit is where the box says
    written = eda(a / "train.csv", a / "test.csv", tmp_path / "eda")
    assert [p.name for p in written] == ["image_size.png", "brightness_contrast.png", "colour.png", "labels.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_demo_segmentation_rle_matches_png_masks(tmp_path):
    from cvkit.data.datasets import SegmentationDataset

    root = demo.build_segmentation(tmp_path, per_class=2, canvas=32)
    png = SegmentationDataset(root / "train.csv", num_classes=4)
    rle = SegmentationDataset.from_rle(root / "train_rle.csv", root / "images", num_classes=4)
    by_name = {png.frame.path[i].split("/")[-1]: png[i]["targets"] for i in range(len(png))}
    assert len(rle) == len(png) and all((by_name[rle.frame.path[i]] == rle[i]["targets"]).all() for i in range(len(rle)))
    assert sum(t.sum() for t in by_name.values()) > 0


def test_cli_check_split_stats_and_errors(tmp_path, capsys):
    root = demo.build_keypoints(tmp_path, per_class=2, canvas=32)
    cols = ",".join(demo.KEYPOINT_COLS)
    assert cli.main(["check", str(root / "train.csv"), "--task", "keypoints", "--keypoint-cols", cols]) == 0
    assert "no problems" in capsys.readouterr().out
    frame = pd.read_csv(root / "train.csv")
    frame.loc[1, "path"] = "missing.png"
    frame.to_csv(root / "bad.csv", index=False)
    code = cli.main(["check", str(root / "bad.csv"), "--task", "keypoints", "--keypoint-cols", cols,
                     "--report", str(tmp_path / "report.csv")])
    assert code == 1 and "[missing_file]" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "report.csv").row.tolist() == [1]

    assert cli.main(["split", str(root / "train.csv"), "--out-dir", str(tmp_path / "s"), "--valid-fraction", "0.5"]) == 0
    assert len(pd.read_csv(tmp_path / "s" / "valid.csv")) == len(frame) // 2
    assert cli.main(["stats", str(root / "train.csv"), "--out", str(tmp_path / "stats.json")]) == 0
    assert len(json.loads((tmp_path / "stats.json").read_text())["mean"]) == 3

    capsys.readouterr()
    assert cli.main(["check", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cvkit check: error: CSV not found" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["split", str(root / "train.csv"), "--valid-fraction", "half"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_accepts_registered_commands():
    calls = []

    def args(parser):
        parser.add_argument("--n", type=int, default=3, help="how many")

    cli.register_command("test-echo", "A command registered by a test.", args)(lambda a: calls.append(a.n) or 0)
    try:
        assert cli.main(["test-echo", "--n", "4"]) == 0 and calls == [4]
        assert "test-echo" in cli.build_parser().format_help()
        with pytest.raises(KeyError, match="already registered"):
            cli.register_command("check", "again", args)(lambda a: 0)
    finally:
        cli.COMMANDS.unregister("test-echo")


def _one_line_error(kind, match, fn, *args, **kwargs):
    with pytest.raises(kind, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value) and "sklearn" not in str(info.value)
    return str(info.value)


def test_tables_too_small_to_split_say_how_many_rows_they_need(tmp_path):
    pd.DataFrame({"path": [], "label": []}).to_csv(tmp_path / "header.csv", index=False)
    _one_line_error(DataError, r"header.csv: 0 rows give no valid row at valid_fraction=0.2; needs at least 3 rows "
                    r"per 'label' value", split_train_valid, tmp_path / "header.csv")
    two = pd.DataFrame({"path": ["a.png", "b.png"], "label": ["x", "y"]})
    _one_line_error(DataError, r"table: 2 rows give no valid row at valid_fraction=0.2; needs at least 3 rows per "
                    r"'label' value \(largest has 1\)", split_train_valid, two)
    _one_line_error(DataError, "needs at least 3 rows$", split_train_valid, two.iloc[:1], label_col=None)
    train, valid = split_train_valid(two, 0.5, label_col=None)
    assert (len(train), len(valid)) == (1, 1)
    # a class of one stays in train even at a large fraction (it used to go to valid entirely)
    train, valid = split_train_valid(pd.DataFrame({"path": list("abcde"), "label": list("xxxxy")}), 0.6)
    assert "y" in set(train.label) and len(valid) == 2
    for fraction in (-0.1, 0, 1, 1.5, float("nan")):
        _one_line_error(ValueError, "expected a fraction between 0 and 1", split_train_valid, two, fraction)


def test_folds_need_enough_rows_groups_and_labels():
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(4)], "label": list("aabb"), "patient": [1, 1, 2, 3]})
    for n_folds in (0, 1, -3, 2.5, True):
        _one_line_error(ValueError, "expected an integer of at least 2", add_folds, frame, n_folds)
    _one_line_error(DataError, r"table: 4 rows; 5 folds need at least 5 rows \(one per fold\)", add_folds, frame, 5)
    _one_line_error(DataError, r"table: 3 distinct 'patient' values; 4 folds need at least 4 groups", add_folds,
                    frame, 4, group_col="patient")
    _one_line_error(DataError, r"stratified 3 folds need at least 3 rows per 'label' value for some value; the "
                    r"largest has 2", add_folds, frame, 3, label_col="label")
    _one_line_error(DataError, "table: 0 rows; 2 folds need at least 2 rows", add_folds, frame.iloc[:0], 2)
    assert sorted(add_folds(frame, 2, label_col="label").fold) == [0, 0, 1, 1]
