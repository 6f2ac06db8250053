"""TensorBoard holds every epoch of every stage on one timeline, however short the stages."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import tensorboardX.event_file_writer
import torch
from conftest import tiny_loaders
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def scalars(folder, tag):
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("same_second", [True, False], ids=["stages-in-one-second", "real-clock"])
def test_two_one_epoch_stages_both_reach_tensorboard(tmp_path, monkeypatch, same_second):
    if same_second:
        # tensorboardX names event files by the second they open; pin that second so the second
        # stage's files are named exactly like the first stage's.
        monkeypatch.setattr(tensorboardX.event_file_writer, "time", SimpleNamespace(time=lambda: 1700000000.0))
    stages = [Stage("a", 1, trainable="head", lr=0.01), Stage("b", 1, lr=0.001)]
    StagedRunner().fit(create_model("test_resnet", 3), stages, tiny_loaders(n_train=16, n_valid=16),
                       torch.nn.CrossEntropyLoss(), tmp_path, verbose=False)
    board = tmp_path / "tensorboard"
    assert [step for step, _ in scalars(board / "valid", "loss/epoch")] == [1, 2]
    assert [step for step, _ in scalars(board / "train", "loss/epoch")] == [1, 2]
    assert scalars(board / "_epoch_", "stage_index/epoch") == [(1, 0.0), (2, 1.0)]


def test_hparams_tab_holds_the_stage_settings_and_final_metrics(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from conftest import tiny_loaders
    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    StagedRunner().fit(create_model("test_resnet", 3), [Stage("a", 1, lr=0.01, batch_size=4)], tiny_loaders(),
                       torch.nn.CrossEntropyLoss(), tmp_path, verbose=False, config={"model": {"arch": "test_resnet"}})
    events = EventAccumulator(str(tmp_path / "tensorboard" / "hparams"))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["a/lr/all"].number_value == pytest.approx(0.01)
    assert start.hparams["a/batch_size"].number_value == 4 and start.hparams["model/arch"].string_value == "test_resnet"
    loss = json.loads((tmp_path / "metrics.json").read_text())["valid"]["loss"]
    assert events.Scalars("hparam/valid/loss")[0].value == pytest.approx(loss, rel=1e-6)
