"""Mixup / CutMix through timm's Mixup: soft targets, same images as timm, refusal, loss band on mixed batches."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from catalyst.core.callback import Callback
from conftest import tiny_loaders
from test_accumulation import TinyNet
from timm.data import Mixup
from torch import nn

from cvkit.callbacks import MixupCallback
from cvkit.losses import per_sample_loss
from cvkit.runners import StagedRunner
from cvkit.stages import Stage

OPTIONS = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0, "label_smoothing": 0.1}


def stub_runner(x, y, train=True):
    model = TinyNet()
    return SimpleNamespace(is_train_loader=train, batch={"features": x, "targets": y}, model=model,
                           engine=SimpleNamespace(unwrap_model=lambda m: m))


@pytest.mark.parametrize("mode,batch", [("batch", 8), ("elem", 8), ("pair", 6), ("batch", 7)])
def test_callback_mixes_like_timm_and_targets_sum_to_one(mode, batch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 3, (batch,), generator=g)
    callback = MixupCallback({**OPTIONS, "mode": mode})
    runner = stub_runner(x.clone(), y)
    callback.on_experiment_start(runner)
    for seed in range(3):  # several draws: mixup and cutmix both happen
        np.random.seed(seed)
        runner.batch = {"features": x.clone(), "targets": y}
        callback.on_batch_start(runner)
        np.random.seed(seed)
        n = batch - batch % 2
        want_x, want_y = Mixup(**OPTIONS, mode=mode, num_classes=3)(x[:n].clone(), y[:n])
        got_x, got_y = runner.batch["features"], runner.batch["targets"]
        assert got_y.shape == (batch, 3)
        torch.testing.assert_close(got_y.sum(dim=1), torch.ones(batch))
        torch.testing.assert_close(got_x[:n], want_x)
        torch.testing.assert_close(got_y[:n], want_y)
        if n < batch:  # the odd one out stays itself, with a smoothed one-hot target
            assert torch.equal(got_x[n:], x[n:])
            assert got_y[-1].argmax() == y[-1] and got_y[-1].max() == pytest.approx(0.9 + 0.1 / 3)
        assert not torch.equal(got_x, x)


def test_valid_batches_are_untouched_and_non_class_targets_are_refused():
    callback = MixupCallback(OPTIONS, where="stage 'm': ")
    x = torch.randn(4, 3, 32, 32)
    runner = stub_runner(x.clone(), torch.tensor([0, 1, 2, 0]), train=False)
    callback.on_experiment_start(runner)
    callback.on_batch_start(runner)
    assert torch.equal(runner.batch["features"], x)
    runner = stub_runner(x, torch.rand(4, 4))
    with pytest.raises(ValueError, match=r"^stage 'm': mixup needs class-index targets .*got torch.float32 \(4, 4\)"):
        callback.on_batch_start(runner)


class CheckBand(Callback):
    """After the loss-range criterion (11): the train loss is the mean of the lower half of the
    mixed batch's per-sample losses."""

    def __init__(self, seen: list) -> None:
        super().__init__(order=13)
        self.seen = seen

    def on_batch_end(self, runner) -> None:
        if runner.is_train_loader:
            y = runner.batch["targets"]
            losses = per_sample_loss(runner.criterion, runner.batch["logits"], y).detach()
            kept = losses.sort(descending=True).values[len(losses) // 2:]
            self.seen.append((y.dim(), float(runner.batch_metrics["loss"]), float(kept.mean())))


def test_mixup_stage_with_loss_band_ranks_the_mixed_losses(tmp_path):
    seen = []
    stage = Stage("m", 1, lr=0.01, mixup=OPTIONS, loss_range={"band": (0.5, 1.0)})
    StagedRunner().fit(TinyNet(), [stage], tiny_loaders(8), nn.CrossEntropyLoss(), tmp_path, verbose=False,
                       engine="cpu", callbacks=lambda s: [CheckBand(seen)])
    assert len(seen) == 6 and all(dim == 2 for dim, _, _ in seen)
    for _, loss, expected in seen:
        assert loss == pytest.approx(expected, rel=1e-5)


def test_bad_mixup_options_fail_at_stage_creation():
    with pytest.raises(ValueError, match=r"unknown mixup keys \['alpha'\]"):
        Stage("s", 1, mixup={"alpha": 1.0})
    with pytest.raises(ValueError, match="mixup prob must be at most 1"):
        Stage("s", 1, mixup={"prob": 2.0})
    with pytest.raises(ValueError, match="needs mixup_alpha > 0"):
        Stage("s", 1, mixup={"mixup_alpha": 0.0})
