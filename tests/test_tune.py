"""Hyperparameter search (cvkit.tune, ``cvkit tune``): trials are ordinary runs, failures and pruning are
recorded, the direction follows the valid metric, and processes on one storage share one study."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from cvkit.cli import main  # noqa: E402
from cvkit.config import complete, load_config, load_experiment  # noqa: E402
from cvkit.experiment import build_datasets  # noqa: E402
from cvkit.training import run  # noqa: E402
from cvkit.tune import SpaceError, pruning_callback, read_space, require_optuna, tune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny(demo_root: Path, logdir: Path, **changes) -> dict:
    """Two one-epoch stages of test_resnet on 24 demo digits at 16 pixels, no loggers."""
    config = {
        "name": "tiny", "task": "classification", "engine": "cpu", "logdir": str(logdir), "loggers": [],
        "data": {"kind": "demo", "root": str(demo_root), "limit": 24},
        "model": {"name": "classifier", "arch": "test_resnet"},
        "augmentation": {"preset": "resize", "size": 16},
        "stages": [
            {"name": "head", "epochs": 1, "trainable": "head", "lr": {"head": 0.01}, "batch_size": 24},
            {"name": "full", "epochs": 1, "lr": 0.001, "batch_size": 24},
        ],
    }
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """The demo digits, built once (processes sharing a study then only read them)."""
    root = tmp_path_factory.mktemp("demo_data")
    build_datasets(complete(load_config(tiny(root, root / "unused"))))
    return root


def _trials(summary: dict, state: str) -> list:
    return [t for t in summary["trials"] if t["state"] == state]


def test_trials_are_runs_with_the_sampled_keys_failures_go_on_and_best_yaml_repeats(demo_root, tmp_path):
    """valid_metric loss is lower-is-better: the study minimises and best.yaml is the lowest trial's run."""
    logdir = tmp_path / "study"
    config = load_config(tiny(demo_root, logdir, valid_metric="loss"))
    space = {"stages.1.lr": {"low": "1e-4", "high": 1e-2, "log": True},
             "augmentation.preset": {"choices": ["resize", "nosuchpreset"]}}
    summary = tune(config, space, trials=3, sampler_seed=3, verbose=False)
    assert summary["direction"] == "minimize"
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    failed, done = _trials(summary, "FAIL"), _trials(summary, "COMPLETE")
    assert failed and done and max(t["number"] for t in done) > failed[0]["number"], \
        f"seed 3 should sample a failing trial before a completing one: {summary['trials']}"
    for trial in failed:
        assert trial["params"]["augmentation.preset"] == "nosuchpreset"
        assert "augmentation.preset" in trial["error"] and "nosuchpreset" in trial["error"]
        assert "\n" not in trial["error"]
    for trial in done:
        saved = json.loads((Path(trial["folder"]) / "config.json").read_text())
        assert saved["stages"][1]["lr"] == pytest.approx(trial["params"]["stages.1.lr"])
        assert saved["augmentation"]["preset"] == trial["params"]["augmentation.preset"] == "resize"
        assert saved["stages"][0]["lr"] == {"head": 0.01}, "keys outside the space stay as the experiment has them"
        assert Path(saved["logdir"]) == logdir / f"trial_{trial['number']}"
        metrics = json.loads((Path(trial["folder"]) / "metrics.json").read_text())
        assert trial["value"] == pytest.approx(metrics["best"]["score"])
    best = min(done, key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"]
    assert json.loads((logdir / "tune.json").read_text()) == json.loads(json.dumps(summary))
    repeated = load_experiment(logdir / "best.yaml")  # what `cvkit train best.yaml` loads
    run_config = load_experiment(Path(best["folder"]) / "config.json")
    assert "logdir" not in repeated, "a repeat gets its own new run folder"
    assert repeated == {k: v for k, v in run_config.items() if k not in ("logdir", "pipelines")}
    again = run({**repeated, "logdir": str(tmp_path / "repeat")}, verbose=False)
    assert again["valid"]["loss"] == json.loads((Path(best["folder"]) / "metrics.json").read_text())["valid"]["loss"]


def test_the_pruning_callback_prunes_a_trial_far_worse_than_the_median():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for value in (0.8, 0.9):
        study.add_trial(optuna.trial.create_trial(value=value, intermediate_values={1: value, 2: value}))
    good, bad = study.ask(), study.ask()
    pruning_callback(good, "accuracy", minimize=False).on_epoch_end(
        SimpleNamespace(epoch_metrics={"valid": {"accuracy": 0.95}}, epoch_step=1))
    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        pruning_callback(bad, "accuracy", minimize=False).on_epoch_end(
            SimpleNamespace(epoch_metrics={"valid": {"accuracy": 0.1}}, epoch_step=1))
    assert study.trials[2].intermediate_values == {1: 0.95} and study.trials[3].intermediate_values == {1: 0.1}


def test_a_pruned_trial_is_recorded_at_the_run_s_global_epoch(demo_root, tmp_path):
    """Accuracy never reaches 2: with 2 warm-up steps the pruner stops the trial after its second
    epoch overall, which is the first epoch of stage 2, logged like any other."""
    logdir = tmp_path / "study"
    pruner = optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=2)
    summary = tune(load_config(tiny(demo_root, logdir)), {"stages.1.lr": {"low": 1e-4, "high": 1e-2}},
                   trials=1, pruner=pruner, verbose=False)
    (trial,) = summary["trials"]
    assert trial["state"] == "PRUNED" and trial["epochs"] == 2 and summary["best"] is None
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{logdir / 'study.db'}").trials[0]
    assert sorted(stored.intermediate_values) == [1, 2]
    log = (Path(trial["folder"]) / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == ["head", "full"]
    assert not (Path(trial["folder"]) / "metrics.json").exists() and not (logdir / "best.yaml").exists()


def test_two_processes_on_one_sqlite_storage_share_one_study(demo_root, tmp_path):
    """Each process runs 2 trials: one study of 4 distinct trials; accuracy is maximised."""
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(tiny(demo_root, tmp_path / "study",
                                              stages=[{"name": "full", "epochs": 1, "lr": 0.001, "batch_size": 24}])))
    space = tmp_path / "space.yaml"
    space.write_text("stages.0.lr: {low: 1e-4, high: 1e-2, log: true}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "cvkit", "tune", str(experiment), "--space", str(space), "--trials", "2",
               "--quiet", "--no-prune"]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.direction.name == "MAXIMIZE" and study.best_value == max(t.value for t in study.trials)
    for t in study.trials:
        saved = json.loads((tmp_path / "study" / f"trial_{t.number}" / "config.json").read_text())
        assert saved["stages"][0]["lr"] == pytest.approx(t.params["stages.0.lr"])
    assert any("best: trial" in out for out, _ in outputs)


