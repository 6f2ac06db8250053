"""Every registered task model: shapes, gradients, a short fit, the group contract, local weights."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F

from cvkit.io import save_checkpoint
from cvkit.models import tasks
from cvkit.models.groups import apply_trainable, block_names, head_names, head_param_names, layer_ids, trainable_param_names
from cvkit.models.tasks import (
    ClassBoxModel,
    create_segmentation_model,
    create_task_model,
    list_task_models,
    register_task_model,
    split_output,
)
from cvkit.registry import RegistryError

C, K, SIZE = 3, 4, 32
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _class_box_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, boxes = split_output(out, C)
    return F.cross_entropy(logits, y[:, 0].long()) + F.l1_loss(boxes, y[:, 1:])


def _targets(name: str, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    if name == "classifier":
        return torch.randint(0, C, (n,), generator=g)
    if name == "class_box":
        corners = torch.rand(n, 2, 2, generator=g).sort(dim=1).values.transpose(1, 2).reshape(n, 4)
        return torch.cat([torch.randint(0, C, (n, 1), generator=g).float(), corners], dim=1)
    if name == "keypoints":
        return torch.rand(n, 2 * K, generator=g)
    return (x[:, :C] > 0).float()


# name -> (variants of keyword arguments, output shape for a batch of 2, loss)
SPECS: Dict[str, Tuple[List[dict], Tuple[int, ...], Loss]] = {
    "classifier": ([dict(arch="test_resnet", num_classes=C)], (2, C), F.cross_entropy),
    "class_box": (
        [dict(arch="test_resnet", num_classes=C), dict(arch="test_efficientnet", num_classes=C, dropout=0.1)],
        (2, C + 4),
        _class_box_loss,
    ),
    "keypoints": (
        [dict(arch="test_resnet", num_keypoints=K), dict(arch="test_efficientnet", num_keypoints=K)],
        (2, 2 * K),
        F.mse_loss,
    ),
    "segmentation": (
        [
            dict(encoder="tu-test_resnet", num_classes=C, decoder_channels=(16, 16, 8, 8, 8)),
            dict(encoder="resnet18", num_classes=C, encoder_depth=3, decoder_channels=(16, 8, 8)),
        ],
        (2, C, SIZE, SIZE),
        F.binary_cross_entropy_with_logits,
    ),
}
CASES = [
    pytest.param(name, kw, id=f"{name}-{kw.get('arch') or kw.get('encoder')}")
    for name in list_task_models()
    for kw in (SPECS[name][0] if name in SPECS else [{}])
]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, two threads make these tiny nets up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_registered_model_has_a_spec():
    missing = [n for n in list_task_models() if n not in SPECS]
    assert not missing, f"add test kwargs, output shape and loss for {missing} to SPECS"


@pytest.mark.parametrize("name,kwargs", CASES)
def test_shapes_gradients_and_short_fit(name, kwargs):
    _, shape, loss_fn = SPECS[name]
    torch.manual_seed(0)
    model = create_task_model(name, **kwargs)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, SIZE, SIZE, generator=g)
    y = _targets(name, x, g)
    out = model.eval()(x[:2])
    assert out.shape == shape and torch.isfinite(out).all()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None]
            assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0], losses


@pytest.mark.parametrize("name,kwargs", CASES)
def test_group_contract(name, kwargs):
    model = create_task_model(name, **kwargs)
    names = {n for n, _ in model.named_parameters()}
    head = head_param_names(model)
    assert head and head < names
    in_head = lambda n: any(n == h or n.startswith(h + ".") for h in head_names(model))  # noqa: E731
    assert any(not in_head(b) for b in block_names(model))
    modules = dict(model.named_modules())
    blocks = [n for n, m in modules.items() if n and n.count(".") <= 2 and not in_head(n) and list(m.parameters())]
    mid = trainable_param_names(model, blocks[len(blocks) // 2])
    assert head < mid < names
    apply_trainable(model, head, train_bn=True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    ids = layer_ids(model)
    assert all(ids[h] == max(ids.values()) for h in head)


def test_wrapper_blocks_carry_the_backbone_prefix():
    model = ClassBoxModel("test_resnet", C)
    assert {"backbone.layer3", "cls_head", "box_head"} <= set(block_names(model))
    assert any(n.startswith("backbone.layer4") for n in trainable_param_names(model, "backbone.layer3"))
    eff = ClassBoxModel("test_efficientnet", C)
    layer = trainable_param_names(eff, "backbone.blocks.3")
    assert head_param_names(eff) < layer and not any(n.startswith("backbone.blocks.2") for n in layer)
    assert len(set(layer_ids(eff).values())) > 3, "layer decay must see the backbone's depth"


def test_segmentation_groups_for_smp_and_timm_encoders():
    native = create_segmentation_model("resnet18", 2, encoder_depth=3, decoder_channels=(16, 8, 8))
    assert native.unused_encoder_modules == ["encoder.layer3", "encoder.layer4"]
    assert head_param_names(native) == {n for n, _ in native.named_parameters() if n.split(".")[0] != "encoder"}
    assert "encoder.layer2" in block_names(native)
    assert any(n.startswith("encoder.layer2") for n in trainable_param_names(native, "encoder.layer2"))
    tu = create_segmentation_model("tu-test_resnet", 2)
    picked = trainable_param_names(tu, "encoder.model.layer4")
    assert any(n.startswith("encoder.model.layer4") for n in picked)
    assert not any(n.startswith("encoder.model.layer3") for n in picked)


def test_split_output():
    out = torch.arange(14.0).reshape(2, 7)
    logits, boxes = split_output(out, 3)
    assert logits.shape == (2, 3) and boxes.shape == (2, 4) and boxes[0, 0] == 3
    with pytest.raises(ValueError, match="num_classes"):
        split_output(out, 4)


def test_backbone_weights_from_local_file(tmp_path):
    source = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    save_checkpoint(tmp_path / "w.pth", {"state_dict": source.state_dict()})
    model = create_task_model("keypoints", arch="test_resnet", num_keypoints=K, pretrained=tmp_path / "w.pth")
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    seg = create_segmentation_model("tu-test_resnet", 2, encoder_weights_path=tmp_path / "w.pth")
    assert torch.equal(seg.encoder.model.conv1[0].weight, source.conv1[0].weight)


def test_encoder_weights_errors_name_the_file_and_keys(tmp_path):
    other = timm.create_model("test_efficientnet", pretrained=False)
    save_checkpoint(tmp_path / "eff.pth", other.state_dict())
    with pytest.raises(ValueError, match=r"eff\.pth do not fit.*missing \['model\.conv1"):
        create_segmentation_model("tu-test_resnet", 2, encoder_weights_path=tmp_path / "eff.pth")
    with pytest.raises(ValueError, match="encoder_weights_path"):
        create_segmentation_model("resnet18", 2, encoder_weights="imagenet")


def test_unknown_names_list_close_matches():
    with pytest.raises(KeyError, match="classifier"):
        create_task_model("clasifier", arch="test_resnet", num_classes=2)
    with pytest.raises(KeyError, match="resnet18"):
        create_segmentation_model("resnet181", 2)
    with pytest.raises(KeyError, match="'Unet'"):
        create_segmentation_model("resnet18", 2, architecture="Unett")
    with pytest.raises(KeyError, match="test_resnet"):
        ClassBoxModel("test_resnt", 2)
    with pytest.raises(ValueError, match="num_classes"):
        ClassBoxModel("test_resnet", 0)


def test_register_refuses_a_taken_name_unless_override():
    @register_task_model(name="tiny")
    def build(num_classes: int = 2) -> torch.nn.Module:
        return torch.nn.Linear(2, num_classes)

    try:
        assert "tiny" in list_task_models("ti*")
        assert create_task_model("tiny", num_classes=None).out_features == 2
        with pytest.raises(RegistryError, match="task model 'tiny' is already registered"):
            register_task_model(lambda: None, name="tiny")
        register_task_model(lambda: torch.nn.Identity(), name="tiny", override=True)
        assert isinstance(create_task_model("tiny"), torch.nn.Identity)
    finally:
        tasks.TASK_MODELS.unregister("tiny")


def test_class_box_trains_in_stages_with_the_runner(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    class Batches(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return {"features": x, "targets": y}

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, SIZE, SIZE, generator=g)
    y = _targets("class_box", x, g)
    loaders = {"train": DataLoader(Batches(x, y), batch_size=8), "valid": DataLoader(Batches(x, y), batch_size=8)}
    model = ClassBoxModel("test_efficientnet", C)
    early = model.backbone.conv_stem.weight.detach().clone()
    late = model.backbone.blocks[4][0].conv_pw.weight.detach().clone()
    criterion = lambda logits, targets: _class_box_loss(logits, targets)  # noqa: E731
    StagedRunner().fit(
        model,
        [Stage("head", epochs=1, trainable="head", lr=1e-2), Stage("late", epochs=1, trainable="backbone.blocks.3", lr=1e-2)],
        loaders, criterion, tmp_path, verbose=False, engine="cpu",
    )
    assert torch.equal(model.backbone.conv_stem.weight, early)
    assert not torch.equal(model.backbone.blocks[4][0].conv_pw.weight, late)
