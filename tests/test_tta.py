"""Every registered TTA transform: targets implemented, positions and masks survive the round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cvkit.inference import tta
from cvkit.inference.tta import (
    TARGETS,
    TTATransform,
    create_tta,
    list_tta,
    pair_permutation,
    register_tta,
    tta_examples,
    tta_predict,
)
from cvkit.registry import RegistryError

H, W = 32, 40  # not square, so a swapped axis shows
SPECS = tta_examples()
EXACT = [s for s in SPECS if not s.startswith("scale")]  # pixel-exact transforms (no resampling)
# blob centres (x, y) in pixels and box rows/cols, far enough from the border for every example
SPOTS = [(10.0, 8.0), (29.0, 22.0)]
RECTS = [(12, 9, 28, 21), (9, 7, 20, 25)]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


def blobs(spots=SPOTS, sigma: float = 1.0) -> torch.Tensor:
    """(1, N, H, W): one Gaussian blob per channel at each (x, y) pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.stack([torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2)) for x, y in spots])[None]


def rects() -> torch.Tensor:
    """(B, 1, H, W) with one filled rectangle per image."""
    out = torch.zeros(len(RECTS), 1, H, W)
    for i, (x1, y1, x2, y2) in enumerate(RECTS):
        out[i, 0, y1:y2, x1:x2] = 1
    return out


