"""Class imbalance: class weights from YAML lists, balanced weights, focal loss, the balanced sampler."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from cvkit.data.samplers import BalancedSampler
from cvkit.losses import balanced_class_weights, create_criterion, per_sample_loss
from cvkit.stages import Stage


def test_yaml_weight_list_builds_a_weighted_cross_entropy():
    spec = yaml.safe_load("criterion: {name: cross_entropy, weight: [1, 2, 0.5]}")["criterion"]
    criterion = create_criterion(spec.pop("name"), **spec)
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    want = F.cross_entropy(logits, y, weight=torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(criterion(logits, y), want)
    bce = create_criterion("bce_one_hot", pos_weight=[1, 3, 1])
    assert torch.equal(bce.pos_weight, torch.tensor([1.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="weight='balanced'.*balanced_class_weights"):
        create_criterion("cross_entropy", weight="balanced")


def test_balanced_weights_are_inverse_frequencies():
    assert balanced_class_weights([0, 0, 0, 1], 2) == pytest.approx([4 / 6, 2.0])
    assert balanced_class_weights([0, 1, 2], 3) == pytest.approx([1.0, 1.0, 1.0])
    assert balanced_class_weights([0, 0], 2) == [0.5, 0.0]  # n / (classes * count); absent class 0


def test_focal_loss_per_sample_and_reductions():
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    focal0 = create_criterion("focal", gamma=0.0, reduction="none")
    torch.testing.assert_close(focal0(logits, y), F.cross_entropy(logits, y, reduction="none"))
    focal = create_criterion("focal", gamma=2.0, weight=[1, 1, 2, 1])
    per_sample = per_sample_loss(focal, logits, y)
    assert per_sample.shape == (8,) and focal.reduction == "mean"
    torch.testing.assert_close(focal(logits, y), per_sample.mean())
    p = logits.softmax(1)[torch.arange(8), y]
    w = torch.tensor([1.0, 1, 2, 1])[y]
    torch.testing.assert_close(per_sample, -w * (1 - p) ** 2 * p.log())
    soft = F.one_hot(y, 4).float()  # soft (mixup) targets give the same loss as their indices
    torch.testing.assert_close(per_sample_loss(focal, logits, soft), per_sample)


def test_balanced_sampler_draws_classes_equally_and_is_exact_per_epoch():
    labels = [0] * 900 + [1] * 100
    sampler = BalancedSampler(labels, num_samples=4000, seed=3)
    draws = torch.tensor(labels)[list(sampler)]
    assert abs(float((draws == 1).float().mean()) - 0.5) < 0.05
    first = list(sampler)
    assert first == list(BalancedSampler(labels, num_samples=4000, seed=3))  # a resumed run draws the same
    sampler.set_epoch(1)
    assert list(sampler) != first
    g = torch.Generator()
    shared = BalancedSampler(labels, generator=g)  # reseeded by the runner through the loader's generator
    g.manual_seed(7)
    a = list(shared)
    g.manual_seed(7)
    assert list(shared) == a


def test_balanced_sampler_ddp_shards_are_disjoint_and_cover_the_draw():
    labels = [0] * 30 + [1] * 7
    whole = list(BalancedSampler(labels, num_samples=37, seed=1))
    shards = [list(BalancedSampler(labels, num_samples=37, seed=1, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 19
    assert shards[0] == whole[0::2] and shards[1][:18] == whole[1::2]


def test_sampler_stage_option():
    assert Stage("s", 1, sampler="balanced").to_dict()["sampler"] == "balanced"
    with pytest.raises(ValueError, match=r"sampler must be one of \[None, 'balanced'\]"):
        Stage("s", 1, sampler="weighted")
