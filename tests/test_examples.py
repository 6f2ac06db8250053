"""Every issue-5 example end to end on its demo data, in a smoke mode (few images, 1 epoch a stage, tiny sizes).

Each test checks something a broken example would get wrong: test metrics that a re-evaluation
of best.pth reproduces, one prediction row per test image in the competition's format, RLE that
decodes back to the predicted mask, BatchNorm statistics that a frozen-BN stage must not move.
The library pieces the examples use (export by class, flip pairs from names, main blocks, a
criterion attribute set per stage) are checked here too, and every example stays a short script.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import examples_loader
from cvkit.io import load_checkpoint, state_dict_of

SMOKE = ["--limit", "40", "--epochs", "1", "--quiet", "--seed", "0"]


def run(name: str, logdir: Path, *extra: str) -> dict:
    module = examples_loader.load(name)
    result = module.main(["--logdir", str(logdir), *SMOKE, *extra])
    for artefact in ("metrics.json", "config.json", "progress.png", "best.pth", "log.csv"):
        assert (logdir / artefact).is_file(), artefact
    assert any((logdir / "tensorboard").iterdir())
    return result


def best_weights(logdir: Path) -> dict:
    return state_dict_of(load_checkpoint(logdir / "best.pth"))


@pytest.mark.slow
def test_localization_test_metrics_reproduce_and_predictions_are_pixels(tmp_path):
    from cvkit.data import BoxDataset, create_preset
    from cvkit.losses import ClassBoxCriterion
    from cvkit.metrics import BoxMetrics
    from cvkit.models import ClassBoxModel
    from cvkit.runners import evaluate
    from cvkit.tasks import ClassBoxTargets

    logdir = tmp_path / "run"
    result = run("localization_train", logdir, "--head-epochs", "1", "--image-size", "32")
    stored = json.loads((logdir / "metrics.json").read_text())
    assert stored["test"] == pytest.approx(result["test"])
    assert [s["name"] for s in json.loads((logdir / "config.json").read_text())["stages"]] == ["v1", "v2"]

    root = tmp_path / "demo_data" / "boxes"
    test_rows = pd.read_csv(root / "test.csv").head(40)
    classes = {n: i for i, n in enumerate(sorted(pd.read_csv(root / "train.csv")["label"].unique()))}
    model = ClassBoxModel("test_resnet", len(classes))
    model.load_state_dict(best_weights(logdir))
    test = ClassBoxTargets(BoxDataset(test_rows, root=root, class_map=classes, transform=create_preset("resize", 32)))
    # the box weight of the last stage (100) must be what the final evaluation used, not the initial 75
    again = evaluate(model, DataLoader(test, 16), ClassBoxCriterion(len(classes), box_weight=100.0),
                     lambda: [BoxMetrics(len(classes))])
    assert again == pytest.approx(stored["test"], rel=1e-5)

    predictions = pd.read_csv(logdir / "predictions.csv")  # cvkit.inference.write_submission's class_box layout
    assert list(predictions.columns) == ["path", "label", "x1", "y1", "x2", "y2"]
    assert predictions["path"].tolist() == [Path(p).name for p in test_rows["path"]]
    assert set(predictions["label"]) <= set(classes)
    boxes = predictions[["x1", "y1", "x2", "y2"]].to_numpy()
    assert (boxes >= 0).all() and (boxes <= 96).all() and boxes.max() > 1  # pixels of the 96x96 originals


@pytest.mark.slow
def test_facial_keypoints_reports_plain_and_tta_error(tmp_path):
    logdir = tmp_path / "run"
    result = run("facial_keypoints_train", logdir, "--image-size", "32", "--batch-size", "8")
    stored = json.loads((logdir / "metrics.json").read_text())
    assert set(stored) >= {"test", "test_plain", "test_hflip_tta"}
    # all demo images are 96x96, so per-sample sizes and the fixed size must give the same error
    assert stored["test_plain"]["mean_error_px"] == pytest.approx(stored["test"]["mean_error_px"], rel=1e-4)
    assert stored["test_hflip_tta"]["mean_error_px"] != stored["test_plain"]["mean_error_px"]
    assert result["test_hflip_tta"] == pytest.approx(stored["test_hflip_tta"])
    assert json.loads((logdir / "config.json").read_text())["flip_pairs"] == [[0, 1], [2, 3]]  # left/right names
    assert sorted(p.name for p in (logdir / "worst").iterdir())[0] == "worst_e001.png"


@pytest.mark.slow
def test_steel_submission_is_the_tasks_rle_of_the_flip_tta_masks_at_original_size(tmp_path):
    import torch.nn.functional as F

    from cvkit.data import create_preset
    from cvkit.data.datasets import pipeline_input
    from cvkit.data.io import read_image
    from cvkit.data.rle import rle_decode
    from cvkit.inference.tta import tta_predict
    from cvkit.models import create_segmentation_model

    logdir = tmp_path / "run"
    result = run("steel_segmentation_train", logdir, "--head-epochs", "1", "--image-size", "32", "--limit", "12",
                 "--overlays", "--threshold", "0.4")
    assert set(result) >= {"test", "test_flip_tta"}
    # metrics.json is the run's (written once, by the runner); the example's extra score has its own file
    assert json.loads((logdir / "test_flip_tta.json").read_text()) == pytest.approx(result["test_flip_tta"])
    assert "test_flip_tta" not in json.loads((logdir / "metrics.json").read_text())
    root = tmp_path / "demo_data" / "segmentation_25_per_class"
    paths = [root / p for p in pd.read_csv(root / "test.csv")["path"].head(12)]  # data.limit keeps the first 12
    names = [p.name for p in paths]
    submission = pd.read_csv(logdir / "submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["ImageId", "EncodedPixels", "ClassId"]  # the layout Severstal scores
    assert list(zip(submission["ImageId"], submission["ClassId"])) == [(n, c) for n in names for c in (1, 2, 3, 4)]
    assert sorted(p.name for p in (logdir / "overlays").iterdir()) == sorted(f"{p.stem}.png" for p in paths)

    model = create_segmentation_model("tu-test_resnet", 4)
    model.load_state_dict(best_weights(logdir))
    model.eval()
    rows = submission.set_index(["ImageId", "ClassId"])["EncodedPixels"]
    for path in (paths[0], paths[-1]):
        image, transform = read_image(path), create_preset("resize", 32)
        x = transform(**pipeline_input(path, transform)[0])["image"]  # decoded as cvkit decodes (reduced)
        with torch.no_grad():
            probs = tta_predict(model, x[None], ["identity", "hflip"], target="mask")
        expected = (F.interpolate(probs, size=image.shape[:2], mode="bilinear", align_corners=False)[0] > 0.4).numpy()
        assert expected.any() or not any(rows[(path.name, c)] for c in (1, 2, 3, 4))
        for c in range(4):
            np.testing.assert_array_equal(rle_decode(rows[(path.name, c + 1)], image.shape[:2]), expected[c])


@pytest.mark.slow
def test_steel_tuned_submission_equals_cvkit_predict_on_the_same_images(tmp_path):
    """The example applies the run's tuned post-processing exactly as `cvkit predict --tta hflip` does."""
    import shutil

    from cvkit.cli import main

    logdir = tmp_path / "run"
    run("steel_segmentation_train", logdir, "--head-epochs", "1", "--image-size", "32", "--limit", "12")
    assert (logdir / "postprocess.json").is_file()
    post = json.loads((logdir / "metrics.json").read_text())["postprocess"]
    assert post["after"] >= post["before"]
    root = tmp_path / "demo_data" / "segmentation_25_per_class"
    images = tmp_path / "images"
    images.mkdir()
    for path in pd.read_csv(root / "test.csv")["path"].head(12):
        shutil.copy(root / path, images)
    out = tmp_path / "predicted.csv"
    assert main(["predict", "--checkpoint", str(logdir), "--config", str(logdir / "config.json"), "--images",
                 str(images), "--out", str(out), "--tta", "hflip", "--batch-size", "16", "--device", "cpu"]) == 0
    read = lambda p: pd.read_csv(p, keep_default_na=False).sort_values(["ImageId", "ClassId"]).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(read(out), read(logdir / "submission.csv"))


