"""The runner's seams: the engines registry, a logger registered from outside cvkit, and EMA checkpoints
written in the old swapped layout (run folders from before ``model_ema``) still loading and resuming."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from catalyst import dl
from catalyst.core.callback import Callback
from conftest import Interrupt, StopAtEpoch, tiny_loaders
from test_accumulation import TinyNet
from torch import nn

from cvkit.config import ConfigError, complete, resolve
from cvkit.engines import ENGINES, engine_names, make_engine
from cvkit.io import load_checkpoint, save_checkpoint, state_dict_of
from cvkit.loggers import LOGGERS, LoggerRun, RunLogger, logger_specs, register_logger
from cvkit.models.weights import load_weights
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def fit(stages, logdir, **kwargs):
    model = TinyNet()
    StagedRunner().fit(model, stages, tiny_loaders(8), nn.CrossEntropyLoss(), logdir, verbose=False, engine="cpu",
                       **kwargs)
    return model


# Engines.
def test_an_unknown_engine_is_one_line_listing_the_registered_ones():
    with pytest.raises(ValueError) as exc:
        make_engine("tpu")
    message = str(exc.value)
    assert "\n" not in message and message.startswith("unknown engine 'tpu'; valid: ")
    assert all(repr(name) in message for name in ["amp", "cpu", "ddp", "ddp_amp", "gpu"])
    assert isinstance(make_engine("cpu"), dl.CPUEngine)
    from cvkit.runners import make_engine as from_runners

    assert from_runners is make_engine


def test_config_and_examples_read_the_engine_registry():
    from test_config import BASE

    assert "ddp" in engine_names() and "ddp" not in engine_names(distributed=False)
    ENGINES.register(lambda: dl.CPUEngine(), name="cpu_probe", cuda=False, distributed=False)
    try:
        assert complete(resolve({**BASE, "engine": "cpu_probe"}))["engine"] == "cpu_probe"  # a CPU engine needs no GPU
        assert isinstance(make_engine("cpu_probe"), dl.CPUEngine)
        with pytest.raises(ConfigError, match=r"engine: unknown engine 'cpu_prob'; did you mean 'cpu_probe'\?"):
            complete(resolve({**BASE, "engine": "cpu_prob"}))
    finally:
        ENGINES.unregister("cpu_probe")
    assert "cpu_probe" not in ENGINES


# Loggers.
class RecordingLogger(RunLogger):
    """A third logger, defined and registered here: it records the lifecycle calls it receives."""

    options = ("label",)
    calls: list = []

    def __init__(self, label: str = "") -> None:
        self.label = label

    def start(self, run: LoggerRun) -> None:
        self.calls.append(("start", self.label, run.logdir.name, run.resumed is None))

    def stage(self, stage, index):
        self.calls.append(("stage", stage.name, index))

    def epoch(self, row) -> None:
        self.calls.append(("epoch", row["epoch"], "valid/loss" in row))

    def finish(self, result) -> None:
        self.calls.append(("finish", result["epochs"]))

    def end(self, status: str = "FINISHED") -> None:
        self.calls.append(("end", status))


class Boom(Callback):
    def __init__(self) -> None:
        super().__init__(order=202)

    def on_epoch_start(self, runner) -> None:
        raise RuntimeError("boom")


@pytest.fixture
def recording():
    register_logger("recording")(RecordingLogger)
    RecordingLogger.calls = []
    yield RecordingLogger.calls
    LOGGERS.unregister("recording")


def test_a_logger_registered_outside_cvkit_sees_its_lifecycle_in_order(tmp_path, recording):
    stages = [Stage("a", 2, lr=0.05, optimizer="sgd"), Stage("b", 1, lr=0.01)]
    fit(stages, tmp_path / "run", loggers=[{"name": "recording", "label": "x"}])
    assert recording == [("start", "x", "run", True), ("stage", "a", 0), ("epoch", 1, True), ("epoch", 2, True),
                         ("stage", "b", 1), ("epoch", 3, True), ("finish", 3), ("end", "FINISHED")]
    assert not (tmp_path / "run" / "tensorboard").exists()  # only the loggers asked for
    recording.clear()
    with pytest.raises(RuntimeError, match="boom"):
        fit(stages, tmp_path / "failed", loggers=["recording"], callbacks=lambda s: [Boom()])
    assert recording == [("start", "", "failed", True), ("stage", "a", 0), ("end", "FAILED")]
    with pytest.raises(ValueError, match=r"loggers\[0\]: unknown recording options \['colour'\]; valid: \['label'\]"):
        logger_specs([{"name": "recording", "colour": "red"}])


# EMA checkpoints in the old layout.
def to_old_layout(path: Path) -> None:
    """Rewrite a checkpoint as cvkit wrote it before ``model_ema``: the kept weights under ``model``,
    the raw ones under ``train_model``, the EMA's weights inside ``ema``."""
    new = load_checkpoint(path)
    old = {k: v for k, v in new.items() if k not in ("model", "model_ema", "ema")}
    old["model"] = new["model_ema"] if new["weights"] == "ema" else new["model"]
    old["train_model"] = new["model"]
    old["ema"] = {"weights": new["model_ema"], "updates": new["ema"]["updates"]}
    save_checkpoint(path, old)


def test_an_old_layout_ema_run_folder_loads_and_resumes_bit_identically(tmp_path):
    stages = [Stage("s", 3, lr=0.05, optimizer="sgd", ema={"decay": 0.7, "use_warmup": True})]
    fit(stages, tmp_path / "full")
    with pytest.raises(Interrupt):
        fit(stages, tmp_path / "cut", callbacks=lambda s: [StopAtEpoch(3)])
    folder = tmp_path / "cut" / "checkpoints"
    ema_now = load_checkpoint(folder / "s" / "last.pth")["model_ema"]
    for path in (folder / "resume.pth", folder / "s" / "last.pth", folder / "s" / "best.pth"):
        to_old_layout(path)
    old = load_checkpoint(folder / "s" / "best.pth")
    assert "model_ema" not in old and old["weights"] == "ema" and "weights" in old["ema"]
    model = TinyNet()
    load_weights(model, folder / "s" / "best.pth")  # predict/export's loader: the EMA the old file kept
    best_ema = old["ema"]["weights"]
    assert all(torch.equal(model.state_dict()[k], best_ema[k]) for k in best_ema)
    assert all(torch.equal(state_dict_of(load_checkpoint(folder / "s" / "last.pth"))[k], ema_now[k]) for k in ema_now)
    fit(stages, tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "s" / "last.pth")
    b = load_checkpoint(folder / "s" / "last.pth")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 18 and b["weights"] == "ema"
    for part in ("model", "model_ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    full_best, cut_best = load_checkpoint(tmp_path / "full" / "best.pth"), load_checkpoint(tmp_path / "cut" / "best.pth")
    assert all(torch.equal(full_best["model"][k], cut_best["model"][k]) for k in full_best["model"])
