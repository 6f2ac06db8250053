"""cvkit.losses: every registered criterion (generated from the registry) and the per-sample helpers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cvkit import losses
from cvkit.losses import (
    ClassBoxLoss,
    DiceBCELoss,
    KeypointLoss,
    create_criterion,
    criterion_example,
    list_criteria,
    per_sample,
    per_sample_loss,
    register_criterion,
)

B = 4


def _example(name: str):
    try:
        return criterion_example(name, B)
    except KeyError:
        pytest.skip(f"criterion {name!r} registered no example input")


def _leaves(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return [t for v in value for t in _leaves(v)]


def _with_grad(outputs):
    if isinstance(outputs, torch.Tensor):
        return outputs.clone().requires_grad_(True)
    if isinstance(outputs, dict):
        return {k: _with_grad(v) for k, v in outputs.items()}
    return type(outputs)(_with_grad(v) for v in outputs)


@pytest.mark.parametrize("name", list_criteria())
def test_reduction_none_is_one_value_per_sample(name: str) -> None:
    torch.manual_seed(0)
    outputs, targets = _example(name)
    none = create_criterion(name, reduction="none")(outputs, targets)
    mean = create_criterion(name, reduction="mean")(outputs, targets)
    assert none.shape == (B,)
    assert torch.isfinite(none).all()
    assert torch.allclose(none.mean(), mean, atol=1e-6)
    assert torch.allclose(per_sample_loss(create_criterion(name), outputs, targets), none, atol=1e-6)


@pytest.mark.parametrize("name", list_criteria())
def test_gradients_flow_to_every_output(name: str) -> None:
    torch.manual_seed(0)
    outputs, targets = _example(name)
    outputs = _with_grad(outputs)
    create_criterion(name, reduction="none")(outputs, targets).sum().backward()
    for tensor in _leaves(outputs):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
        assert tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_criteria())
def test_sample_loss_does_not_depend_on_the_rest_of_the_batch(name: str) -> None:
    torch.manual_seed(0)
    outputs, targets = _example(name)
    criterion = create_criterion(name, reduction="none")
    first = lambda v: v[:1] if isinstance(v, torch.Tensor) else (
        {k: first(x) for k, x in v.items()} if isinstance(v, dict) else type(v)(first(x) for x in v))
    assert torch.allclose(criterion(first(outputs), first(targets)), criterion(outputs, targets)[:1], atol=1e-6)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(KeyError, match="dice_bce"):
        create_criterion("dice_bec")
    with pytest.raises(ValueError, match="reduction"):
        create_criterion("keypoint", reduction="sum")


def test_register_and_filter() -> None:
    @register_criterion(name="_test_l1")
    def _test_l1(reduction: str = "mean") -> nn.Module:
        return nn.L1Loss(reduction=reduction)

    try:
        assert "_test_l1" in list_criteria("_test*")
        assert list_criteria("dice*") == ["dice_bce"]
        assert isinstance(create_criterion("_test_l1", reduction=None), nn.L1Loss)  # None kwargs dropped
    finally:
        losses.CRITERIA.unregister("_test_l1")


def test_per_sample_masks_missing_elements() -> None:
    loss = torch.tensor([[1.0, 3.0, float("nan")], [2.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    assert torch.equal(per_sample(loss, mask), torch.tensor([2.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="scalar"):
        per_sample(torch.tensor(1.0))


def test_per_sample_loss_of_torch_losses() -> None:
    torch.manual_seed(0)
    outputs = torch.rand(3, 4, 2, requires_grad=True)
    targets = torch.rand(3, 4, 2)
    targets[0, :2] = float("nan")
    criterion = nn.SmoothL1Loss()
    losses = per_sample_loss(criterion, outputs, targets)
    expected = nn.SmoothL1Loss(reduction="none")(outputs[0, 2:], targets[0, 2:]).mean()
    assert criterion.reduction == "mean"
    assert torch.allclose(losses[0], expected)
    losses.sum().backward()
    assert torch.equal(outputs.grad[0, :2], torch.zeros(2, 2))
    assert torch.isfinite(outputs.grad).all()

    logits = torch.randn(2, 3, 4, 4)
    seg = torch.randint(0, 3, (2, 4, 4))
    seg[1, :2] = -100
    ce = per_sample_loss(nn.CrossEntropyLoss(), logits, seg)
    assert torch.allclose(ce[1], nn.CrossEntropyLoss()(logits[1:], seg[1:]))
    with pytest.raises(TypeError, match="reduction"):
        per_sample_loss(lambda o, t: (o - t).mean(), outputs, targets)


def test_class_box_takes_dicts_or_tuples_and_skips_missing_boxes() -> None:
    (outputs, targets) = criterion_example("class_box", B)
    criterion = ClassBoxLoss(reduction="none", box_weight=2.0)
    by_dict = criterion(outputs, targets)
    by_tuple = criterion((outputs["class"], outputs["box"]), (targets["class"], targets["box"]))
    assert torch.equal(by_dict, by_tuple)
    class_only = nn.functional.cross_entropy(outputs["class"], targets["class"], reduction="none")
    assert torch.allclose(by_dict[0], class_only[0])  # sample 0 has no box
    with pytest.raises(KeyError, match="box"):
        criterion({"class": outputs["class"]}, targets)


def test_keypoint_loss_values() -> None:
    outputs = torch.zeros(2, 2, 2)
    targets = torch.tensor([[[1.0, 1.0], [float("nan"), float("nan")]], [[2.0, 0.0], [0.0, 0.0]]])
    assert torch.allclose(KeypointLoss(kind="mse", reduction="none")(outputs, targets), torch.tensor([1.0, 1.0]))


def test_dice_is_per_image() -> None:
    logits = torch.full((2, 1, 4, 4), 20.0)
    targets = torch.zeros(2, 4, 4)
    targets[0] = 1.0
    dice = DiceBCELoss(reduction="none", bce_weight=0.0, smooth=1e-6)(logits, targets)
    assert dice[0] < 1e-4 and dice[1] > 0.99
    multiclass = DiceBCELoss(reduction="none")(torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4)))
    assert multiclass.shape == (2,)
