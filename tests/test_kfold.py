"""K-fold: every training row is predicted once, by the one fold model that did not train on it."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import demo_experiment
from cvkit.cli import main
from cvkit.config import load_config
from cvkit.experiment import build, load_experiment
from cvkit.kfold import kfold

FOLDS = 3


def experiment(demo_root: Path, logdir: Path) -> dict:
    return demo_experiment("kf", demo_root, logdir, 30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kfold")
    config = load_config(experiment(folder / "demo", folder / "run"))
    return folder, config, kfold(config, FOLDS, verbose=False)


def test_every_training_row_is_predicted_by_the_fold_that_did_not_train_on_it(trained):
    folder, config, summary = trained
    oof = pd.read_csv(folder / "run" / "oof.csv")
    assert list(oof.columns) == ["path", "label", "fold", "row", "target"]
    assert sorted(oof["row"]) == list(range(30)), "one prediction for every training row"
    for fold in range(FOLDS):
        datasets = build(load_experiment(folder / "run" / f"fold_{fold}" / "config.json")).datasets
        trained_on = set(datasets["train"].rows.tolist())
        held_out = set(datasets["valid"].rows.tolist())
        assert not trained_on & held_out and len(trained_on | held_out) == 30
        assert set(oof.loc[oof["fold"] == fold, "row"]) == held_out


def test_cv_json_summarises_the_folds_and_the_pooled_oof_metric(trained):
    folder, config, summary = trained
    saved = json.loads((folder / "run" / "cv.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    per_fold = [json.loads((folder / "run" / f"fold_{k}" / "metrics.json").read_text())["best"]["score"]
                for k in range(FOLDS)]
    assert saved["per_fold"] == per_fold and saved["mean"] == pytest.approx(statistics.fmean(per_fold))
    oof = pd.read_csv(folder / "run" / "oof.csv")
    assert saved["oof"]["accuracy"] == pytest.approx(float(np.mean(oof["label"] == oof["target"])))


def test_resume_keeps_finished_folds_and_finishes_the_rest(trained):
    folder, config, _ = trained
    stamps = [(folder / "run" / f"fold_{k}" / "best.pth").stat().st_mtime_ns for k in range(FOLDS)]
    (folder / "run" / f"fold_{FOLDS - 1}" / "metrics.json").unlink()  # as if killed before its end
    kfold(config, FOLDS, resume=True, verbose=False)
    after = [(folder / "run" / f"fold_{k}" / "best.pth").stat().st_mtime_ns for k in range(FOLDS)]
    assert after[:-1] == stamps[:-1] and (folder / "run" / f"fold_{FOLDS - 1}" / "metrics.json").is_file()


def test_the_command_trains_folds_and_refuses_bad_values(tmp_path, capsys):
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "demo", tmp_path / "run")))
    assert main(["train", str(path), "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err
    assert main(["train", str(path), "--group-col", "patient"]) == 2
    assert main(["train", str(path), "--folds", "2", "--group-col", "nope", "--quiet"]) == 2
    assert "data.group_col: 'nope' is not a column" in capsys.readouterr().err
    assert main(["train", str(path), "--folds", "2", "--quiet"]) == 0
    assert (tmp_path / "run" / "cv.json").is_file() and len(pd.read_csv(tmp_path / "run" / "oof.csv")) == 30


def test_an_ensemble_is_the_mean_of_its_members(trained):
    import torch

    from cvkit.inference import load_run, predict

    folder, config, _ = trained
    runs = [load_run(folder / "run" / f"fold_{k}") for k in range(FOLDS)]
    test_csv = next((folder / "demo").rglob("test.csv"))
    options = dict(transform=runs[0].transform(), image_size=32, device="cpu", tta=["hflip"])
    members = [predict(r.model, test_csv, "classification", **options) for r in runs]
    together = predict([r.model for r in runs], test_csv, "classification", **options)
    for k, p in enumerate(together):
        assert torch.allclose(p.output, torch.stack([m[k].output for m in members]).mean(0), atol=1e-6)


def test_predict_on_a_kfold_folder_averages_its_folds(trained, tmp_path):
    from cvkit.inference import load_run, predict, write_submission

    folder, config, _ = trained
    test_csv = next((folder / "demo").rglob("test.csv"))
    out = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(folder / "run"), "--config", str(folder / "run"), "--images",
                 str(test_csv), "--out", str(out), "--device", "cpu", "--probs"]) == 0
    runs = [load_run(folder / "run" / f"fold_{k}") for k in range(FOLDS)]
    expected = write_submission(predict([r.model for r in runs], test_csv, "classification", device="cpu",
                                        transform=runs[0].transform(), image_size=32), "classification",
                                runs[0].classes, probs=True)
    got = pd.read_csv(out)
    assert got["label"].tolist() == expected["label"].tolist()
    assert np.allclose(got.filter(like="prob_").to_numpy(), expected.filter(like="prob_").to_numpy(), atol=1e-5)
    two = tmp_path / "two.csv"
    assert main(["predict", "--checkpoint", str(folder / "run" / "fold_0"), "--checkpoint",
                 str(folder / "run" / "fold_1" / "best.pth"), "--config", str(folder / "run" / "fold_0"),
                 "--images", str(test_csv), "--out", str(two), "--device", "cpu"]) == 0
    assert len(pd.read_csv(two)) == len(got)


def test_segmentation_kfold_tunes_its_post_processing_out_of_fold_and_predict_applies_it(tmp_path):
    """postprocess.json beside the folds is chosen on every training row (pooled OOF), not on one fold's
    valid split, and `cvkit predict --checkpoint <k-fold run>` applies it instead of fold 0's own."""
    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    config = load_experiment(configs / "segmentation_demo.yaml", [
        f"logdir={tmp_path / 'run'}", f"data.root={tmp_path / 'demo'}", "data.per_class=3", "data.limit=16",
        "stages.0.epochs=1", "stages.1.epochs=1", "augmentation.size=32"])
    summary = kfold(config, 2, verbose=False)
    base = tmp_path / "run"
    pooled = json.loads((base / "postprocess.json").read_text())
    oof = pd.read_csv(base / "oof.csv")
    per_fold = [json.loads((base / f"fold_{k}" / "postprocess.json").read_text())["images"] for k in (0, 1)]
    assert pooled["images"] == oof["row"].nunique() == sum(per_fold) and min(per_fold) > 0
    assert summary["postprocess"] == {"file": "postprocess.json", "split": "out-of-fold",
                                      "before": pooled["before"], "after": pooled["after"]}
    assert pooled["after"] >= pooled["before"]

    for entry in pooled["classes"]:  # everything above probability 0: every mask is the whole image
        entry.update(threshold=0.0, min_area=0, min_total=0)
    (base / "postprocess.json").write_text(json.dumps(pooled))
    test_csv = next((tmp_path / "demo").rglob("test.csv"))
    out = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(base), "--config", str(base / "fold_0"), "--images", str(test_csv),
                 "--out", str(out), "--device", "cpu"]) == 0
    from cvkit.data.rle import rle_decode
    from cvkit.data.io import read_image

    sub = pd.read_csv(out)
    first = read_image(test_csv.parent / pd.read_csv(test_csv)["path"][0]).shape[:2]
    masks = [rle_decode(str(r), first) for r in sub["EncodedPixels"].fillna("")]
    assert masks and all(m.all() for m in masks)