@pytest.mark.parametrize("space, message", [
    (None, "space.yaml not found"),
    ("stages.0.lrr: {low: 1e-4, high: 1e-2}", "stages.0.lrr.*no key 'stages.0.lrr'; did you mean 'lr'"),
    ("stages.5.lr: {low: 1e-4, high: 1e-2}", "stages.5.lr.*not an index of a list of 2"),
    ("stages.0.lr: {low: 1e-2, high: 1e-4}", "stages.0.lr: low must be below high"),
    ("stages.0.lr: {low: 0, high: 1e-2, log: true}", "stages.0.lr: log: true needs low > 0"),
    ("stages.0.epochs: {low: 1, high: 2.5, int: true}", "stages.0.epochs: int: true needs whole numbers"),
    ("stages.0.lr: {lo: 1e-4, high: 1e-2}", "unknown key 'lo'; did you mean 'low'"),
    ("augmentation.preset: {choices: []}", "augmentation.preset: choices must be a non-empty list"),
    ("logdir: {choices: [a, b]}", "logdir belongs to the study"),
])
def test_bad_spaces_are_one_line_and_exit_2(demo_root, tmp_path, capsys, space, message):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(tiny(demo_root, tmp_path / "study")))
    if space is not None:
        (tmp_path / "space.yaml").write_text(space + "\n")
    code = main(["tune", str(experiment), "--space", str(tmp_path / "space.yaml"), "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "study" / "study.db").exists()


def test_the_command_needs_trials_or_a_timeout(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["tune", "exp.yaml", "--trials", "1"])  # --space is required
    assert main(["tune", "exp.yaml", "--space", "space.yaml"]) == 2
    assert "give --trials N or --timeout SECONDS" in capsys.readouterr().err


def test_a_missing_optuna_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[tune\]"'):
        require_optuna()
    (tmp_path / "space.yaml").write_text("stages.0.lr: {low: 1e-4, high: 1e-2}\n")
    assert main(["tune", "exp.yaml", "--space", str(tmp_path / "space.yaml"), "--trials", "1"]) == 2
    assert 'pip install -e ".[tune]"' in capsys.readouterr().err


def test_a_space_samples_floats_ints_and_choices():
    space = read_space({"stages.0.lr": {"low": "1e-4", "high": "1e-2", "log": True},
                        "stages.0.epochs": {"low": 1, "high": 4, "int": True},
                        "model.arch": {"choices": ["test_resnet", "resnet18"]}})
    trial = optuna.trial.FixedTrial({"stages.0.lr": 3e-3, "stages.0.epochs": 3, "model.arch": "resnet18"})
    assert {k: p.suggest(trial) for k, p in space.items()} == {"stages.0.lr": 3e-3, "stages.0.epochs": 3,
                                                               "model.arch": "resnet18"}
    assert space["stages.0.lr"].low == 1e-4 and space["stages.0.epochs"].int
    with pytest.raises(SpaceError, match="space: stages.0.lr: give either choices or a range"):
        read_space({"stages.0.lr": {"choices": [1], "low": 0}})


def test_a_bad_space_is_refused_before_torch_loads(tmp_path):
    (tmp_path / "space.yaml").write_text("stages.0.lr: {low: 1e-2, high: 1e-4}\n")
    script = ("import sys\nfrom cvkit.cli import main\ncode = main(sys.argv[1:])\n"
              "print('torch loaded' if 'torch' in sys.modules else 'no torch')\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, "tune", "exp.yaml", "--space", "space.yaml", "--trials", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and done.stdout.strip() == "no torch", done.stdout + done.stderr
    assert done.stderr.strip() == "cvkit tune: error: space.yaml: stages.0.lr: low must be below high, got low 0.01 and high 0.0001"


def test_a_study_of_another_metric_or_direction_is_not_joined(demo_root, tmp_path):
    logdir = tmp_path / "study"
    storage = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="tiny", storage=storage, direction="maximize").set_user_attr("valid_metric", "accuracy")
    with pytest.raises(ValueError, match="'tiny' in .*other.db maximizes accuracy; this experiment minimizes loss"):
        tune(load_config(tiny(demo_root, logdir, valid_metric="loss")), {"stages.1.lr": {"low": 1e-4, "high": 1e-2}},
             trials=1, storage=storage)
