"""``loggers: [tensorboard, mlflow]``: one MLflow run per cvkit run, read back with MLflow's own client."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import Interrupt, StopAtEpoch, tiny_loaders
from test_accumulation import TinyNet
from test_experiment import tiny

from cvkit.callbacks.tensorboard import run_hparams
from cvkit.config import ConfigError, load_config, stages_from
from cvkit.training import run
from cvkit.runners import StagedRunner
from cvkit.stages import Stage

MISSING = "loggers: mlflow needs the mlflow package: pip install 'cvkit[mlflow]'"


def client_of(logdir: Path):
    """MLflow's own client on the store a run keeps in its folder by default."""
    tracking = pytest.importorskip("mlflow.tracking", reason="the mlflow extra is not installed: pip install 'cvkit[mlflow]'")
    return tracking.MlflowClient(tracking_uri=f"sqlite:///{(logdir.resolve() / 'mlruns' / 'mlflow.db').as_posix()}")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'cvkit[mlflow]'")
    folder = tmp_path_factory.mktemp("tracked")
    config = load_config(tiny(folder / "demo_data", folder / "run", loggers=["tensorboard", "mlflow"]))
    return config, run(config, verbose=False)


def test_the_run_reads_back_with_mlflows_own_client(tracked):
    config, result = tracked
    logdir = Path(config["logdir"])
    client = client_of(logdir)
    experiment = client.get_experiment_by_name("tiny")  # the experiment's name
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["run"] and runs[0].info.status == "FINISHED"  # the folder's name
    mlrun = runs[0]
    saved = json.loads((logdir / "config.json").read_text())
    assert saved["loggers"] == ["tensorboard", "mlflow"] and (logdir / "tensorboard").is_dir()
    expected = {k: str(v) for k, v in run_hparams(stages_from(saved), saved).items()}
    assert mlrun.data.params == expected
    assert {"head/epochs": "1", "head/trainable": "head", "head/lr/head": "0.01", "full/optimizer": "adamw",
            "full/lr/all": "0.001", "model/arch": "test_resnet", "seed": "42"}.items() <= mlrun.data.params.items()
    log = pd.read_csv(logdir / "log.csv")
    for key, column in (("accuracy/valid/epoch", "valid/accuracy"), ("loss/train/epoch", "train/loss")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, key))
        assert [step for step, _ in history] == [1, 2]  # one per epoch, on the run's global epoch count
        assert [value for _, value in history] == pytest.approx(log[column].tolist(), rel=1e-12)
    stages = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "stage_index/_epoch_/epoch"))
    assert stages == [(1, 0.0), (2, 1.0)]
    metrics = json.loads((logdir / "metrics.json").read_text())
    assert mlrun.data.metrics["best/valid/accuracy"] == pytest.approx(metrics["valid"]["accuracy"])
    assert mlrun.data.metrics["best/test/accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_without_the_package_mlflow_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    config = load_config(tiny(tmp_path / "demo_data", tmp_path / "run", loggers=["mlflow"]))
    with pytest.raises(ConfigError) as caught:
        run(config, verbose=False)
    assert str(caught.value) == MISSING
    with pytest.raises(ValueError, match=f"^{MISSING.replace('[', '.').replace(']', '.')}$"):
        StagedRunner().fit(TinyNet(), [Stage("s", 1)], tiny_loaders(8), torch.nn.CrossEntropyLoss(),
                           tmp_path / "python", verbose=False, engine="cpu", loggers=["tensorboard", "mlflow"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "python").exists()


@pytest.mark.parametrize("loggers,message", [
    (["tensorbord"], r"loggers\[0\]: unknown logger 'tensorbord'; did you mean 'tensorboard'\?"),
    (["tensorboard", {"name": "mlflow", "tracking_url": "x"}], r"loggers\[1\]: unknown mlflow options \['tracking_url'\]"),
    ("mlflow", r"loggers: expected list, got str"),
    (["mlflow", "mlflow"], r"loggers\[1\]: logger 'mlflow' is listed twice"),
])
def test_bad_logger_entries_name_the_entry(tmp_path, loggers, message):
    with pytest.raises(ConfigError, match=message):
        load_config(tiny(tmp_path, tmp_path / "run", loggers=loggers))


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'cvkit[mlflow]'")
    stages = [Stage("a", 1, lr=0.05, optimizer="sgd"), Stage("b", 2, lr=0.01)]

    def fit(**kwargs):
        return StagedRunner().fit(TinyNet(), stages, tiny_loaders(8), torch.nn.CrossEntropyLoss(), tmp_path,
                                  verbose=False, engine="cpu", loggers=["mlflow"], **kwargs)

    with pytest.raises(Interrupt):
        fit(callbacks=lambda s: [StopAtEpoch(3)])
    client = client_of(tmp_path)
    experiment = client.get_experiment_by_name(tmp_path.name)  # no run name given: the folder's
    (cut,) = client.search_runs([experiment.experiment_id])
    assert cut.info.status == "FAILED"
    runner = fit(resume=True)
    (resumed,) = client.search_runs([experiment.experiment_id])
    assert resumed.info.run_id == cut.info.run_id and resumed.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, "loss/valid/epoch"))
    assert history == [(r["epoch"], pytest.approx(r["valid/loss"], rel=1e-12)) for r in runner.history]
    assert [r["epoch"] for r in runner.history] == [1, 2, 3]
    assert not (tmp_path / "tensorboard").exists()  # only the loggers asked for


def test_the_command_refuses_a_bad_logger_in_one_line(tmp_path):
    """`cvkit train exp.yaml --set loggers=[...]` as a user types it: exit 2, one line, nothing trained."""
    import subprocess

    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tiny(tmp_path / "demo_data", tmp_path / "run")))
    done = subprocess.run([sys.executable, "-m", "cvkit", "train", str(path), "--set", "loggers=[tensorboard, mlfow]"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("loggers[1]: unknown logger 'mlfow'; did you mean 'mlflow'? "
                                                         "valid: ['mlflow', 'tensorboard']")
    assert not (tmp_path / "run").exists()
