"""EMA of the weights: the formula, validation and checkpoints on EMA weights, hand-over, resume."""
from __future__ import annotations

import json

import pytest
import torch
from catalyst.core.callback import Callback
from conftest import Interrupt, StopAtEpoch, tiny_loaders
from test_accumulation import TinyNet
from torch import nn

from cvkit.io import load_checkpoint, state_dict_of
from cvkit.runners import StagedRunner, evaluate
from cvkit.stages import Stage


class RecordWeights(Callback):
    """Raw weights after every optimizer step (between the optimizer, 41, and the EMA, 43)."""

    def __init__(self, store: list) -> None:
        super().__init__(order=42)
        self.store = store

    def on_batch_end(self, runner) -> None:
        if runner.is_train_loader:
            self.store.append({k: v.detach().clone() for k, v in runner.model.state_dict().items()})


class RecordStart(Callback):
    def __init__(self, store: dict) -> None:
        super().__init__(order=199)
        self.store = store

    def on_experiment_start(self, runner) -> None:
        self.store[runner.stage.name] = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}


def fit(stages, logdir, callbacks=None, **kwargs):
    model = TinyNet()
    runner = StagedRunner().fit(model, stages, tiny_loaders(8), nn.CrossEntropyLoss(), logdir, verbose=False,
                                engine="cpu", callbacks=callbacks, **kwargs)
    return model, runner


