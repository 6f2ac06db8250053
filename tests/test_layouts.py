"""Output layouts: every registered layout undoes every registered TTA transform on a synthetic output,
the class + box codec packs and unpacks one way, export parity never hides a difference."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvkit.inference import tta
from cvkit.tasks import Task, get_task
from cvkit.layouts import (
    CLASS_BOX,
    ClassBoxLayout,
    ClassesLayout,
    KeypointsLayout,
    MasksLayout,
    OutputLayout,
    ValuesLayout,
    get_layout,
    list_layouts,
)

H, W = 32, 40
SPOTS = [(10.0, 8.0), (29.0, 22.0)]  # (x, y) pixel centres, left one first
RECT = (12, 9, 28, 21)  # x1, y1, x2, y2 in pixels, x2/y2 exclusive
SPECS = tta.tta_examples()
EXACT = [s for s in SPECS if not s.startswith("scale")]


def _blobs() -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.stack([torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 2) for x, y in SPOTS])[None]


def _points_left_first(x: torch.Tensor) -> torch.Tensor:
    """Each channel's blob centre, normalised, labelled by appearance: point 0 is the left-most (a "left eye")."""
    w = x.clamp_min(0) / x.clamp_min(0).sum(dim=(2, 3), keepdim=True)
    cx = (w.sum(2) * (torch.arange(x.shape[3]) + 0.5) / x.shape[3]).sum(-1)
    cy = (w.sum(3) * (torch.arange(x.shape[2]) + 0.5) / x.shape[2]).sum(-1)
    points = torch.stack([cx, cy], dim=-1)
    order = points[..., 0].argsort(dim=1)
    return torch.gather(points, 1, order[..., None].expand_as(points)).reshape(x.shape[0], -1)


def _rect() -> torch.Tensor:
    x1, y1, x2, y2 = RECT
    out = torch.zeros(1, 1, H, W)
    out[0, 0, y1:y2, x1:x2] = 1
    return out


def _box(x: torch.Tensor) -> torch.Tensor:
    image = x[0, 0] > 0.5
    cols, rows = image.any(0).nonzero()[:, 0], image.any(1).nonzero()[:, 0]
    return torch.stack([cols[0] / W, rows[0] / H, (cols[-1] + 1) / W, (rows[-1] + 1) / H])[None].float()


def _ramp() -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    return torch.stack([0.3 + 0.5 * xs, 1.0 - 0.7 * ys + 0.2 * xs])[None]


LOGITS = torch.tensor([[2.0, -1.0, 0.5]])
# layout name -> (the layout to test, an image, a "model" reading the layout's output off an image, pixel tolerance)
Case = Tuple[OutputLayout, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], float]
CASES: Dict[str, Case] = {
    "logits": (ClassesLayout(), _rect(), lambda x: LOGITS, 0.0),
    "values": (ValuesLayout(), _rect(), lambda x: torch.tensor([[0.25, -3.0]]), 0.0),
    "keypoints": (KeypointsLayout(), _blobs(), _points_left_first, 1.0),
    "boxes": (get_layout("boxes"), _rect(), _box, 1.0),
    "class_box": (ClassBoxLayout(), _rect(), lambda x: CLASS_BOX.join({"class": LOGITS, "box": _box(x)}), 1.0),
    "mask": (MasksLayout("none"), _ramp(), lambda x: x, 0.0),
}


def test_every_registered_layout_has_a_round_trip_case():
    assert set(CASES) == set(list_layouts())
    assert all(get_layout(name).name == name for name in list_layouts())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("name", list(CASES))
def test_deaugment_inverts_the_transform(name: str, spec: str):
    """Read the output off the transformed image, de-augment it: the output read off the original image."""
    layout, image, read, pixels = CASES[name]
    transform = tta.create_tta(spec)
    want = layout.activate(read(image))
    got, weight = layout.deaugment(transform, layout.activate(read(transform.image(image))), (H, W), [(0, 1)])
    assert got.shape == want.shape
    if name == "mask":
        seen = weight > 0.999
        inner = (-F.max_pool2d(-seen.float(), 3, 1, 1) > 0).expand_as(got)
        assert inner.sum() > got.numel() / 3 and torch.allclose(got[inner], want[inner], atol=1e-5)
        return
    assert weight == 1.0
    scale = torch.tensor([W, H], dtype=got.dtype).repeat(2)
    if name in ("boxes", "class_box"):
        boxes = layout.split(got)["box"] if name == "class_box" else got
        true = layout.split(want)["box"] if name == "class_box" else want
        assert ((boxes - true).abs() * scale).max() <= pixels and (boxes[:, :2] < boxes[:, 2:]).all()
        if name == "class_box":
            assert torch.equal(layout.split(got)["class"], LOGITS.softmax(1))
    elif name == "keypoints":
        assert ((got - want).abs() * scale).max() <= pixels, "a mirror must swap the flip pairs back"
    else:
        assert torch.equal(got, want)


