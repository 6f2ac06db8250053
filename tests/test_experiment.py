"""YAML experiments end to end in the library: build, check the data, train, and re-load config.json."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cvkit.config import ConfigError, load_config, stages_from
from cvkit.data.io import DatasetCheckError
from cvkit.experiment import build, complete, load_experiment, pipelines, train_transform
from cvkit.training import run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "configs"


def tiny(demo_root: Path, logdir: Path, **changes) -> dict:
    """Two one-epoch stages of test_resnet on 40 demo digits per split."""
    config = {
        "name": "tiny", "task": "classification", "engine": "cpu", "logdir": str(logdir),
        "data": {"kind": "demo", "root": str(demo_root), "limit": 40},
        "model": {"name": "classifier", "arch": "test_resnet"},
        "augmentation": {"preset": "light", "size": 32},
        "stages": [
            {"name": "head", "epochs": 1, "trainable": "head", "lr": {"head": 0.01}, "batch_size": 16},
            {"name": "full", "epochs": 1, "lr": 0.001, "optimizer": "adamw_v1", "batch_size": 16},
        ],
    }
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_data")


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exp")
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(demo_root, folder / "run")))
    config = load_experiment(path)
    return path, config, run(config, verbose=False)


def test_config_json_reloads_to_the_completed_experiment(trained):
    path, config, result = trained
    logdir = Path(config["logdir"])
    expected = build(load_experiment(path)).config
    assert expected["model"] == {"name": "classifier", "arch": "test_resnet", "num_classes": 10}
    reloaded = load_experiment(logdir / "config.json")
    assert reloaded.pop("pipelines") == pipelines(expected, stages_from(expected))
    assert reloaded == expected
    assert json.loads((logdir / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert {"best", "valid", "test", "epochs"} <= set(result) and result["epochs"] == 2
    assert {"accuracy", "f1_macro", "loss"} <= set(result["valid"]) and math.isfinite(result["test"]["loss"])
    assert json.loads((logdir / "classes.json").read_text()) == [f"digit_{k}" for k in range(10)]


def test_a_run_folder_rebuilds_its_recorded_pipeline(trained):
    """config.json holds each stage's exact pipelines; a rerun from it uses them, not the preset."""
    _, config, _ = trained
    path = Path(config["logdir"]) / "config.json"
    saved = json.loads(path.read_text())
    warp = saved["pipelines"]["head"]["train"]["transform"]["transforms"][0]
    assert warp["__class_fullname__"] == "cvkit.data.warp.OneWarp"
    warp["hflip"] = 0.123
    path.write_text(json.dumps(saved))
    reloaded = load_experiment(path)
    assert train_transform(reloaded, 32, "head").transforms[0].hflip == 0.123
    assert train_transform(load_experiment(path, ["augmentation.preset=light"]), 32, "head").transforms[0].hflip == 0.5


def test_model_initialisation_follows_the_seed(trained):
    _, config, _ = trained
    first, second = build(config).model.state_dict(), build(config).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build({**config, "seed": 7}).model.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_num_classes_that_contradicts_the_data_is_refused(demo_root, tmp_path):
    config = load_config(tiny(demo_root, tmp_path / "run", model={"name": "classifier", "arch": "test_resnet",
                                                                  "num_classes": 3}))
    with pytest.raises(ConfigError, match="model.num_classes: 3 does not match the data, which has 10"):
        build(config)


def test_weights_start_from_another_runs_best(trained):
    _, config, _ = trained
    experiment = build({**config, "weights": config["logdir"]})
    best = torch.load(Path(config["logdir"]) / "best.pth", weights_only=True)["model"]
    assert all(torch.equal(experiment.model.state_dict()[k], v) for k, v in best.items())
    with pytest.raises(ConfigError, match="weights: .*nowhere.pth not found"):
        build({**config, "weights": "nowhere.pth"})


@pytest.mark.parametrize("change, message", [
    ({"data": {"kind": "dmeo"}}, "data.kind: 'dmeo' is not a data kind of task 'classification'; did you mean 'demo'"),
    ({"data": {"kind": "demo", "per_clas": 5}}, "unknown key 'per_clas'; did you mean 'per_class'"),
    ({"augmentation": {"preset": "light", "sise": 32}}, "augmentation: unknown key 'sise'; did you mean 'size'"),
    ({"data": {"kind": "stl10"}, "task": "keypoints"}, r"'stl10' is not a data kind of task 'keypoints'.* valid: \['csv', 'demo'\]"),
])
def test_typos_inside_data_and_augmentation_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        complete(load_config({**tiny(tmp_path, tmp_path / "run"), **change}))


def test_unknown_preset_and_criterion_argument_fail_before_training(demo_root, tmp_path):
    experiment = build(load_config(tiny(demo_root, tmp_path / "run", augmentation={"preset": "lihgt", "size": 32})))
    with pytest.raises(ConfigError, match="augmentation.preset: unknown augmentation preset 'lihgt'"):
        experiment.loaders(experiment.stages[0])
    with pytest.raises(ConfigError, match="criterion: .*label_smothing"):
        build(load_config(tiny(demo_root, tmp_path / "run", criterion={"name": "cross_entropy", "label_smothing": 0.1})))


