"""StagedRunner: freezing, BatchNorm policy, per-group LR, schedulers, stage hand-over, logs."""
from __future__ import annotations

import json
from typing import Dict, List

import pytest
import torch
from catalyst.core.callback import Callback, CallbackOrder
from conftest import tiny_loaders
from torch import nn

from cvkit.io import load_checkpoint
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.models.groups import bn_modules, head_param_names
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model, stages, logdir, callbacks=None, **kwargs):
    kwargs.setdefault("metrics", lambda: [ClassificationMetrics(3)])
    return StagedRunner().fit(
        model, stages, kwargs.pop("loaders", None) or tiny_loaders(), nn.CrossEntropyLoss(), logdir,
        callbacks=callbacks, verbose=False, **kwargs,
    )


def bn_buffer_keys(model: nn.Module) -> List[str]:
    return [f"{name}.{b}" for name in bn_modules(model) for b in ("running_mean", "running_var")]


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_head_stage_freezes_backbone_and_its_batchnorm(arch, tmp_path):
    model = create_model(arch, 3)
    before = snapshot(model)
    fit(model, [Stage("head", 2, trainable="head", lr=0.05, optimizer="sgd")], tmp_path)
    after = snapshot(model)
    heads = {k for k in before if any(k.startswith(h) for h in {n.rsplit(".", 1)[0] for n in head_param_names(model)})}
    backbone = [k for k in before if k not in heads]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone), "a frozen tensor moved"
    assert any(not torch.equal(before[k], after[k]) for k in heads), "the head did not learn"
    assert all(torch.equal(before[k], after[k]) for k in bn_buffer_keys(model))


@pytest.mark.parametrize("train_bn", [True, False])
def test_full_stage_batchnorm_policy(train_bn, tmp_path):
    model = create_model("test_resnet", 3)
    # a random head: the zero-started one sends no gradient into the backbone on the first of these 3 steps
    nn.init.normal_(model.get_classifier().weight, std=0.1)
    before = snapshot(model)
    fit(model, [Stage("full", 1, trainable="all", train_bn=train_bn, lr=0.05, optimizer="sgd")], tmp_path)
    after = snapshot(model)
    bn_keys = bn_buffer_keys(model) + [f"{n}.{p}" for n in bn_modules(model) for p in ("weight", "bias")]
    conv_keys = [k for k, v in before.items() if "conv" in k and v.ndim == 4]
    assert conv_keys and any(not torch.equal(before[k], after[k]) for k in conv_keys)
    moved = [k for k in bn_keys if not torch.equal(before[k], after[k])]
    if train_bn:
        assert len(moved) == len(bn_keys), "every BN statistic and affine parameter should train"
    else:
        assert moved == [], f"frozen BN changed: {moved[:3]}"


def test_unfreeze_from_block_trains_only_that_block_onwards(tmp_path):
    model = create_model("test_resnet", 3)
    before = snapshot(model)
    fit(model, [Stage("top", 1, trainable="layer3", lr=0.05, optimizer="sgd", train_bn=True)], tmp_path)
    after = snapshot(model)
    frozen = [k for k in before if k.startswith(("conv1", "bn1", "layer1", "layer2"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen), "a tensor before layer3 moved"
    for prefix in ("layer3", "layer4", "fc"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])


class RecordLR(Callback):
    """Record each named group's LR at every train batch start and at the first loader start."""

    def __init__(self) -> None:
        super().__init__(order=CallbackOrder.Internal + 1)
        self.at_start: Dict[str, float] = {}
        self.per_batch: List[float] = []

    def on_loader_start(self, runner) -> None:
        if runner.is_train_loader and not self.at_start:
            self.at_start = {g["name"]: g["lr"] for g in runner.optimizer.param_groups}

    def on_batch_start(self, runner) -> None:
        if runner.is_train_loader:
            self.per_batch.append(runner.optimizer.param_groups[0]["lr"])


class ConstantMetric(Callback):
    """Write ``valid/flat`` = a constant, or values from a list by epoch, before checkpoints read it."""

    def __init__(self, values=None) -> None:
        super().__init__(order=CallbackOrder.Metric + 5)
        self.values = values

    def on_loader_end(self, runner) -> None:
        if runner.loader_key == "valid":
            i = runner.epoch_step - runner.stage_start_epoch - 1
            runner.loader_metrics["flat"] = 1.0 if self.values is None else self.values[i]


def test_group_lrs_equal_stage_spec_and_are_logged(tmp_path):
    model = create_model("test_resnet", 3)
    record = RecordLR()
    lr = {"head": 0.01, "backbone": 0.001, "layer4": 0.005}
    fit(model, [Stage("s", 2, trainable="all", lr=lr, optimizer="adamw", weight_decay=0.01)], tmp_path,
        callbacks=lambda s: [record])
    assert record.at_start == lr
    import pandas as pd

    log = pd.read_csv(tmp_path / "log.csv")
    for group, value in lr.items():
        assert log[f"lr/{group}"].tolist() == [value, value]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard" / "_epoch_"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lr/head/epoch", "lr/backbone/epoch", "lr/layer4/epoch"} <= tags
    assert [e.value for e in events.Scalars("lr/layer4/epoch")] == pytest.approx([0.005, 0.005])


