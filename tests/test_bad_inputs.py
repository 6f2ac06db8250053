"""Bad inputs through the public entry points: each gets a clear error naming the culprit, or a
documented conversion — never a traceback from deep inside torch, OpenCV or pandas."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from cvkit.config import ConfigError, resolve
from cvkit.data import (
    BoxDataset,
    ClassificationDataset,
    DataError,
    ImageReadError,
    KeypointDataset,
    LabelError,
    TableError,
    check_dataset,
    create_preset,
    prepare_for_training,
    read_image,
)
from cvkit.data.stl10 import STL10FormatError, read_images
from cvkit.io import CheckpointError, load_checkpoint


def write_png(path, array) -> str:
    assert cv2.imwrite(str(path), array)
    return str(path)


def good_jpeg(path, h: int = 16, w: int = 16) -> str:
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))
    return str(path)


# Files that are not good images: a clear error naming the file.
@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(open(good_jpeg(p.with_name("ok.jpg")), "rb").read()[:-40]), "truncated"),
        (lambda p: p.write_bytes(b"this is a text file, not a JPEG" * 10), "not a readable image"),
        (lambda p: None, "no such|not found|missing"),
    ],
    ids=["zero-byte", "truncated-jpeg", "text-with-jpg-extension", "missing"],
)
def test_unreadable_files_name_the_file(tmp_path, make, pattern):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageReadError, match=rf"bad.jpg.*({pattern})|({pattern}).*bad.jpg"):
        read_image(path)


# Odd but valid images: a documented conversion to RGB uint8 HxWx3.
@pytest.mark.parametrize(
    "array, expect_shape, expect_pixel",
    [
        (np.full((1, 1, 3), 200, np.uint8), (1, 1, 3), None),
        (np.full((2, 400, 3), 10, np.uint8), (2, 400, 3), None),
        (np.full((8, 8), 77, np.uint8), (8, 8, 3), [77, 77, 77]),
        (np.dstack([np.full((8, 8), c, np.uint8) for c in (10, 20, 30, 0)]), (8, 8, 3), [30, 20, 10]),
        (np.full((8, 8, 3), 0xAB00, np.uint16), (8, 8, 3), [0xAB, 0xAB, 0xAB]),
    ],
    ids=["1x1", "huge-aspect-ratio", "grayscale", "rgba-alpha-dropped", "16-bit-top-byte"],
)
def test_odd_images_are_converted_predictably(tmp_path, array, expect_shape, expect_pixel):
    image = read_image(write_png(tmp_path / "odd.png", array))  # cv2 writes BGR(A): expect_pixel is RGB
    assert image.dtype == np.uint8 and image.shape == expect_shape
    if expect_pixel is not None:
        assert image[0, 0].tolist() == expect_pixel


def test_odd_sizes_go_through_a_preset_to_the_model_size(tmp_path):
    frame = pd.DataFrame({"path": ["tiny.png", "wide.png"], "label": ["a", "b"]})
    write_png(tmp_path / "tiny.png", np.full((1, 1, 3), 9, np.uint8))
    write_png(tmp_path / "wide.png", np.full((3, 900, 3), 9, np.uint8))
    frame.to_csv(tmp_path / "train.csv", index=False)
    ds = ClassificationDataset(tmp_path / "train.csv", transform=create_preset("medium", 32))
    assert [tuple(ds[i]["features"].shape) for i in range(2)] == [(3, 32, 32), (3, 32, 32)]


def test_empty_csv_and_missing_column_name_the_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TableError, match="empty.csv"):
        ClassificationDataset(tmp_path / "empty.csv")
    (tmp_path / "nolabel.csv").write_text("path\na.jpg\n")
    with pytest.raises(TableError, match=r"nolabel.csv.*'label'|'label'.*nolabel.csv"):
        ClassificationDataset(tmp_path / "nolabel.csv")


def test_label_unseen_in_training_names_row_and_label(tmp_path):
    good_jpeg(tmp_path / "a.jpg")
    pd.DataFrame({"path": ["a.jpg", "a.jpg"], "label": ["cat", "zebra"]}).to_csv(tmp_path / "test.csv", index=False)
    ds = ClassificationDataset(tmp_path / "test.csv", class_map={"cat": 0, "dog": 1})
    report = check_dataset(ds)
    assert report.bad_indices == [1] and "zebra" in report.summary()
    assert int(ds[0]["targets"]) == 0
    with pytest.raises(LabelError, match=r"test.csv row 1 .*'zebra' is not in the class map"):
        ds[1]


def test_bad_rows_are_all_reported_and_training_refuses(tmp_path):
    good_jpeg(tmp_path / "ok.jpg", 20, 20)
    (tmp_path / "zero.jpg").write_bytes(b"")
    frame = pd.DataFrame({
        "path": ["ok.jpg", "zero.jpg", "ok.jpg", "missing.jpg"],
        "label": ["a", "a", "b", "b"],
        "x1": [1, 1, 15, 1], "y1": [1, 1, 2, 1], "x2": [10, 10, 30, 10], "y2": [10, 10, 9, 10],
    })
    frame.to_csv(tmp_path / "boxes.csv", index=False)
    ds = BoxDataset(tmp_path / "boxes.csv", box_cols=("x1", "y1", "x2", "y2"), box_format="xyxy")
    report = check_dataset(ds)
    assert not report.ok
    assert sorted(set(report.bad_indices)) == [1, 2, 3], "zero-byte, box outside the image, missing file"
    text = report.summary()
    assert "zero.jpg" in text and "missing.jpg" in text and "row 2" in text
    with pytest.raises(DataError, match="skip"):
        prepare_for_training(ds, tmp_path / "run")
    kept = prepare_for_training(ds, tmp_path / "run", skip_errors=True)
    assert len(kept) == 1 and (tmp_path / "run" / "skipped_rows.csv").is_file()


def test_nan_keypoints_are_masked_not_errors(tmp_path):
    good_jpeg(tmp_path / "face.jpg", 20, 20)
    pd.DataFrame({"path": ["face.jpg"], "x0": [5.0], "y0": [6.0], "x1": [np.nan], "y1": [np.nan]}).to_csv(
        tmp_path / "kp.csv", index=False)
    item = KeypointDataset(tmp_path / "kp.csv", keypoint_cols=["x0", "y0", "x1", "y1"])[0]
    assert item["keypoints_mask"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.isnan(item["targets"][2:]).all() and torch.isfinite(item["targets"][:2]).all()


def test_wrong_stl10_and_checkpoint_files_name_the_file(tmp_path):
    (tmp_path / "train_X.bin").write_bytes(b"\1" * 1000)
    with pytest.raises(STL10FormatError, match="train_X.bin"):
        read_images(tmp_path / "train_X.bin")
    (tmp_path / "best.pth").write_bytes(b"PK\3\4 not really a zip")
    with pytest.raises(CheckpointError, match="best.pth"):
        load_checkpoint(tmp_path / "best.pth")


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"seed": "forty-two"}, "seed: expected int"),
        ({"stages": [{"name": "s", "epochs": 2.5}]}, "epochs must be an int"),
        ({"stages": [{"name": "s", "epochs": 1, "lr": "fast"}]}, "learning rate"),
        ({"stages": "head then full"}, "stages: expected list"),
    ],
)
def test_config_with_wrong_types_names_the_key(change, pattern):
    base = {"task": "classification", "data": {"kind": "demo"}, "model": {"name": "classifier"},
            "stages": [{"name": "s", "epochs": 1}]}
    with pytest.raises(ConfigError, match=pattern):
        resolve({**base, **change})


# --- the `cvkit` command: every bad experiment value is one line on stderr, exit code 2 -----------

TINY_EXPERIMENT = {
    "name": "tiny", "task": "classification", "engine": "cpu",
    "data": {"kind": "demo", "per_class": 4}, "model": {"name": "classifier", "arch": "test_resnet"},
    "augmentation": {"preset": "resize", "size": 32}, "stages": [{"name": "a", "epochs": 1, "batch_size": 8}],
}


@pytest.mark.parametrize("overrides, culprit", [
    (["stages.0.epochs=[1"], "not valid YAML"),
    (["seed=-1"], "seed: expected an integer >= 0"),
    (["data.limit=-5"], "data.limit: expected an integer >= 1"),
    (["data.limit=0"], "data.limit: expected an integer >= 1"),
    (["augmentation.size=0"], "augmentation.size: expected an image size in pixels from 8 to 4096, got 0"),
    (["augmentation.normalize=[1, 2]"], "augmentation.normalize: expected"),
    (["model.num_classes=ten"], "model.num_classes: expected an integer >= 1, got 'ten'"),
    (["model.checkpoint_path=a.pth"], "model.checkpoint_path: cvkit loads weights itself"),
    (["engine=gpu"] if not torch.cuda.is_available() else ["engine=tpu"], "engine: "),
    (["data.valid_fraction=1.5"], "data.valid_fraction: expected a number between 0 and 1"),
    (["task=regresion"], "unknown task 'regresion'"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_experiment_values_are_one_line_naming_the_key(tmp_path, capsys, overrides, culprit):
    import yaml

    from cvkit.cli import main

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**TINY_EXPERIMENT, "logdir": str(tmp_path / "run")}))
    args = ["train", str(path)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and culprit in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_predict_refuses_a_missing_checkpoint_and_a_cuda_device_without_gpu(tmp_path, capsys):
    from cvkit.cli import main

    (tmp_path / "imgs").mkdir()
    good_jpeg(tmp_path / "imgs" / "a.jpg")
    config = tmp_path / "run" / "config.json"
    config.parent.mkdir()
    config.write_text('{"task": "classification", "data": {"kind": "demo"}, "model": {"arch": "test_resnet", '
                      '"num_classes": 2}, "stages": [{"name": "a", "epochs": 1}]}')
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--config", str(config),
                 "--images", str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pth" in err and "not found" in err
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--config", str(config),
                 "--images", str(tmp_path / "imgs"), "--image-size", "-3"]) == 2
    assert "--image-size must be a positive number" in capsys.readouterr().err
    (tmp_path / "run" / "best.pth").write_bytes(b"PK\x03\x04 cut off")
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--config", str(config),
                 "--images", str(tmp_path / "imgs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pth" in err


def test_report_on_a_metrics_file_that_is_not_a_mapping(tmp_path, capsys):
    from cvkit.cli import main

    (tmp_path / "metrics.json").write_text("[1, 2]")
    (tmp_path / "config.json").write_text("{}")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json" in err and "mapping" in err


@pytest.mark.parametrize("stage, culprit", [
    ({"scheduler": {"name": "step", "step_size": 0}}, "scheduler 'step' with {'step_size': 0} fails when stepped"),
    ({"early_stopping": {"patience": "x"}}, "early_stopping.patience must be an integer >= 1"),
    ({"early_stopping": {"patience": 2, "min_delta": -1}}, "early_stopping.min_delta must be a number >= 0"),
    ({"optimizer": {"name": "sgd", "momentum": -1}}, "bad optimizer_kwargs"),
])
def test_bad_stage_options_fail_before_the_first_batch(stage, culprit):
    with pytest.raises(ConfigError, match=r"stages\[0\]: .*" + culprit.replace("(", r"\(").replace("{", r"\{")):
        resolve({**TINY_EXPERIMENT, "stages": [{"name": "a", "epochs": 1, **stage}]})


def test_eda_on_unreadable_images_says_so(tmp_path, capsys):
    from cvkit.cli import main

    (tmp_path / "t.csv").write_text("path,label\na.jpg,x\nb.jpg,y\n")
    (tmp_path / "a.jpg").write_text("not a jpeg")
    assert main(["eda", str(tmp_path / "t.csv"), str(tmp_path / "t.csv"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no readable image in the train table" in err
    good_jpeg(tmp_path / "b.jpg")
    with pytest.warns(UserWarning, match="1 of 2 train images unreadable"):
        assert main(["eda", str(tmp_path / "t.csv"), str(tmp_path / "t.csv"), "--out-dir", str(tmp_path / "out")]) == 0
