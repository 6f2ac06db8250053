"""Demo data and demo pretraining: rebuilt when their settings change, and weights that load and transfer."""
from __future__ import annotations

import pandas as pd
import torch

from cvkit.data import demo
from cvkit.data.demo import demo_pretrained
from cvkit.models import KeypointModel, create_model


def test_demo_set_built_with_other_settings_is_rebuilt_not_reused(tmp_path):
    root = demo.build_classification(tmp_path / "cls", per_class=3, size=16)
    first = sorted(p.name for p in (root / "images").rglob("*.jpg"))
    assert demo.build_classification(tmp_path / "cls", per_class=3, size=16) == root  # same settings: kept
    assert sorted(p.name for p in (root / "images").rglob("*.jpg")) == first

    demo.build_classification(tmp_path / "cls", per_class=2, size=16)
    rows = pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "test.csv")])
    files = list((root / "images").rglob("*.jpg"))
    assert len(rows) == len(files) == 20  # no stale images from the 30-image build
    assert all((root / p).is_file() for p in rows["path"])


def test_rebuilt_segmentation_set_has_rle_rows_for_its_own_images(tmp_path):
    root = demo.build_segmentation(tmp_path / "seg", per_class=3, canvas=32)
    demo.build_segmentation(tmp_path / "seg", per_class=2, canvas=32)
    for split in ("train", "test"):
        images = {p.split("/")[-1] for p in pd.read_csv(root / f"{split}.csv")["path"]}
        assert set(pd.read_csv(root / f"{split}_rle.csv")["ImageId"]) == images, split  # not the old build's


def test_digit_canvases_cover_every_digit_once():
    images, labels = demo.digits_canvases(size=24, seed=1)
    assert images.shape == (len(labels), 24, 24, 3) and images.dtype == "float32"
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert sorted(set(labels.tolist())) == list(range(10))


def test_demo_pretrained_weights_are_cached_and_load_without_their_pretext_head(tmp_path):
    path = demo_pretrained("test_resnet", tmp_path, epochs=1)
    stamp = path.stat().st_mtime_ns
    assert demo_pretrained("test_resnet", tmp_path, epochs=1) == path and path.stat().st_mtime_ns == stamp

    torch.manual_seed(0)
    random_init = create_model("test_resnet", num_classes=7)
    loaded = create_model("test_resnet", num_classes=7, pretrained=path)
    assert loaded.get_classifier().out_features == 7  # the 4-way pretext classifier was skipped
    moved = [k for k, v in loaded.state_dict().items()
             if k.startswith("conv1.") and not torch.equal(v, random_init.state_dict()[k])]
    assert moved, "backbone weights should differ from a random initialisation"
    # BN running statistics were learnt on the digits, not left at their initial 0 / 1
    assert not torch.allclose(loaded.bn1.running_mean, torch.zeros_like(loaded.bn1.running_mean))

    keypoints = KeypointModel("test_resnet", 5, pretrained=path)  # task models take the same file
    assert torch.equal(keypoints.backbone.conv1[0].weight, loaded.conv1[0].weight)