@pytest.mark.slow
def test_sports_submission_export_and_start_weights(tmp_path):
    from cvkit.models import create_model
    from cvkit.models.weights import load_weights

    logdir, export = tmp_path / "run", tmp_path / "by_class"
    start = tmp_path / "start.pth"
    torch.save(create_model("test_convnext", 10).state_dict(), start)
    result = run("sports_train", logdir, "--export-dir", str(export), "--weights", str(start))
    assert json.loads((logdir / "config.json").read_text())["valid"]["metric"] == "f1_macro"
    submission = pd.read_csv(logdir / "submission.csv")
    assert list(submission.columns) == ["path", "label"]  # as `cvkit predict` writes it
    assert len(submission) == 40 and submission["path"].is_unique
    exported = {p.parent.name + "/" + p.name for p in export.rglob("*.jpg")}
    assert exported == {f"{label}/{Path(path).name}" for path, label in zip(submission["path"], submission["label"])}
    stored = json.loads((logdir / "metrics.json").read_text())
    assert result["test"]["f1_macro"] == pytest.approx(stored["test"]["f1_macro"])
    model = create_model("test_convnext", 10)
    load_weights(model, logdir / "best.pth")
    assert torch.equal(model.state_dict()["head.fc.weight"], best_weights(logdir)["head.fc.weight"])