def test_tta_predict_takes_a_layout_object():
    model = _Module(_points_left_first)
    mean = tta.tta_predict(model, _blobs(), ["identity", "hflip"], target=KeypointsLayout(), flip_pairs=[(0, 1)])
    assert ((mean - _points_left_first(_blobs())).abs() * W).max() < 0.5
    with pytest.raises(ValueError, match="mirrors the image"):
        KeypointsLayout().check_tta([tta.create_tta("hflip")], None)
    KeypointsLayout().check_tta([tta.create_tta("vflip")], None)  # no mirror of labels: nothing to swap


class _Module(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_averages_clip_boxes_and_weight_mask_pixels_by_coverage():
    boxes = get_layout("boxes").average([(torch.tensor([[0.5, 0.5, 1.2, 0.9]]), 1.0)])
    assert torch.equal(boxes, torch.tensor([[0.5, 0.5, 1.0, 0.9]]))
    both = CLASS_BOX.average([(torch.tensor([[3.0, 1.5, -0.2, 0.0, 0.5, 0.5]]), 2.0)])
    assert torch.equal(both, torch.tensor([[3.0, 1.5, 0.0, 0.0, 0.5, 0.5]])), "only the box is clipped"
    seen = torch.tensor([[[[1.0, 0.0]]]])
    views = [(torch.ones(1, 1, 1, 2), seen), (torch.full((1, 1, 1, 2), 3.0), torch.ones(1, 1, 1, 2))]
    mask = MasksLayout().average(views)
    assert torch.equal(mask, torch.tensor([[[[2.0, 3.0]]]])), "a pixel one view lost averages over the others"
    with pytest.raises(ValueError, match="nothing to average"):
        ValuesLayout().average([])


def test_class_box_codec_packs_and_unpacks_one_way():
    logits, box = torch.randn(3, 5), torch.rand(3, 4)
    packed = CLASS_BOX.join({"class": logits, "box": box})
    assert packed.shape == (3, 9) and torch.equal(CLASS_BOX.split(packed, 5)["class"], logits)
    assert torch.equal(CLASS_BOX.split(packed)["box"], box), "the box is the last 4 columns"
    assert [p.tolist() for p in CLASS_BOX.parts({"class": logits, "box": box})] == [logits.tolist(), box.tolist()]
    label = torch.tensor([2, 0, 4])
    rows = CLASS_BOX.join_targets(label, box)
    assert rows.shape == (3, 5) and torch.equal(CLASS_BOX.split_targets(rows)[0].long(), label)
    row = CLASS_BOX.split(np.arange(7.0), 3)
    assert row["class"].tolist() == [0, 1, 2] and row["box"].tolist() == [3, 4, 5, 6], "numpy rows decode the same"
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        CLASS_BOX.split(packed, 4)
    with pytest.raises(ValueError, match="num_classes >= 1"):
        CLASS_BOX.split(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        CLASS_BOX.split_targets(torch.zeros(2, 6))
    with pytest.raises(KeyError, match="box"):
        CLASS_BOX.parts({"class": logits})
    layout = get_task("class_box").layout
    assert isinstance(layout, ClassBoxLayout) and get_task("class_box").tta_kwargs(["a", "b"]) == {"num_classes": 2}


def test_parity_of_a_one_column_regression_output_fails_on_a_half_shift():
    """A values output is compared raw, never through an activation that would hide the shift (a softmax
    over one column is always 1)."""
    from cvkit.export import compared_values, parity

    class Regression(type(get_task("classification"))):
        layout = ValuesLayout()

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1)).eval()
    shifted = _Module(lambda x: reference(x) + 0.5)
    images = torch.randn(4, 3, 8, 8)
    check = parity(Regression(), reference, shifted, images, 1)
    assert not check.ok and check.compared == "outputs" and abs(check.max_abs_diff - 0.5) < 1e-6
    assert parity(Regression(), reference, reference, images, 1).ok
    with pytest.raises(ValueError, match="activation must be one of"):
        ValuesLayout("softmax")
    assert compared_values(get_task("classification"), torch.zeros(2, 1), 1)[0] == "outputs"
    assert ClassBoxLayout().compare(torch.zeros(2, 5), 1)[0] == "outputs", "one class column: compared raw"


def test_only_masks_tile():
    from cvkit.inference.tiled import check_tiling

    assert [n for n in list_layouts() if get_layout(n).tileable] == ["mask"]
    check_tiling(get_task("segmentation").layout, 64, 8)
    with pytest.raises(ValueError, match="tiled inference needs mask outputs.*'keypoints'"):
        check_tiling(get_task("keypoints").layout, 64, 8)


def test_the_former_tta_target_strings_still_choose_a_layout_with_a_future_warning():
    with pytest.warns(FutureWarning, match="tta_target and tta_activation are now layout"):
        class Old(Task):
            name = "old_style"
            tta_target = "mask"
            tta_activation = "softmax"

    assert isinstance(Old.layout, MasksLayout) and Old.layout.activation == "softmax"
    assert get_task("segmentation").layout.activation == "sigmoid", "the built-in layout is not changed"
    with pytest.warns(FutureWarning, match="tta_target is now Task.layout"):
        assert get_task("keypoints").tta_target == "keypoints"
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class New(Task):
            name = "new_style"
            layout = ValuesLayout()

    assert New.layout.name == "values"
