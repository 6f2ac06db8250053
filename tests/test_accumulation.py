"""Gradient accumulation: k batches of n train like one batch of k*n; schedulers count optimizer steps."""
from __future__ import annotations

import pytest
import torch
from catalyst.core.callback import Callback
from conftest import TinyImages, tiny_loaders
from torch import nn
from torch.utils.data import DataLoader

from cvkit.runners import StagedRunner
from cvkit.stages import Stage


class TinyNet(nn.Module):
    """A convolution and a linear head, no BatchNorm and no dropout (batches do not interact)."""

    head_names = ("fc",)
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 4, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def loaders(batch_size: int, n: int = 64):
    return {"train": DataLoader(TinyImages(n, seed=0), batch_size=batch_size, shuffle=False),
            "valid": DataLoader(TinyImages(16, seed=1), batch_size=16)}


def train(stage: Stage, batch_size: int, logdir, n: int = 64) -> StagedRunner:
    model = TinyNet()
    runner = StagedRunner().fit(model, [stage], loaders(batch_size, n), nn.CrossEntropyLoss(), logdir,
                                verbose=False, engine="cpu")
    runner.trained = model
    return runner


def test_four_batches_of_8_equal_one_batch_of_32(tmp_path):
    kwargs = dict(trainable="all", lr=0.1, optimizer="sgd", epochs=1)
    big = train(Stage("s", **kwargs), 32, tmp_path / "big").trained.state_dict()
    small = train(Stage("s", accumulate=4, **kwargs), 8, tmp_path / "small").trained.state_dict()
    plain = train(Stage("s", **kwargs), 8, tmp_path / "plain").trained.state_dict()
    for key in big:
        torch.testing.assert_close(small[key], big[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(plain[k], big[k], atol=1e-4) for k in big), "accumulation made no difference"


def test_per_batch_scheduler_counts_optimizer_steps_and_last_window_is_shorter(tmp_path):
    # 48 samples in batches of 8 = 6 batches per epoch; windows of 4 -> 4 + 2 -> 2 optimizer steps.
    stage = Stage("s", 2, lr=0.01, optimizer="adamw", scheduler="onecycle", accumulate=4)
    runner = train(stage, 8, tmp_path, n=48)
    assert runner.scheduler.last_epoch == 4  # OneCycleLR raises past total_steps = 2 epochs x 2 steps
    steps = {int(s["step"]) for s in runner.optimizer.state.values()}
    assert steps == {4}
    reference = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=0.01, total_steps=4)
    for _ in range(4):
        reference.step()
        schedule.step()
    assert runner.history[-1]["lr/head"] == pytest.approx(reference.param_groups[0]["lr"])


def test_accumulate_is_checked_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="accumulate must be an int >= 1"):
        Stage("s", 1, accumulate=0)
    train(Stage("s", 1, accumulate=2), 16, tmp_path)
    import json

    assert json.loads((tmp_path / "config.json").read_text())["stages"][0]["accumulate"] == 2


def test_nan_skip_still_works_with_accumulation(tmp_path):
    class NaNOnce(nn.CrossEntropyLoss):
        calls = 0

        def forward(self, x, y):
            NaNOnce.calls += 1
            loss = super().forward(x, y)
            return loss * float("nan") if NaNOnce.calls == 2 else loss

    model = TinyNet()
    runner = StagedRunner().fit(model, [Stage("s", 1, accumulate=2, on_nan="skip", lr=0.01)], tiny_loaders(8),
                                NaNOnce(), tmp_path, verbose=False, engine="cpu")
    assert runner.history[-1]["train/nan_skipped_batches"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class RisingLoss(nn.Module):
    """Train loss k at the k-th train batch (never improves; gradient zero), 1.0 on validation."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not logits.requires_grad:
            return logits.sum() * 0.0 + 1.0
        self.calls += 1
        return logits.sum() * 0.0 + float(self.calls)


class RecordLR(Callback):
    """The LR after every train batch (after the scheduler, order 51)."""

    def __init__(self) -> None:
        super().__init__(order=60)
        self.per_batch: list = []

    def on_batch_end(self, runner) -> None:
        if runner.is_train_loader:
            self.per_batch.append(runner.optimizer.param_groups[0]["lr"])


def test_plateau_batch_patience_counts_optimizer_steps_under_accumulation(tmp_path):
    # 48 samples in batches of 4: 12 micro-batches and 3 optimizer steps (windows of 4) per epoch.
    # The loss never improves after step 1, so with patience 2 the LR halves after optimizer step 4
    # (micro-batch 16), not after micro-batch 4.
    record = RecordLR()
    stage = Stage("s", 2, lr=0.1, optimizer="sgd", scheduler="plateau_batch", accumulate=4,
                  scheduler_kwargs=dict(patience=2, factor=0.5, smoothing=0.0))
    runner = StagedRunner().fit(TinyNet(), [stage], loaders(4, 48), RisingLoss(), tmp_path,
                                callbacks=lambda s: [record], verbose=False, engine="cpu")
    assert record.per_batch == pytest.approx([0.1] * 15 + [0.05] * 9)
    # Each step is fed the mean loss of its 4 micro-batches: the last window held losses 21..24.
    assert runner.scheduler.smoothed == pytest.approx(22.5)
    assert runner.scheduler.num_bad_epochs == 2