@pytest.mark.slow
def test_ford_vs_ferrari_keeps_backbone_bn_frozen_and_resizes_per_stage(tmp_path):
    from cvkit.data import ClassificationDataset, create_preset, limit_items, split_train_valid
    from cvkit.losses import create_criterion
    from cvkit.metrics import ClassificationMetrics
    from cvkit.models import create_model
    from cvkit.runners import evaluate

    logdir = tmp_path / "run"
    run("ford_vs_ferrari_train", logdir, "--head-epochs", "1", "--sizes", "32", "40", "48", "--batch-size", "8")
    config = json.loads((logdir / "config.json").read_text())
    stages = config["stages"]
    assert [(s["image_size"], s["batch_size"]) for s in stages] == [(32, 8), (40, 6), (48, 4)]
    assert [s["train_bn"] for s in stages[1:]] == [False, False]
    assert config["unfrozen_from"] == "blocks.2"
    split = config["split"]
    assert split == {"train": 20, "valid": 10, "test": 10}  # --limit keeps 4 per class; 1 of each to test and valid
    weights = best_weights(logdir)
    # the runner scored the test split with the best weights at the last stage's size (48)
    everything = ClassificationDataset.from_folders(tmp_path / "demo_data" / "classification" / "images")
    test_rows = split_train_valid(limit_items(everything.frame, 40, label_col="label"), 0.2, "label", seed=0)[1]
    test = ClassificationDataset(test_rows, root=everything.root, class_map=everything.class_map,
                                 transform=create_preset("resize", 48))
    model = create_model("test_efficientnet", 10, head="bn_dropout", head_dropout=0.5)
    model.load_state_dict(weights)
    again = evaluate(model, DataLoader(test, 5), create_criterion("cross_entropy"), lambda: [ClassificationMetrics(10)])
    assert again == pytest.approx(json.loads((logdir / "metrics.json").read_text())["test"], rel=1e-5)
    backbone_bn = [k[: -len(".running_mean")] for k in weights
                   if k.endswith("running_mean") and not k.startswith("classifier")]
    assert backbone_bn
    # frozen in every stage: still the statistics of the demo's pretrained weights the run started from
    start = load_checkpoint(tmp_path / "demo_data" / "pretrained" / "test_efficientnet-digits-rotation.safetensors")
    for name in backbone_bn:
        for stat in ("running_mean", "running_var"):
            assert torch.equal(weights[f"{name}.{stat}"], start[f"{name}.{stat}"]), f"{name}.{stat}"
    assert not torch.equal(start[f"{backbone_bn[0]}.running_var"], torch.ones_like(start[f"{backbone_bn[0]}.running_var"]))


def test_flip_pairs_from_names():
    from cvkit.inference.tta import flip_pairs_from_names

    names = ["left_eye_center", "right_eye_center", "nose_tip", "mouth_right_corner", "mouth_left_corner"]
    assert flip_pairs_from_names(names) == [(0, 1), (3, 4)]
    assert flip_pairs_from_names(["centre", "top"]) == []


