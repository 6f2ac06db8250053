"""LossRangeCallback: exact selection on known losses, gradients, the (0, 1) identity, validation untouched."""
from __future__ import annotations

import csv
import math
from types import SimpleNamespace
from typing import Any, Dict, Optional

import pytest
import torch
from torch import nn

from cvkit.callbacks.loss_range import LossRangeCallback, rank_masks
from cvkit.callbacks.state import RunState
from conftest import tiny_loaders


class GivenLoss(nn.Module):
    """A criterion whose per-sample losses are the outputs themselves, so tests choose them."""

    returns_per_sample = True

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs if self.reduction == "none" else outputs.mean()


class Engine:
    num_processes = 1
    process_index = 0

    @staticmethod
    def mean_reduce_ddp_metrics(metrics: Dict[str, float]) -> Dict[str, float]:
        return metrics


def stub_runner(criterion: nn.Module, epoch: int = 1, stage_start_epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        criterion=criterion, engine=Engine(), epoch_step=epoch, run_state=RunState(stage_start_epoch=stage_start_epoch),
        is_train_loader=True, is_valid_loader=False, is_infer_loader=False,
        batch={}, batch_size=0, batch_metrics={}, loader_metrics={},
    )


def run_batch(callback: LossRangeCallback, runner: SimpleNamespace, losses: torch.Tensor,
              index: Optional[torch.Tensor] = None) -> torch.Tensor:
    runner.batch = {"logits": losses, "targets": torch.zeros(len(losses))}
    if index is not None:
        runner.batch["index"] = index
    runner.batch_size = len(losses)
    runner.batch_metrics = {}
    callback.on_batch_end(runner)
    return runner.batch_metrics["loss"]


def kept_values(callback: LossRangeCallback, losses: torch.Tensor) -> set:
    keep, _ = callback.select(losses)
    return set(losses[keep].tolist())


LOSSES = torch.tensor([3.0, 9.0, 0.0, 7.0, 5.0, 1.0, 8.0, 2.0, 6.0, 4.0])  # one of each 0..9


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(band=(0.1, 0.4)), {8.0, 7.0, 6.0}),  # drop the top 1, keep ranks 1..3
        (dict(band=(0.0, 1.0)), set(range(10))),
        (dict(band=(0.2, 0.5)), {7.0, 6.0, 5.0}),
        (dict(hardest_k=3), {9.0, 8.0, 7.0}),
        (dict(hardest_k=50), set(range(10))),
        (dict(drop_top=0.3), {6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0}),
        (dict(band=(0.0, 0.01)), {9.0}),  # rounds to 0 samples -> min_keep=1
        (dict(band=(0.0, 0.01), min_keep=3), {9.0, 8.0, 7.0}),
        (dict(band=(0.98, 1.0), min_keep=2), {1.0, 0.0}),  # widened upwards at the bottom
    ],
)
def test_exactly_the_expected_samples_are_kept(options: Dict[str, Any], expected: set) -> None:
    assert kept_values(LossRangeCallback(**options), LOSSES) == {float(v) for v in expected}


def test_batch_loss_is_the_mean_over_the_band_and_top_is_reported() -> None:
    callback = LossRangeCallback(band=(0.1, 0.4), logdir=None)
    runner = stub_runner(GivenLoss())
    callback.on_experiment_start(runner)
    callback.on_loader_start(runner)
    loss = run_batch(callback, runner, LOSSES.clone(), index=torch.arange(10) + 100)
    assert loss.item() == pytest.approx(7.0)
    run_batch(callback, runner, torch.tensor([1.0, 2.0, 30.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]), index=torch.arange(10) + 100)
    callback.on_loader_end(runner)
    m = runner.loader_metrics
    assert m["loss"] == pytest.approx((7.0 + 9.0) / 2)
    assert m["loss_range/kept_fraction"] == pytest.approx(0.3)
    assert m["loss_range/dropped_top_mean"] == pytest.approx((9.0 + 30.0) / 2)
    assert m["loss_range/edge_high"] == pytest.approx((8.0 + 10.0) / 2)
    assert m["loss_range/edge_low"] == pytest.approx((6.0 + 8.0) / 2)
    assert m["loss_range/loss_all"] == pytest.approx((45.0 + 82.0) / 20)
    assert callback.most_dropped() == [(101, 1, 2, 9.0), (102, 1, 2, 30.0)]


def test_running_quantile_thresholds() -> None:
    callback = LossRangeCallback(drop_top=0.1, quantile_window=100)
    batch = torch.tensor([50.0, 95.0, 10.0, 89.0, 90.0])
    assert kept_values(callback, batch) == {50.0, 10.0, 89.0, 90.0}  # buffer not full: batch ranks
    callback._remember(torch.arange(100.0))  # 0.9-quantile = 89.1
    assert kept_values(callback, batch) == {50.0, 10.0, 89.0}
    above = torch.tensor([95.0, 99.0, 96.0, 97.0, 98.0])  # none under the threshold: batch ranks again
    assert kept_values(callback, above) == {95.0, 96.0, 97.0, 98.0}
    callback._remember(torch.full((60,), 1000.0))  # ring buffer: the newest 100 values count
    assert kept_values(callback, batch) == set(batch.tolist())