class SpotModel(nn.Module):
    """"Predicts" each channel's blob centre as normalised (x, y): the intensity-weighted centroid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.clamp_min(0)
        w = w / w.sum(dim=(2, 3), keepdim=True)
        cx = (w.sum(2) * (torch.arange(x.shape[3]) + 0.5) / x.shape[3]).sum(-1)
        cy = (w.sum(3) * (torch.arange(x.shape[2]) + 0.5) / x.shape[2]).sum(-1)
        return torch.stack([cx, cy], dim=-1).reshape(x.shape[0], -1)


class BoxModel(nn.Module):
    """"Predicts" the normalised box of the pixels brighter than 0.5, after ``num_classes`` logits."""

    def __init__(self, num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = []
        for image in x[:, 0] > 0.5:
            cols, rows = image.any(0).nonzero()[:, 0], image.any(1).nonzero()[:, 0]
            boxes.append(torch.stack([cols[0] / W, rows[0] / H, (cols[-1] + 1) / W, (rows[-1] + 1) / H]))
        logits = x.mean(dim=(2, 3))[:, :1] * torch.arange(1.0, self.num_classes + 1)
        return torch.cat([logits, torch.stack(boxes).float()], dim=1)


def pixel_error(pred: torch.Tensor, truth: torch.Tensor) -> float:
    scale = torch.tensor([W, H], dtype=pred.dtype).repeat(pred.shape[-1] // 2)
    return ((pred - truth).abs() * scale).max().item()


@pytest.mark.parametrize("spec", SPECS)
def test_every_transform_implements_every_target(spec):
    t = create_tta(spec)
    x = torch.rand(2, 3, H, W)
    assert t.image(x).shape == x.shape
    outputs = {
        "logits": torch.randn(2, 5),
        "mask": torch.rand(2, 3, H, W),
        "keypoints": torch.rand(2, 6),
        "boxes": torch.tensor([[0.2, 0.3, 0.6, 0.7], [0.4, 0.1, 0.5, 0.9]]),
    }
    assert set(outputs) == set(TARGETS)
    for target, y in outputs.items():
        back = t.invert(target, y, size=(H, W), flip_pairs=[(0, 1)])
        assert back.shape == y.shape and torch.isfinite(back).all(), target
    assert torch.equal(t.logits(outputs["logits"]), outputs["logits"])


@pytest.mark.parametrize("spec", SPECS)
def test_keypoints_survive_transform_and_inverse(spec):
    truth = torch.tensor([[(x + 0.5) / W, (y + 0.5) / H] for x, y in SPOTS]).reshape(1, -1)
    assert pixel_error(SpotModel()(blobs()), truth) < 0.01
    pred = tta_predict(SpotModel(), blobs(), [spec], target="keypoints")
    assert pixel_error(pred, truth) <= 1.0


@pytest.mark.parametrize("spec", SPECS)
def test_boxes_survive_transform_and_inverse(spec):
    truth = torch.tensor([[x1 / W, y1 / H, x2 / W, y2 / H] for x1, y1, x2, y2 in RECTS])
    pred = tta_predict(BoxModel(), rects(), [spec], target="boxes")
    assert (pred[:, :2] < pred[:, 2:]).all()
    assert pixel_error(pred, truth) <= 1.0
    both = tta_predict(BoxModel(num_classes=2), rects(), [spec], target="class_box", num_classes=2)
    assert both.shape == (2, 6) and torch.allclose(both[:, 2:], pred)


@pytest.mark.parametrize("spec", SPECS)
def test_mask_survives_transform_and_inverse(spec):
    t = create_tta(spec)
    mask = rects()
    back = t.mask(t.image(mask), (H, W))
    seen = t.mask(t.image(torch.ones_like(mask)), (H, W)) > 0.999
    if spec in EXACT:
        assert torch.equal(back[seen.expand_as(back)], mask[seen.expand_as(mask)])
    else:  # resampled: wrong only on the 1-pixel rim of the shape
        inner = -F.max_pool2d(-mask, 3, 1, 1)
        outer = F.max_pool2d(mask, 3, 1, 1)
        got = (back > 0.5).float()
        assert (got >= inner)[seen].all() and (got <= outer)[seen].all()
    if spec in ("hflip", "vflip", "identity"):
        assert torch.equal(back, mask) and seen.all()


def test_hflip_swaps_flip_pairs():
    spots = [(10.0, 8.0), (29.0, 22.0), (20.0, 16.0)]
    x = blobs(spots)
    plain = SpotModel()(x).reshape(1, 3, 2)
    flipped = tta_predict(SpotModel(), x, ["hflip"], target="keypoints", flip_pairs=[(0, 1)]).reshape(1, 3, 2)
    assert torch.allclose(flipped[:, [1, 0, 2]], plain, atol=1e-5)
    vflipped = create_tta("vflip").keypoints(plain.reshape(1, 6), flip_pairs=[(0, 1)]).reshape(1, 3, 2)
    assert torch.allclose(vflipped[0, 0], torch.stack([plain[0, 0, 0], 1 - plain[0, 0, 1]])), "vflip keeps labels"
    assert pair_permutation([(0, 3), (1, 2)], 5) == [3, 2, 1, 0, 4]
    with pytest.raises(ValueError, match="outside"):
        pair_permutation([(0, 5)], 5)
    with pytest.raises(ValueError, match="twice"):
        pair_permutation([(0, 1), (1, 2)], 5)


def test_boxes_are_resorted_after_a_mirror():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.allclose(create_tta("hflip").boxes(boxes), torch.tensor([[0.7, 0.2, 0.9, 0.4]]))
    assert torch.allclose(create_tta("vflip").boxes(boxes), torch.tensor([[0.1, 0.6, 0.3, 0.8]]))


def test_identity_alone_equals_the_plain_prediction():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).train()
    pool = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, H, W)
    plain_mask, plain_logits = conv.eval()(x), pool(x)
    conv.train()
    assert torch.equal(tta_predict(pool, x, ["identity"], activation="none"), plain_logits)
    assert torch.allclose(tta_predict(pool, x, [("identity", 2.0)]), plain_logits.softmax(1))
    assert torch.allclose(tta_predict(conv, x, ["identity"], target="mask"), plain_mask.sigmoid())
    assert conv.training, "tta_predict must restore the training mode"


def test_mask_average_of_an_equivariant_model_is_its_prediction():
    x = torch.randn(2, 3, H, W)
    mean = tta_predict(nn.Identity(), x, EXACT, target="mask", activation="softmax")
    assert torch.allclose(mean, x.softmax(1), atol=1e-6)


def test_weights_average_probabilities():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 4))
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        p_id, p_flip = model(x).softmax(1), model(x.flip(-1)).softmax(1)
    got = tta_predict(model, x, [("identity", 3.0), ("hflip", 1.0)])
    assert torch.allclose(got, (3 * p_id + p_flip) / 4, atol=1e-6)


def test_clear_errors():
    model = nn.Identity()
    x = torch.randn(1, 3, H, W)
    with pytest.raises(ValueError, match="num_classes"):
        tta_predict(model, x, ["identity"], target="class_box")
    with pytest.raises(ValueError, match="target must be one of"):
        tta_predict(model, x, ["identity"], target="masks")
    with pytest.raises(ValueError, match="positive"):
        tta_predict(model, x, [("hflip", 0)])
    with pytest.raises(ValueError, match="non-empty list"):
        tta_predict(model, x, "hflip")
    with pytest.raises(KeyError, match="hflip"):
        create_tta("hflp")
    with pytest.raises(ValueError, match="size=\\(H, W\\)"):
        create_tta("shift(2, 0)").keypoints(torch.rand(1, 2))
    with pytest.raises(ValueError, match="use an int for pixels"):
        create_tta("shift(2.0, 0)")
    with pytest.raises(ValueError, match=r"\(B, 2N\)"):
        create_tta("hflip").keypoints(torch.rand(1, 3))
    with pytest.raises(ValueError, match="output stride"):
        create_tta("shift(3, 0)").mask(torch.rand(1, 1, H // 2, W // 2), size=(H, W))


def test_register_tta_refuses_a_taken_name_unless_override():
    class Transpose(TTATransform):
        name = "transpose"

        def image(self, x):
            return x.transpose(-1, -2)

        def mask(self, y, size=None):
            return y.transpose(-1, -2)

        def points(self, xy, size=None):
            return xy.flip(-1)

    register_tta("transpose")(Transpose)
    try:
        assert "transpose" in list_tta("tr*") and tta_examples("transpose") == ["transpose"]
        with pytest.raises(RegistryError, match="'transpose' is already registered"):
            register_tta("transpose")(lambda: Transpose())
        register_tta("transpose", examples=("transpose()",), override=True)(lambda: Transpose())
        assert tta_examples("transpose") == ["transpose()"] and isinstance(create_tta("transpose"), Transpose)
    finally:
        tta.TTA_TRANSFORMS.unregister("transpose")