def test_layer_decay_lowers_lr_with_depth(tmp_path):
    model = create_model("test_efficientnet", 3)
    record = RecordLR()
    fit(model, [Stage("s", 1, lr={"head": 0.1}, layer_decay=0.5)], tmp_path, callbacks=lambda s: [record])
    levels = sorted((k, v) for k, v in record.at_start.items() if k.startswith("backbone."))
    assert record.at_start["head"] == 0.1
    values = [v for _, v in levels]
    assert values == sorted(values) and values[-1] == pytest.approx(0.1) and values[0] < 0.01


SCHEDULES = {
    "step": dict(scheduler="step", scheduler_kwargs=dict(step_size=1, gamma=0.5)),
    "cosine": dict(scheduler="cosine"),
    "cosine_batch": dict(scheduler="cosine", interval="batch"),
    "onecycle": dict(scheduler="onecycle"),
    "plateau": dict(scheduler="plateau", scheduler_kwargs=dict(factor=0.5, patience=0), monitor=("valid", "flat")),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_every_scheduler_really_steps(kind, tmp_path):
    """Catalyst 22.04 on torch 2 silently never steps most schedulers; cvkit must."""
    stage = Stage("s", 3, lr=0.1, optimizer="sgd", **SCHEDULES[kind])
    record = RecordLR()
    fit(create_model("test_resnet", 3), [stage], tmp_path, callbacks=lambda s: [record, ConstantMetric()])
    steps = 3  # 48 samples / batch 16
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = stage.build_scheduler(opt, steps, minimize=True)
    expected = []
    for _epoch in range(3):
        for _ in range(steps):
            expected.append(opt.param_groups[0]["lr"])
            if stage.interval == "batch":
                sched.step()
        if stage.interval == "epoch":
            sched.step(1.0) if kind == "plateau" else sched.step()
    assert record.per_batch == pytest.approx(expected)
    assert len(set(round(v, 12) for v in record.per_batch)) > 1, "the LR never changed"


def test_next_stage_starts_from_best_not_last(tmp_path):
    model = create_model("test_resnet", 3)
    start_of_two = {}

    class Grab(Callback):
        def __init__(self):
            super().__init__(order=CallbackOrder.Internal + 2)

        def on_experiment_start(self, runner):
            if runner.stage.name == "two":
                start_of_two.update(snapshot(runner.model))

    fit(model, [Stage("one", 3, trainable="all", lr=0.05, optimizer="sgd"), Stage("two", 1, lr=0.01)], tmp_path,
        callbacks=lambda s: [ConstantMetric([0.9, 0.1, 0.2] if s.name == "one" else [0.5]), Grab()],
        valid_metric="flat", minimize_valid_metric=False)
    best = load_checkpoint(tmp_path / "checkpoints" / "one" / "best.pth")
    last = load_checkpoint(tmp_path / "checkpoints" / "one" / "last.pth")
    assert best["epoch"] == 1 and last["epoch"] == 3
    assert all(torch.equal(start_of_two[k], best["model"][k]) for k in best["model"])
    assert any(not torch.equal(start_of_two[k], last["model"][k]) for k in last["model"])


def test_timeline_files_and_global_epochs(tmp_path):
    model = create_model("test_resnet", 3)
    runner = fit(model, [Stage("a", 2, trainable="head", lr=0.01), Stage("b", 2, lr=0.001)], tmp_path,
                 valid_metric="accuracy", minimize_valid_metric=False, test_loader=tiny_loaders()["valid"])
    assert [r["epoch"] for r in runner.history] == [1, 2, 3, 4]
    assert [r["stage"] for r in runner.history] == ["a", "a", "b", "b"]
    for name in ("config.json", "log.csv", "metrics.json", "progress.png", "best.pth"):
        assert (tmp_path / name).stat().st_size > 0, name
    config = json.loads((tmp_path / "config.json").read_text())
    assert [s["name"] for s in config["stages"]] == ["a", "b"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["epoch"] == metrics["best"]["epoch"]
    assert metrics["valid"]["accuracy"] == pytest.approx(max(r["valid/accuracy"] for r in runner.history))
    assert metrics["test"]["accuracy"] == pytest.approx(metrics["valid"]["accuracy"])  # same loader here


def test_unknown_block_lists_valid_names_before_training(tmp_path):
    model = create_model("test_resnet", 3)
    with pytest.raises(KeyError) as err:
        fit(model, [Stage("head", 1, trainable="head"), Stage("ft", 1, trainable="layer9")], tmp_path)
    message = str(err.value)
    assert "layer9" in message and "layer3" in message and "'ft'" in message
    assert not (tmp_path / "checkpoints").exists()


def test_bad_stage_specs_raise_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="adamw"):
        Stage("s", 1, optimizer="adamx")
    with pytest.raises(KeyError, match="cosine"):
        Stage("s", 1, scheduler="cosin")
    with pytest.raises(ValueError, match="epochs"):
        Stage("s", 0)
    with pytest.raises(ValueError, match="learning rate"):
        Stage("s", 1, lr={"head": -1.0})
    with pytest.raises(KeyError, match="patience"):
        Stage("s", 1, early_stopping={"patiense": 2})
    model = create_model("test_resnet", 3)
    with pytest.raises(KeyError, match="did you mean"):
        StagedRunner().fit(model, [Stage("s", 1, lr={"layer5": 0.1})], tiny_loaders(), nn.CrossEntropyLoss(),
                           tmp_path / "run", verbose=False)
    assert not (tmp_path / "run").exists()


def test_early_stopping_ends_stage_and_next_stage_continues_epochs(tmp_path):
    model = create_model("test_resnet", 3)
    runner = fit(model, [Stage("a", 6, lr=0.01, early_stopping=dict(patience=1, metric="flat", minimize=False)),
                         Stage("b", 1, lr=0.01)], tmp_path, callbacks=lambda s: [ConstantMetric()])
    assert [r["stage"] for r in runner.history] == ["a", "a", "b"]
    assert [r["epoch"] for r in runner.history] == [1, 2, 3]


class ConstantLoss(nn.Module):
    """A loss that never improves (value 1.0, gradient zero)."""

    def forward(self, logits, targets):
        return logits.sum() * 0.0 + 1.0


def test_plateau_batch_counts_patience_in_batches(tmp_path):
    record = RecordLR()
    stage = Stage("s", 3, lr=0.1, optimizer="sgd", scheduler="plateau_batch",
                  scheduler_kwargs=dict(patience=2, factor=0.5, smoothing=0.0))
    StagedRunner().fit(create_model("test_resnet", 3), [stage], tiny_loaders(), ConstantLoss(), tmp_path,
                       callbacks=lambda s: [record], verbose=False)
    # 3 batches per epoch; the loss stalls from batch 1, so the LR halves after batches 4 and 7.
    assert record.per_batch == pytest.approx([0.1] * 4 + [0.05] * 3 + [0.025] * 2)
    with pytest.raises(ValueError, match="plateau_batch"):
        Stage("s", 1, scheduler="plateau", interval="batch")


def test_stage_loss_range_keeps_the_band_and_validation_sees_all(tmp_path):
    runner = fit(create_model("test_resnet", 3), [Stage("s", 2, lr=0.01, loss_range={"band": (0.25, 0.75)})],
                 tmp_path)
    import pandas as pd

    log = pd.read_csv(tmp_path / "log.csv")
    assert log["train/loss_range/kept_fraction"].tolist() == pytest.approx([0.5, 0.5])
    assert "valid/loss_range/kept_fraction" not in log
    assert (tmp_path / "loss_range" / "s" / "dropped_top.csv").is_file()
    assert runner.history[-1]["valid/loss"] > 0
    with pytest.raises(ValueError, match="stage 'bad': loss_range"):
        Stage("bad", 1, loss_range=(0.5, 0.3))


def test_early_stopping_on_another_metric_takes_that_metrics_direction(tmp_path):
    # the run maximises accuracy; early stopping watching the valid loss must still minimise it
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    stage = Stage("head", 4, trainable="head", lr=0.05, optimizer="sgd", early_stopping={"patience": 4, "metric": "loss"})
    runner = StagedRunner().fit(model, [stage], tiny_loaders(), nn.CrossEntropyLoss(), tmp_path, verbose=False,
                                metrics=lambda: [ClassificationMetrics(3)], valid_metric="accuracy")
    assert runner.run_state.minimize is False
    watched = load_checkpoint(tmp_path / "checkpoints" / "resume.pth")["early_stopping"]["best_score"]
    losses = [row["valid/loss"] for row in runner.history]
    assert watched == pytest.approx(min(losses)) and min(losses) < max(losses)


def test_the_valid_metrics_direction_comes_from_the_metric(tmp_path):
    from cvkit.runners import _minimized

    assert _minimized("accuracy", lambda: [ClassificationMetrics(3)]) is False
    assert _minimized("loss", None) is True
    with pytest.raises(ValueError, match="no metrics= produce it"):
        _minimized("accuracy", None)
