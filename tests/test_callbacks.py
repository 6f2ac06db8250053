"""Callback wiring (distinct orders, keys read only after written), the shared RunState, plateau direction."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch
from catalyst.core.callback import Callback, CallbackOrder
from conftest import tiny_loaders
from torch import nn

from cvkit.callbacks import BatchPlateauCallback, RunState, check_callbacks, plateau_mode
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage

PROVIDED = ("features", "targets", "logits")


class Stub(Callback):
    def __init__(self, order: int, reads=(), writes=()) -> None:
        super().__init__(order=order)
        self.reads, self.writes = tuple(reads), tuple(writes)


# Wiring checks on stubs -----------------------------------------------------------------------

def test_two_callbacks_with_one_order_fail_naming_both():
    callbacks = {"first": Stub(10), "other": Stub(20), "second": Stub(10)}
    with pytest.raises(ValueError, match=r"^stage 's': callbacks 'first' \(Stub\) and 'second' \(Stub\) share order 10;"):
        check_callbacks(callbacks, PROVIDED, "stage 's': ")
    check_callbacks({"first": Stub(10), "second": Stub(11)}, PROVIDED)


def test_a_key_read_before_anything_writes_it_fails_with_what_is_written():
    reader, writer = Stub(5, reads=["loss"]), Stub(11, reads=["logits", "targets"], writes=["loss"])
    message = "callback 'reader' (Stub) reads 'loss' but nothing writes it (written: ['features', 'targets', 'logits'])"
    with pytest.raises(ValueError) as err:
        check_callbacks({"writer": writer, "reader": reader}, PROVIDED)
    assert str(err.value) == message
    check_callbacks({"writer": writer, "reader": Stub(12, reads=["loss"])}, PROVIDED)  # read after the write
    with pytest.raises(ValueError, match="reads 'embeddings'"):
        check_callbacks({"reader": Stub(1, reads=["embeddings"])}, PROVIDED)


def fit(tmp_path, stages, callbacks=None, criterion=None, **kwargs):
    kwargs.setdefault("metrics", lambda: [ClassificationMetrics(3)])
    return StagedRunner().fit(create_model("test_resnet", 3), stages, tiny_loaders(), criterion or nn.CrossEntropyLoss(),
                              tmp_path, callbacks=callbacks, verbose=kwargs.pop("verbose", False), **kwargs)


class Orders(Callback):
    """Records the order of every callback of the running stage."""

    def __init__(self) -> None:
        super().__init__(order=CallbackOrder.Internal + 1)
        self.orders: Dict[str, int] = {}

    def on_experiment_start(self, runner) -> None:
        self.orders = {name: int(cb.order) for name, cb in runner.callbacks.items()}


def test_every_builtin_callback_has_its_own_order(tmp_path, monkeypatch):
    monkeypatch.setattr("cvkit.stage_callbacks.progress_bars_wanted", lambda *args: True)  # as on a terminal
    record = Orders()
    stage = Stage("s", 1, lr=0.01, scheduler="plateau", early_stopping=dict(patience=2))
    fit(tmp_path, [stage], callbacks=lambda s: [record], verbose=True)
    assert {"criterion", "backward", "optimizer", "scheduler", "early_stopping", "progress", "console",
            "checkpoint"} <= set(record.orders)
    assert len(set(record.orders.values())) == len(record.orders), record.orders
    assert list(record.orders.values()) == sorted(record.orders.values())


def test_runner_refuses_bad_wiring_before_the_first_batch(tmp_path):
    with pytest.raises(ValueError, match=r"stage 's': callbacks 'checkpoint' \(StageCheckpointCallback\) and "
                                         r"'extra_0_Stub' \(Stub\) share order 120"):
        fit(tmp_path / "orders", [Stage("s", 1)], callbacks=lambda s: [Stub(CallbackOrder.External + 20)])
    with pytest.raises(ValueError, match=r"stage 's': callback 'extra_0_Stub' \(Stub\) reads 'boxes' but nothing "
                                         r"writes it \(written: \['features', 'targets', 'logits', 'loss'\]\)"):
        fit(tmp_path / "keys", [Stage("s", 1)], callbacks=lambda s: [Stub(15, reads=["boxes"])])
    assert not (tmp_path / "orders" / "log.csv").exists() and not (tmp_path / "keys" / "log.csv").exists()


# RunState -------------------------------------------------------------------------------------

@pytest.mark.parametrize("minimize,scores,best", [(True, [3.0, 1.0, 2.0], 1.0), (False, [1.0, 3.0, 2.0], 3.0)])
def test_run_state_keeps_the_best_in_the_run_direction_and_never_nan(minimize, scores, best):
    state = RunState(minimize=minimize)
    state.start_stage(Stage("s", 1), 0)
    for epoch, score in enumerate(scores + [float("nan")], 1):
        state.offer_best(f"e{epoch}.pth", score, epoch)
    assert state.best == {"stage": "s", "epoch": scores.index(best) + 1, "score": best, "path": f"e{scores.index(best) + 1}.pth"}


def test_runner_views_are_the_run_state(tmp_path):
    runner = fit(tmp_path, [Stage("a", 1, lr=0.01), Stage("b", 1, lr=0.01)], valid_metric="accuracy",
                 minimize_valid_metric=False)
    state = runner.run_state
    assert runner.history is state.history and [r["stage"] for r in state.history] == ["a", "b"]
    assert runner.best == state.best and state.best["score"] == max(r["valid/accuracy"] for r in state.history)
    assert runner.stage.name == "b" and runner.stage_index == 1 and runner.stage_start_epoch == 2
    assert state.logdir == tmp_path


# Plateau direction ------------------------------------------------------------------------------

def test_plateau_mode_follows_the_monitored_metric():
    assert plateau_mode("loss", minimize_valid=False) == "min"
    assert plateau_mode("loss_range/loss_all", minimize_valid=False) == "min"
    assert plateau_mode("bce", minimize_valid=False, loss_key="bce") == "min"
    assert plateau_mode("accuracy", minimize_valid=False) == "max"
    assert plateau_mode("iou", minimize_valid=True) == "min"


class RecordLR(Callback):
    def __init__(self) -> None:
        super().__init__(order=CallbackOrder.Internal + 1)
        self.per_batch: List[float] = []

    def on_batch_start(self, runner) -> None:
        if runner.is_train_loader:
            self.per_batch.append(runner.optimizer.param_groups[0]["lr"])


class ValidLoss(Callback):
    """Replace the valid loss of epoch i (in the stage) by ``values[i]``, before the scheduler reads it."""

    def __init__(self, values: List[float]) -> None:
        super().__init__(order=CallbackOrder.Metric + 5)
        self.values = values

    def on_loader_end(self, runner) -> None:
        if runner.loader_key == "valid":
            runner.loader_metrics["loss"] = self.values[runner.epoch_step - runner.stage_start_epoch - 1]


@pytest.mark.parametrize("losses,halved", [([3.0, 2.0, 1.0], False), ([1.0, 2.0, 3.0], True)],
                         ids=["improving", "worsening"])
def test_plateau_on_valid_loss_of_a_maximising_run_cuts_lr_only_when_loss_worsens(tmp_path, losses, halved):
    record = RecordLR()
    stage = Stage("s", 3, lr=0.1, optimizer="sgd", scheduler="plateau", monitor=("valid", "loss"),
                  scheduler_kwargs=dict(patience=0, factor=0.5))
    fit(tmp_path, [stage], callbacks=lambda s: [record, ValidLoss(losses)], valid_metric="accuracy",
        minimize_valid_metric=False)
    # 3 train batches per epoch; a cut after epoch 2 shows in epoch 3.
    assert record.per_batch == pytest.approx([0.1] * 6 + [0.05 if halved else 0.1] * 3)


class ScriptedLoss(nn.Module):
    """Train loss ``start + step * call`` (zero gradient); validation loss constant."""

    def __init__(self, start: float, step: float) -> None:
        super().__init__()
        self.start, self.step, self.calls = start, step, 0

    def forward(self, logits, targets):
        if not logits.requires_grad:
            return logits.sum() * 0.0 + 1.0
        self.calls += 1
        return logits.sum() * 0.0 + self.start + self.step * self.calls


@pytest.mark.parametrize("step,halved", [(-0.5, False), (0.5, True)], ids=["improving", "worsening"])
def test_batch_plateau_of_a_maximising_run_cuts_lr_only_when_train_loss_worsens(tmp_path, step, halved):
    record = RecordLR()
    stage = Stage("s", 1, lr=0.1, optimizer="sgd", scheduler="plateau_batch",
                  scheduler_kwargs=dict(patience=0, factor=0.5, smoothing=0.0))
    fit(tmp_path, [stage], callbacks=lambda s: [record], criterion=ScriptedLoss(10.0, step),
        valid_metric="accuracy", minimize_valid_metric=False)
    assert record.per_batch == pytest.approx([0.1, 0.1, 0.05] if halved else [0.1] * 3)


def test_batch_plateau_refuses_a_scheduler_that_maximises_the_loss():
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), mode="max")
    runner = SimpleNamespace(run_state=RunState(minimize=False), scheduler=scheduler)
    with pytest.raises(ValueError, match=r"train 'loss' \(mode 'min'\) but the scheduler ReduceLROnPlateau has mode 'max'"):
        BatchPlateauCallback("loss").on_experiment_start(runner)
    scheduler.mode = "min"
    BatchPlateauCallback("loss").on_experiment_start(runner)
