"""Tiled mask inference: blended overlapping windows at full resolution, composed with TTA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cvkit.data.augment import default_transform
from cvkit.inference.predict import predict
from cvkit.inference.tiled import tiled_predict, window_starts, window_weight
from cvkit.inference.tta import tta_predict


class EncoderDecoder(nn.Module):
    """A stride-4 down/up model: not translation-equivariant, so only an untiled pass reproduces it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Upsample(scale_factor=4, mode="bilinear"), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _conv(kernel: int) -> nn.Module:
    torch.manual_seed(1)
    return nn.Conv2d(3, 2, kernel, padding=kernel // 2)


def _image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _whole(model: nn.Module, image: np.ndarray, tta=()) -> torch.Tensor:
    return predict(model, [image], "segmentation", transform=default_transform(), tta=tta, device="cpu")[0].output


def _tiled(model: nn.Module, image: np.ndarray, **kwargs) -> torch.Tensor:
    return predict(model, [image], "segmentation", transform=default_transform(), device="cpu", **kwargs)[0].output


@pytest.mark.parametrize("length,window,overlap", [(1600, 512, 64), (513, 512, 64), (100, 512, 64), (300, 128, 0)])
def test_windows_cover_the_length_with_at_least_the_overlap(length, window, overlap):
    starts = window_starts(length, window, overlap)
    size = min(window, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))
    weights = torch.zeros(length)
    for s in starts:
        weights[s:s + size] += window_weight(s, size, length, overlap)
    assert weights.min() > 0.4


def test_an_image_that_fits_one_tile_equals_the_whole_image_prediction():
    model, image = EncoderDecoder().eval(), _image(96, 64)
    tiled = _tiled(model, image, tile=128, overlap=32)
    assert tiled.shape == (2, 96, 64)
    assert torch.allclose(tiled, _whole(model, image), atol=1e-6)


@pytest.mark.parametrize("kernel,multiple,atol", [(1, 32, 1e-6), (3, 1, 2e-3)])
def test_tiles_of_an_equivariant_model_blend_into_the_whole_image_mask(kernel, multiple, atol):
    model, image = _conv(kernel).eval(), _image(301, 467)
    x = default_transform()(image=image)["image"]
    whole = tta_predict(model, x[None], ["identity", "hflip"], target="mask")[0]
    tiled = tiled_predict(model, x, tile=128, overlap=32, transforms=["identity", "hflip"], batch_size=3,
                          multiple=multiple)
    assert tiled.shape == whole.shape == (2, 301, 467)
    assert (tiled - whole).abs().max() < atol


def test_blending_hides_the_window_edges_a_hard_seam_would_show():
    model, image = _conv(3).eval(), _image(200, 520)
    x = default_transform()(image=image)["image"]
    whole = tta_predict(model, x[None], ["identity"], target="mask")[0]
    blended = tiled_predict(model, x, tile=128, overlap=32, multiple=1)
    hard = tiled_predict(model, x, tile=128, overlap=0, multiple=1)
    assert (blended - whole).abs().max() < 0.2 * (hard - whole).abs().max()


def test_tiled_prediction_through_predict_keeps_the_original_size_with_tta():
    model, image = _conv(3).eval(), _image(150, 333)
    tiled = _tiled(model, image, tile=64, overlap=16, tta=["vflip"])
    assert tiled.shape == (2, 150, 333)
    whole = _whole(model, image, tta=["vflip"])
    # Padded to 160 x 352 by reflection: only the last row and column see other neighbours than zero padding.
    assert (tiled - whole)[:, :-1, :-1].abs().max() < 2e-3


@pytest.mark.parametrize("kwargs,message", [({"tile": 64, "overlap": 64}, "overlap must be"),
                                            ({"tile": 0, "overlap": 0}, "tile must be a positive"),
                                            ({"tile": 100, "overlap": 8}, "multiple of 32")])
def test_bad_tiling_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiled_predict(_conv(1), torch.zeros(3, 64, 64), **kwargs)


def test_tiling_is_refused_for_outputs_that_are_not_masks():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="tiled inference needs mask outputs"):
        predict(model, [_image(64, 64)], "classification", transform=default_transform(), tile=64, overlap=8)
