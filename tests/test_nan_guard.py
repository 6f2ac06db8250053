"""A NaN/inf loss or gradient stops the run with a message naming where, or skips the batch."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import tiny_loaders
from torch import nn

from cvkit.callbacks import NonFiniteLossError
from cvkit.io import load_checkpoint
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


class PoisonedLoss(nn.Module):
    """Cross-entropy that goes bad at one call: a NaN value, or a finite value with a NaN gradient."""

    def __init__(self, bad_call: int, kind: str) -> None:
        super().__init__()
        self.bad_call, self.kind, self.calls = bad_call, kind, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, targets)
        if not logits.requires_grad:  # validation batches are not counted
            return loss
        self.calls += 1
        if self.calls != self.bad_call:
            return loss
        if self.kind == "loss":
            return loss * float("nan")
        return loss + (logits - logits.detach()).abs().sqrt().sum()  # value +0, gradient NaN


def fit(tmp_path, criterion, policy):
    model = create_model("test_resnet", 3)
    runner = StagedRunner()
    runner.fit(model, [Stage("a", 2, lr=0.01, on_nan=policy)], tiny_loaders(), criterion, tmp_path, verbose=False)
    return model


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_stop_names_stage_epoch_batch_and_keeps_last_good_checkpoint(tmp_path, kind):
    with pytest.raises(NonFiniteLossError, match=rf"non-finite {kind}.*stage 'a', epoch 2, batch 2 of loader 'train'"):
        fit(tmp_path, PoisonedLoss(bad_call=5, kind=kind), "stop")  # 3 train batches per epoch
    last = load_checkpoint(tmp_path / "checkpoints" / "a" / "last.pth")
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_leaves_weights_finite_and_counts_the_batch(tmp_path, kind):
    model = fit(tmp_path, PoisonedLoss(bad_call=2, kind=kind), "skip")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = pd.read_csv(tmp_path / "log.csv")
    assert log["train/nan_skipped_batches"].tolist() == [1.0, 0.0]
