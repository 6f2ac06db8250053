"""The group contract over every tiny timm model: head found, blocks valid, freezing exact."""
from __future__ import annotations

import pytest
import timm
import torch

from cvkit.models import create_model
from cvkit.models.factory import load_backbone_weights
from cvkit.models.groups import (
    apply_trainable,
    block_names,
    head_param_names,
    layer_ids,
    param_groups,
    trainable_param_names,
)
from cvkit.io import save_checkpoint

ARCHS = [a for a in timm.list_models("test_*") if a not in ("test_maxvit", "test_coatnet", "test_mambaout")]


@pytest.mark.parametrize("arch", ARCHS)
def test_group_contract(arch):
    model = create_model(arch, 5)
    names = [n for n, _ in model.named_parameters()]
    head = head_param_names(model)
    assert head and head < set(names), "head must be a proper, non-empty subset"
    assert trainable_param_names(model, "all") == set(names)
    blocks = block_names(model)
    mid = blocks[len(blocks) // 2]
    partial = trainable_param_names(model, mid)
    assert head < partial < set(names)
    frozen_bn = apply_trainable(model, trainable_param_names(model, "head"), train_bn=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    assert all(not any(p.requires_grad for p in dict(model.named_modules())[b].parameters()) for b in frozen_bn)
    ids = layer_ids(model)
    assert all(ids[h] == max(ids.values()) for h in head)
    groups = param_groups(model, names, {"head": 1.0, "backbone": 0.5}, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim <= 1 for p in g["params"]))


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_convnext", "test_vit"])
def test_bn_dropout_head_replaces_classifier(arch):
    model = create_model(arch, 7, head="bn_dropout")
    out = model.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7)
    head = head_param_names(model)
    assert any(n.endswith("0.running_mean") or n.endswith(".0.weight") for n in head)


def test_pretrained_from_local_file_keeps_backbone_and_new_head(tmp_path):
    source = create_model("test_resnet", 1000)
    save_checkpoint(tmp_path / "w.pth", {"state_dict": source.state_dict()})
    model = create_model("test_resnet", 4, pretrained=tmp_path / "w.pth")
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.fc.out_features == 4
    other = create_model("test_efficientnet", 4)
    with pytest.raises(ValueError, match="w.pth do not fit"):
        load_backbone_weights(other, tmp_path / "w.pth")


def test_missing_pretrained_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CVKIT_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads.*test_resnet.safetensors"):
        create_model("test_resnet", 3, pretrained=True)


def test_user_model_names_its_head():
    class Net(torch.nn.Module):
        head_names = ("classifier",)

        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
            self.classifier = torch.nn.Linear(4, 2)

    assert head_param_names(Net()) == {"classifier.weight", "classifier.bias"}
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="head_names"):
        head_param_names(bare)