def test_warmup_counts_epochs_of_the_stage() -> None:
    callback = LossRangeCallback(hardest_k=2, warmup_epochs=1)
    assert callback.in_warmup(stub_runner(GivenLoss(), epoch=1))
    assert not callback.in_warmup(stub_runner(GivenLoss(), epoch=2))
    runner = stub_runner(GivenLoss(), epoch=4, stage_start_epoch=3)
    callback.on_experiment_start(runner)
    callback.on_loader_start(runner)
    assert run_batch(callback, runner, LOSSES.clone()).item() == pytest.approx(4.5)
    callback.on_loader_end(runner)
    assert runner.loader_metrics["loss_range/kept_fraction"] == 1.0
    assert math.isnan(runner.loader_metrics["loss_range/dropped_top_mean"])


def test_a_nan_loss_is_not_hidden_by_the_band() -> None:
    callback = LossRangeCallback(band=(0.2, 1.0))
    runner = stub_runner(GivenLoss())
    callback.on_experiment_start(runner)
    callback.on_loader_start(runner)
    assert torch.isnan(run_batch(callback, runner, torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0])))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(band=(0.5, 0.3)), "lo=0.5, hi=0.3"),
        (dict(band=(0.1, 1.5)), "hi=1.5"),
        (dict(band=(0.1,)), "two fractions"),
        (dict(), "exactly one"),
        (dict(band=(0.0, 0.5), hardest_k=3), "exactly one"),
        (dict(hardest_k=0), "hardest_k"),
        (dict(drop_top=1.0), "drop_top"),
        (dict(hardest_k=3, quantile_window=64), "quantile_window"),
        (dict(band=(0.0, 0.5), min_keep=0), "min_keep"),
        (dict(band=(0.0, 0.5), warmup_epochs=-1), "warmup_epochs"),
    ],
)
def test_bad_arguments_say_what_is_wrong(options: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LossRangeCallback(**options)


def test_criterion_without_reduction_fails_at_start() -> None:
    callback = LossRangeCallback(band=(0.0, 0.5))
    with pytest.raises(TypeError, match="reduction"):
        callback.on_experiment_start(stub_runner(lambda o, t: o.mean()))


def _train_step(options: Optional[Dict[str, Any]]) -> tuple:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x = torch.randn(8, 3, 2, 2, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    criterion = nn.CrossEntropyLoss()
    logits = model(x)
    if options is None:
        loss = criterion(logits, y)
    else:
        callback = LossRangeCallback(**options)
        runner = stub_runner(criterion)
        callback.on_experiment_start(runner)
        callback.on_loader_start(runner)
        runner.batch, runner.batch_size = {"logits": logits, "targets": y}, 8
        callback.on_batch_end(runner)
        loss = runner.batch_metrics["loss"]
    loss.backward()
    per_sample = nn.CrossEntropyLoss(reduction="none")(logits.detach(), y)
    return loss.detach(), x.grad, model[1].weight.grad, per_sample


def test_dropped_inputs_get_no_gradient() -> None:
    _, x_grad, _, per_sample = _train_step(dict(band=(0.25, 0.75)))
    order = per_sample.argsort(descending=True)
    kept, dropped = order[2:6], torch.cat([order[:2], order[6:]])
    assert (x_grad[dropped] == 0).all()
    assert (x_grad[kept].flatten(1).abs().sum(1) > 0).all()


def test_full_band_equals_the_plain_criterion() -> None:
    plain_loss, plain_x, plain_w, _ = _train_step(None)
    band_loss, band_x, band_w, _ = _train_step(dict(band=(0.0, 1.0)))
    assert torch.allclose(plain_loss, band_loss, atol=1e-6)
    assert torch.allclose(plain_x, band_x, atol=1e-7)
    assert torch.allclose(plain_w, band_w, atol=1e-7)


def test_end_to_end_validation_is_over_all_samples(tmp_path) -> None:
    from catalyst import dl

    torch.manual_seed(0)
    loaders = tiny_loaders(batch_size=8, n_train=32, n_valid=24)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    criterion = nn.CrossEntropyLoss()
    band = LossRangeCallback(band=(0.125, 0.5), logdir=tmp_path / "lr")
    runner = dl.SupervisedRunner(input_key="features", output_key="logits", target_key="targets", loss_key="loss")
    runner.train(
        model=model, criterion=criterion, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loaders=loaders, num_epochs=2, engine=dl.CPUEngine(), verbose=False, logdir=None,
        callbacks=[band, dl.BackwardCallback(metric_key="loss"), dl.OptimizerCallback(metric_key="loss")],
    )
    train, valid = runner.epoch_metrics["train"], runner.epoch_metrics["valid"]
    assert train["loss_range/kept_fraction"] == pytest.approx(0.375)  # 3 of 8 per batch
    assert train["loss"] != pytest.approx(train["loss_range/loss_all"])
    assert not any(key.startswith("loss_range/") for key in valid)
    model.eval()
    with torch.no_grad():
        expected = sum(criterion(model(b["features"]), b["targets"]).item() * len(b["targets"]) for b in loaders["valid"]) / 24
    assert valid["loss"] == pytest.approx(expected, rel=1e-5)
    with open(tmp_path / "lr" / "dropped_top.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0 <= int(r["index"]) < 32 and int(r["times_seen"]) == 2 for r in rows)
    assert sum(int(r["times_dropped_top"]) for r in rows) == 2 * 4  # one per batch, 4 batches per epoch