def test_export_by_class_keeps_repeated_names_apart(tmp_path):
    from cvkit.inference.export import export_by_class

    for folder in ("a", "b"):
        (tmp_path / "src" / folder).mkdir(parents=True)
        (tmp_path / "src" / folder / "1.jpg").write_bytes(folder.encode())
    (tmp_path / "src" / "a" / "2.jpg").write_bytes(b"2")
    paths = [tmp_path / "src" / "a" / "1.jpg", tmp_path / "src" / "b" / "1.jpg", tmp_path / "src" / "a" / "2.jpg"]
    assert export_by_class(paths, ["x", "x", "y"], tmp_path / "out") == 3
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.jpg")) == \
        ["x/a_1.jpg", "x/b_1.jpg", "y/2.jpg"]


def test_export_by_class_refuses_class_names_that_lead_outside_the_folder(tmp_path):
    from cvkit.inference.export import export_by_class

    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    out = tmp_path / "out" / "by_class"
    for bad in ("../../x", str(tmp_path / "abs"), "", ".."):
        with pytest.raises(ValueError, match="class name") as caught:
            export_by_class([image, image], ["ok", bad], out)
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "out").exists()  # refused before anything was copied
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()
    with pytest.raises(ValueError, match="one label per image"):
        export_by_class([image], [], out)


def test_main_blocks_are_the_stages_in_order():
    from cvkit.models import ClassBoxModel, create_model
    from cvkit.models.groups import main_blocks

    assert main_blocks(create_model("test_resnet", 3)) == ["layer1", "layer2", "layer3", "layer4"]
    assert main_blocks(ClassBoxModel("test_resnet", 3))[-2] == "backbone.layer3"
    with pytest.raises(ValueError, match="no layerN / blocks.N / stages.N"):
        main_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_class_box_targets_and_criterion_weight_set_per_stage():
    from types import SimpleNamespace

    from cvkit.callbacks.criterion import SetCriterionAttribute
    from cvkit.losses import ClassBoxCriterion
    from cvkit.tasks import ClassBoxTargets

    items = [{"features": torch.zeros(3, 4, 4), "targets": torch.tensor(2), "boxes": torch.tensor([0.1, 0.2, 0.3, 0.4]),
              "box_visible": torch.tensor(v), "index": i} for i, v in enumerate((1.0, 0.0))]
    wrapped = ClassBoxTargets(items)
    assert wrapped[0]["targets"].tolist() == pytest.approx([2, 0.1, 0.2, 0.3, 0.4])
    assert wrapped[1]["targets"][0] == 2 and torch.isnan(wrapped[1]["targets"][1:]).all()
    criterion = ClassBoxCriterion(3, box_weight=75.0)
    runner = SimpleNamespace(criterion=criterion)
    SetCriterionAttribute("box_weight", 100.0).on_experiment_start(runner)
    assert criterion.loss.box_weight == 100.0
    out = torch.tensor([[0.0, 0.0, 5.0, 0.1, 0.2, 0.3, 0.5]])
    target = wrapped[0]["targets"][None]
    box_part = criterion(out, target) - ClassBoxCriterion(3, box_weight=0.0)(out, target)
    assert box_part.item() > 0
    with pytest.raises(AttributeError, match="no attribute 'gamma'"):
        SetCriterionAttribute("gamma", 1.0).on_experiment_start(runner)


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*_train.py"))


def code_lines(path: Path) -> int:
    """Lines that are not blank and not only a comment (docstring lines count)."""
    comment_only = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                    if t.type == tokenize.COMMENT and not t.line[: t.start[1]].strip()}
    return sum(1 for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() and n not in comment_only)


def test_examples_are_found():
    assert len(EXAMPLES) >= 6, EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_is_a_short_script_of_choices(example):
    assert code_lines(example) <= 100, f"{example.name}: {code_lines(example)} non-blank, non-comment lines"
    assert "examples_support" not in example.read_text()


def test_code_lines_counts_docstrings_but_not_comments(tmp_path):
    script = tmp_path / "x.py"
    script.write_text('"""Doc\n\nmore doc\n"""\n# a comment\nx = 1  # trailing\n\n    # indented comment\ny = "#"\n')
    assert code_lines(script) == 5  # three docstring lines, x and y


@pytest.mark.slow
def test_an_example_runs_as_a_script_from_the_repo_root():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "examples/sports_train.py", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--export-dir" in done.stdout and "--limit" in done.stdout  # its own option and a shared one (_common)


def test_write_png_round_trips_rgb(tmp_path):
    from cvkit.data.io import read_image
    from cvkit.plots import write_png

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "sub" / "x.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "sub" / "x.png"), rgb)  # channel order kept, lossless
