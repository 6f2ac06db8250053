"""Adding a task is one file: a regression task (one number per image) with its own output layout,
defined and registered here, trained, predicted and checked through Python and through the ``cvkit``
command, with no change under ``cvkit/``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from cvkit.cli import main
from cvkit.data.datasets import TableDataset, require_columns
from cvkit.data.demo import build_classification
from cvkit.training import run
from cvkit.inference import load_run, predict, write_submission
from cvkit.losses import CRITERIA, register_criterion
from cvkit.metrics import METRICS, Metric, register_metric
from cvkit.tasks import COMMON_OPTIONS, TASKS, DataOption, Task, register_task
from cvkit.layouts import LAYOUTS, OutputLayout, register_layout


class ValueDataset(TableDataset):
    """Images with one number each, in column ``value_col``."""

    def __init__(self, table: Any, root: Any = None, path_col: str = "path", value_col: str = "value",
                 transform: Any = None) -> None:
        super().__init__(table, root, path_col, transform)
        require_columns(self.frame, [value_col], self.name)
        self.value_col = value_col

    def value(self, index: int) -> float:
        return float(pd.to_numeric(pd.Series([self.frame.at[index, self.value_col]]), errors="coerce")[0])

    def target_problems(self, index: int, width: int, height: int) -> List[tuple]:
        if math.isfinite(self.value(index)):
            return []
        return [("bad_value", f"{self.where(index)}: {self.value_col} = {self.frame.at[index, self.value_col]!r} "
                              "is not a number")]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        out = self._augment_row(index)
        return {"features": out["image"], "targets": torch.tensor([self.value(index)]), "index": index}


class RMSE(Metric):
    name = "test_rmse"
    lower_is_better = ("rmse",)

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        error = (outputs.detach().double().cpu() - targets.double().cpu()) ** 2
        self.sums += torch.stack([error.sum(), torch.tensor(float(error.numel()), dtype=torch.float64)])

    def keys(self) -> List[str]:
        return ["rmse"]

    def state_tensors(self) -> List[torch.Tensor]:
        return [self.sums]

    def compute(self) -> Dict[str, float]:
        return {"rmse": math.sqrt(self.sums[0] / self.sums[1]) if self.sums[1] else float("nan")}


def mse(reduction: str = "mean") -> nn.Module:
    return nn.MSELoss(reduction=reduction)


class ValueLayout(OutputLayout):
    """One raw number per image: never activated, unmoved by TTA, compared raw at export. It counts the
    views it averages, so the test can tell that prediction went through it."""

    name = "test_value"
    averaged = 0

    def average(self, predictions):
        predictions = list(predictions)
        type(self).averaged += len(predictions)
        return super().average(predictions)

    def width(self, num_classes, num_keypoints=None):
        return 1


class Regression(Task):
    name = "test_regression"
    model = "classifier"
    criterion = "test_mse"
    metric = "test_rmse"
    valid_metric = "rmse"
    layout = ValueLayout()
    options = COMMON_OPTIONS + (DataOption("value_col", "column holding the number", default="value"),)
    submission_columns = ("path", "value")

    def dataset(self, table: Any, spec: Mapping[str, Any], class_map: Any = None, transform: Any = None) -> Any:
        return ValueDataset(table, spec.get("root"), spec.get("path_col") or "path", spec.get("value_col") or "value",
                            transform)

    def model_sizes(self, train: Any, classes: Sequence[str]) -> Dict[str, int]:
        return {"num_classes": 1}

    def metric_kwargs(self, model_spec: Mapping[str, Any], image_size: Optional[int]) -> Dict[str, Any]:
        return {}

    def decode(self, output: Any, height: int, width: int, classes: Sequence[str]) -> Dict[str, Any]:
        return {"value": float(np.asarray(output).reshape(-1)[0])}

    def rows(self, name: str, prediction: Mapping[str, Any], classes: Sequence[str], probs: bool = False,
             threshold: float = 0.5, tuning: Any = None) -> List[Dict[str, Any]]:
        return [{"path": name, "value": round(prediction["value"], 5)}]


@pytest.fixture(scope="module")
def registered():
    register_layout(ValueLayout)  # so an export's contract can name it
    register_task(Regression)
    register_metric(RMSE)
    register_criterion(mse, name="test_mse")
    yield
    TASKS.unregister("test_regression")
    LAYOUTS.unregister("test_value")
    METRICS.unregister("test_rmse")
    CRITERIA.unregister("test_mse")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = build_classification(tmp_path_factory.mktemp("regression"), seed=0, per_class=4, size=32)
    for split in ("train", "test"):
        frame = pd.read_csv(root / f"{split}.csv")
        frame["value"] = frame["label"].str.replace("digit_", "").astype(float) / 9
        frame.drop(columns=["label"]).to_csv(root / f"value_{split}.csv", index=False)
    return root


def experiment(data: Path, logdir: Path) -> Dict[str, Any]:
    return {"name": "regression", "task": "test_regression", "engine": "cpu", "logdir": str(logdir), "seed": 3,
            "data": {"kind": "csv", "train": str(data / "value_train.csv"), "test": str(data / "value_test.csv")},
            "model": {"arch": "test_resnet"}, "augmentation": {"preset": "resize", "size": 32},
            "stages": [{"name": "all", "epochs": 2, "lr": 0.003, "batch_size": 8}]}


def test_python_path_trains_predicts_and_writes_the_tasks_submission(registered, data, tmp_path):
    from cvkit.config import load_config

    result = run(load_config(experiment(data, tmp_path / "run")), verbose=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["minimize_valid_metric"] is True, "the direction comes from the metric's lower_is_better"
    assert saved["criterion"] == {"name": "test_mse"} and saved["model"]["num_classes"] == 1
    assert math.isfinite(result["test"]["rmse"])
    loaded = load_run(tmp_path / "run")
    test = pd.read_csv(data / "value_test.csv")
    before = ValueLayout.averaged
    predictions = predict(loaded.model, data / "value_test.csv", "test_regression", image_size=32, device="cpu")
    assert ValueLayout.averaged > before, "prediction averaged its views through the task's own layout"
    frame = write_submission(predictions, "test_regression", out=tmp_path / "sub.csv")
    assert TASKS.get("test_regression").layout.compare(torch.zeros(2, 1))[0] == "outputs"
    assert list(frame.columns) == ["path", "value"] and frame["path"].tolist() == test["path"].tolist()
    rmse = math.sqrt(((frame["value"] - test["value"]) ** 2).mean())
    assert rmse == pytest.approx(result["test"]["rmse"], abs=1e-3), "prediction path and test metric disagree"


def test_command_path_checks_trains_and_predicts(registered, data, tmp_path, capsys):
    bad = pd.read_csv(data / "value_train.csv", dtype={"value": str})
    bad.loc[2, "value"] = "x"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    root = ["--root", str(data)]
    assert main(["check", str(data / "value_train.csv"), "--task", "test_regression", *root]) == 0
    assert main(["check", str(tmp_path / "bad.csv"), "--task", "test_regression", *root]) == 1
    assert "row 2" in capsys.readouterr().out
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment(data, tmp_path / "run")))
    assert main(["train", str(path), "--quiet"]) == 0
    out = tmp_path / "sub.csv"
    assert main(["predict", "--checkpoint", str(tmp_path / "run"), "--config", str(tmp_path / "run" / "config.json"),
                 "--images", str(data / "value_test.csv"), "--out", str(out), "--device", "cpu"]) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["path", "value"] and len(frame) == len(pd.read_csv(data / "value_test.csv"))