def test_bad_rows_refuse_to_start_or_are_skipped_when_asked(demo_root, tmp_path):
    folder = demo_root / "classification"
    frame = pd.read_csv(folder / "train.csv").head(30)
    frame.loc[len(frame)] = {"path": "images/missing.jpg", "label": "digit_3"}
    frame.to_csv(folder / "bad_train.csv", index=False)
    data = {"kind": "csv", "train": str(folder / "bad_train.csv"), "class_map": str(folder / "encode_classes.json")}
    config = load_config(tiny(demo_root, tmp_path / "run", data=data))
    with pytest.raises(DatasetCheckError, match=r"bad_train.csv row 30 \(images/missing.jpg\)"):
        run(config, verbose=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    experiment = build(load_config(tiny(demo_root, tmp_path / "run", data={**data, "skip_bad_rows": True})))
    before = len(experiment.datasets["train"]) + len(experiment.datasets["valid"])
    experiment.prepare()
    after = len(experiment.datasets["train"]) + len(experiment.datasets["valid"])
    assert after == before - 1
    skipped = list((tmp_path / "run").rglob("skipped_rows.csv"))
    assert len(skipped) == 1 and "missing_file" in skipped[0].read_text()


@pytest.mark.parametrize("task", ["classification", "class_box", "keypoints", "segmentation"])
def test_example_configs_build_and_one_batch_fits(demo_root, tmp_path, task):
    overrides = [f"logdir={tmp_path / 'run'}", f"data.root={demo_root}", "data.limit=16"]
    experiment = build(load_experiment(EXAMPLES / f"{task}_demo.yaml", overrides))
    batch = next(iter(experiment.loaders(experiment.stages[0])["train"]))
    out = experiment.model(batch["features"])
    loss = experiment.criterion(out, batch["targets"])
    metric = experiment.metrics()[0]
    metric.update(out.detach(), batch["targets"])
    assert torch.isfinite(loss) and experiment.config["valid_metric"] in metric.compute()


def test_named_versions_expand():
    config = load_config({"task": "class_box", "data": {"kind": "demo"}, "model": "v1", "augmentation": "light_v1",
                          "criterion": "class_box_v1", "stages": [{"name": "a", "epochs": 1}]})
    assert config["model"] == {"name": "class_box", "arch": "resnet34", "dropout": 0.2}
    assert config["augmentation"] == {"preset": "light", "size": 224}
    assert config["criterion"] == {"name": "class_box", "box_weight": 5.0}


def test_resume_refuses_a_changed_experiment_and_leaves_a_finished_run_alone(trained, tmp_path):
    path, config, result = trained
    logdir = Path(config["logdir"])
    best = (logdir / "best.pth").stat().st_mtime_ns
    assert run(config, resume=True, verbose=False) == json.loads((logdir / "metrics.json").read_text())
    assert (logdir / "best.pth").stat().st_mtime_ns == best, "resuming a finished run must change nothing"
    changed = load_experiment(path, ["stages.1.lr=0.5", "seed=7"])
    with pytest.raises(ConfigError, match=r"resume: .*differs .* in \['seed', 'stages.1.lr'\]"):
        run(changed, resume=True, verbose=False)
    (logdir / "metrics.json").unlink()  # as if killed before its end: --resume-changed continues and records
    run(changed, resume=True, verbose=False, allow_changes=True)
    saved = json.loads((logdir / "config.json").read_text())
    assert saved["seed"] == 7 and saved["stages"][1]["lr"] == 0.5
    assert saved["resumed_with_changes"] == [{"keys": ["seed", "stages.1.lr"], "before": {"seed": 42, "stages.1.lr": 0.001},
                                              "resumed_after": {"stage": "full", "epoch": 2}}]


def test_a_copied_run_folder_continues_where_it_is(trained, tmp_path):
    import shutil

    _, config, _ = trained
    copy = tmp_path / "copied_run"
    shutil.copytree(config["logdir"], copy)
    assert load_experiment(copy / "config.json")["logdir"] == str(copy)


def test_balanced_weight_and_sampler_from_yaml(demo_root, tmp_path):
    from collections import Counter

    from cvkit.losses import balanced_class_weights

    data = {"kind": "demo", "root": str(demo_root), "limit": 40}
    config = load_config(tiny(demo_root, tmp_path / "run", data=data,
                              criterion={"name": "cross_entropy", "weight": "balanced"},
                              stages=[{"name": "a", "epochs": 1, "batch_size": 8, "sampler": "balanced"}]))
    experiment = build(config)
    labels = experiment.task.labels(experiment.datasets["train"])
    expected = torch.tensor(balanced_class_weights(labels, 10), dtype=torch.float32)
    assert torch.allclose(experiment.criterion.weight, expected)
    loader = experiment.loaders(experiment.stages[0])["train"]
    loader.generator.manual_seed(5)
    first = list(iter(loader.sampler))
    loader.generator.manual_seed(5)
    assert list(iter(loader.sampler)) == first, "the draw follows the loader's (reseeded) generator"
    drawn = Counter(int(labels[i]) for _ in range(20) for i in iter(loader.sampler))
    assert max(drawn.values()) / min(drawn.values()) < 1.6, drawn
    with pytest.raises(ConfigError, match="balanced needs class labels"):
        build(load_config({**tiny(demo_root, tmp_path / "run2"), "task": "keypoints",
                           "model": {"name": "keypoints", "arch": "test_resnet"},
                           "criterion": {"name": "keypoint", "weight": "balanced"}}))