def test_ema_weights_follow_the_formula_and_are_what_is_validated_and_saved(tmp_path):
    decay, raw = 0.8, []
    model, runner = fit([Stage("s", 1, lr=0.05, optimizer="sgd", ema=decay)], tmp_path,
                        callbacks=lambda s: [RecordWeights(raw)])
    assert len(raw) == 6  # 48 samples / 8
    expected = {k: v.clone() for k, v in raw[0].items()}  # timm: the first update copies the weights
    for weights in raw[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    last = load_checkpoint(tmp_path / "checkpoints" / "s" / "last.pth")
    for key in expected:
        torch.testing.assert_close(last["model_ema"][key], expected[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(last["model"][key], raw[-1][key])  # the raw weights beside the EMA
    assert last["ema"]["updates"] == 6 and last["weights"] == "ema"
    assert not torch.equal(last["model_ema"]["fc.weight"], raw[-1]["fc.weight"])
    best = load_checkpoint(tmp_path / "best.pth")["model"]
    assert torch.equal(best["fc.weight"], last["model_ema"]["fc.weight"])  # the root best.pth: the kept weights
    check = TinyNet()
    check.load_state_dict(expected)
    valid = evaluate(check, tiny_loaders(8)["valid"], nn.CrossEntropyLoss())
    assert runner.history[-1]["valid/loss"] == pytest.approx(valid["loss"], rel=1e-5)


def test_validate_both_logs_raw_and_ema(tmp_path):
    raw = []
    ema = {"decay": 0.5, "validate": "both"}
    _, runner = fit([Stage("a", 1, lr=0.05, optimizer="sgd", ema=ema)], tmp_path,
                    callbacks=lambda s: [RecordWeights(raw)])
    row = runner.history[0]
    assert "valid_raw/loss" in row and row["valid_raw/loss"] != row["valid/loss"]
    check = TinyNet()
    check.load_state_dict(raw[5])  # the raw weights after the epoch's last step
    assert row["valid_raw/loss"] == pytest.approx(evaluate(check, tiny_loaders(8)["valid"], nn.CrossEntropyLoss())["loss"], rel=1e-5)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["stages"][0]["ema"] == ema


def test_validate_both_keeps_the_raw_weights_when_they_validate_better(tmp_path):
    # A decay this close to 1 leaves the EMA at its first copy (the weights after step 1), while the
    # raw weights go on learning for 5 more steps: raw validates better and is what the stage keeps.
    starts, raw = {}, []
    ema = {"decay": 0.999999, "validate": "both"}
    stages = [Stage("a", 1, lr=0.05, optimizer="sgd", ema=ema), Stage("b", 1, lr=0.01, ema=ema)]
    _, runner = fit(stages, tmp_path, callbacks=lambda s: [RecordStart(starts), RecordWeights(raw)])
    row = runner.history[0]
    assert row["valid_raw/loss"] < row["valid/loss"]
    best = load_checkpoint(tmp_path / "checkpoints" / "a" / "best.pth")
    assert best["weights"] == "raw"
    for key, value in best["model"].items():
        assert torch.equal(value, raw[5][key]), key
        assert torch.equal(starts["b"][key], value), key
    assert not torch.equal(best["model_ema"]["fc.weight"], raw[5]["fc.weight"])  # the EMA itself goes on
    # The run's best is stage b's raw weights too; metrics.json reports their validation, not the EMA's.
    last = runner.history[1]
    assert last["valid_raw/loss"] < min(last["valid/loss"], row["valid_raw/loss"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert load_checkpoint(tmp_path / "best.pth")["weights"] == metrics["weights"] == "raw"
    assert metrics["best"]["score"] == metrics["valid"]["loss"] == last["valid_raw/loss"]


@pytest.mark.parametrize("minimize,kept", [(True, "ema"), (False, "raw")])
def test_validate_both_keeps_the_ema_when_it_validates_better_in_the_metrics_direction(tmp_path, minimize, kept):
    # Epoch 2 of this run: EMA loss 0.64, raw loss 1.37. Minimising, the EMA is the better one; asked to
    # maximise the loss, the raw weights are.
    starts, raw = {}, []
    ema = {"decay": 0.5, "validate": "both"}
    stages = [Stage("a", 2, lr=0.05, optimizer="sgd", ema=ema), Stage("b", 1, lr=0.01, ema=ema)]
    _, runner = fit(stages, tmp_path, callbacks=lambda s: [RecordStart(starts), RecordWeights(raw)],
                    minimize_valid_metric=minimize)
    row = runner.history[1]
    assert row["valid/loss"] < row["valid_raw/loss"]
    best = load_checkpoint(tmp_path / "checkpoints" / "a" / "best.pth")
    assert (best["epoch"], best["weights"]) == (2, kept)
    expected = best["model_ema"] if kept == "ema" else raw[11]
    kept_weights = state_dict_of(best)
    for key, value in kept_weights.items():
        assert torch.equal(value, expected[key]), key
        assert torch.equal(starts["b"][key], value), key
    assert all(torch.equal(best["model"][k], raw[11][k]) for k in best["model"])  # raw weights always under model
    if kept == "ema":
        assert not torch.equal(kept_weights["fc.weight"], raw[11]["fc.weight"])


def test_without_validate_both_the_ema_is_kept(tmp_path):
    starts = {}
    stages = [Stage("a", 1, lr=0.05, optimizer="sgd", ema=0.999999), Stage("b", 1, lr=0.01)]
    fit(stages, tmp_path, callbacks=lambda s: [RecordStart(starts)])
    best = load_checkpoint(tmp_path / "checkpoints" / "a" / "best.pth")
    assert best["weights"] == "ema"
    assert all(torch.equal(state_dict_of(best)[k], best["model_ema"][k]) for k in best["model"])
    assert all(torch.equal(starts["b"][k], v) for k, v in best["model_ema"].items())
    assert load_checkpoint(tmp_path / "checkpoints" / "b" / "best.pth")["weights"] == "raw"


def test_resume_restores_the_ema_exactly(tmp_path):
    stages = [Stage("s", 3, lr=0.05, optimizer="sgd", ema={"decay": 0.7, "use_warmup": True})]
    full, _ = fit(stages, tmp_path / "full")
    with pytest.raises(Interrupt):
        fit(stages, tmp_path / "cut", callbacks=lambda s: [StopAtEpoch(3)])
    resumed, _ = fit(stages, tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "s" / "last.pth")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "s" / "last.pth")
    assert a["ema"]["updates"] == b["ema"]["updates"] == 18
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["model_ema"][key], b["model_ema"][key]), key


def test_bad_ema_options_fail_at_stage_creation():
    with pytest.raises(ValueError, match=r"unknown ema keys \['decai'\]"):
        Stage("s", 1, ema={"decai": 0.9})
    with pytest.raises(ValueError, match="ema decay must be in"):
        Stage("s", 1, ema=1.5)
    with pytest.raises(ValueError, match="validate must be 'ema' or 'both'"):
        Stage("s", 1, ema={"validate": "raw"})
