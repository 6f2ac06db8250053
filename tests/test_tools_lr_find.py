"""LR range test: exact restore, exponential sweep, sensible suggestion, one group swept alone."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
import torch
from conftest import TinyImages
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cvkit.models import create_model
from cvkit.models.groups import apply_trainable, head_param_names, set_bn_eval, trainable_param_names
from cvkit.tools import lr_find


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads thrash (measured 7x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


class Recording(nn.Module):
    """Cross-entropy that also records what the model looked like at each step of the sweep."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.fc_weights: List[torch.Tensor] = []
        self.trainable_counts: List[int] = []

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.fc_weights.append(self.model.fc.weight.detach().clone())
        self.trainable_counts.append(sum(p.requires_grad for p in self.model.parameters()))
        return nn.functional.cross_entropy(logits, targets)


def loader(n: int = 48, batch_size: int = 16) -> DataLoader:
    return DataLoader(TinyImages(n, seed=0), batch_size=batch_size, shuffle=True)


def test_restores_weights_buffers_flags_modes_and_rng_exactly():
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    frozen_bn = apply_trainable(model, trainable_param_names(model, "head"), train_bn=True)
    model.train()
    set_bn_eval(model, frozen_bn)
    before = tensors(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    criterion = Recording(model)

    result = lr_find(model, loader(), criterion, start_lr=1e-3, end_lr=1.0, num_steps=6, progress=False)

    assert len(result.lrs) == 6
    assert not torch.equal(criterion.fc_weights[0], criterion.fc_weights[-1]), "the sweep must really train"
    assert set(criterion.trainable_counts) == {len(flags)}, "trainable='all' trains every parameter"
    after = tensors(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n for n, f in flags.items() if f} == head_param_names(model)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_lrs_are_exponential_from_start_to_end_cycling_a_short_tuple_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, 32, 32, generator=g), torch.randint(0, 3, (20,), generator=g)
    short = DataLoader(TensorDataset(x, y), batch_size=8)  # 3 batches, 12 steps
    model = create_model("test_resnet", 3)
    result = lr_find(model, short, nn.CrossEntropyLoss(), start_lr=1e-5, end_lr=1e-1, num_steps=12,
                     trainable="head", diverge_factor=None, progress=False)
    lrs = np.asarray(result.lrs)
    assert len(lrs) == 12 and result.diverged_lr is None
    assert lrs[0] == pytest.approx(1e-5, rel=1e-12) and lrs[-1] == pytest.approx(1e-1, rel=1e-12)
    np.testing.assert_allclose(np.diff(np.log(lrs)), np.log(1e4) / 11, rtol=1e-9)
    assert len(result.losses) == len(result.smoothed) == 12


def test_suggestion_is_inside_the_range_and_below_divergence(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_resnet", 3)
    png = tmp_path / "lr.png"
    result = lr_find(model, loader(96, 16), nn.CrossEntropyLoss(reduction="none"), start_lr=1e-5, end_lr=100.0,
                     num_steps=60, optimizer="sgd", out_png=png, progress=False)
    assert result.diverged_lr is not None, "SGD at LR 100 must blow up on this problem"
    assert len(result.lrs) < 60
    assert min(result.smoothed) < 0.9 * result.smoothed[0], "the loss must fall before it diverges"
    for suggestion in (result.suggested_lr, result.valley_lr):
        assert 1e-5 <= suggestion < result.diverged_lr
        assert suggestion < result.lrs[int(np.argmin(result.smoothed))] * 1.0001
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_group_head_sweeps_the_head_while_the_backbone_lr_stays_fixed():
    model = create_model("test_resnet", 3)
    criterion = Recording(model)
    result = lr_find(model, loader(), criterion, start_lr=1e-4, end_lr=1e-1, num_steps=5, group="head",
                     lr={"backbone": 1e-3}, optimizer="adamw", weight_decay=1e-2, diverge_factor=None, progress=False)
    assert result.group_lrs["backbone"] == [1e-3] * 5
    assert result.group_lrs["head"] == result.lrs
    assert np.all(np.diff(result.group_lrs["head"]) > 0)


def test_bad_arguments_name_what_is_wrong():
    model = create_model("test_resnet", 3)
    with pytest.raises(ValueError, match="give the other groups"):
        lr_find(model, loader(), nn.CrossEntropyLoss(), group="head", num_steps=2, progress=False)
    with pytest.raises(KeyError, match=r"'head', 'layer4'|\['backbone', 'head'\]"):
        lr_find(model, loader(), nn.CrossEntropyLoss(), group="neck", lr=1e-3, num_steps=2, progress=False)
    with pytest.raises(KeyError, match="registered: .*sgd"):
        lr_find(model, loader(), nn.CrossEntropyLoss(), optimizer="sdg", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        lr_find(model, loader(), nn.CrossEntropyLoss(), start_lr=1.0, end_lr=0.1, progress=False)
    with pytest.raises(ValueError, match="needs group="):
        lr_find(model, loader(), nn.CrossEntropyLoss(), lr=1e-3, progress=False)
