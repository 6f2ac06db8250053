"""Datasets: the item contract, targets moved by augmentation, presets and their serialisation."""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from cvkit.data import augment, demo
from cvkit.data.datasets import (
    BoxDataset,
    ClassificationDataset,
    KeypointDataset,
    SegmentationDataset,
    STL10Dataset,
)
from cvkit.data.io import LabelError

W, H = 40, 20


def _image(tmp_path, name="a.png"):
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = 255  # left half white, so a flip is visible in the features
    cv2.imwrite(str(tmp_path / name), image)
    return name


def _flip():
    return augment.compose([A.HorizontalFlip(p=1.0)], normalize="none")


def test_classification_item_contract_and_class_map(tmp_path):
    name = _image(tmp_path)
    frame = pd.DataFrame({"file": [name, name], "y": ["dog", "cat"]})
    ds = ClassificationDataset(frame, root=tmp_path, path_col="file", label_col="y")
    assert ds.class_map == {"cat": 0, "dog": 1}
    item = ds[0]
    assert item["features"].dtype == torch.float32 and item["features"].shape == (3, H, W)
    assert item["targets"].dtype == torch.int64 and int(item["targets"]) == 1 and item["index"] == 0
    # transform=None normalises with ImageNet statistics: white red channel -> (1 - 0.485) / 0.229
    assert item["features"][0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)
    numeric = ClassificationDataset(pd.DataFrame({"path": [name] * 4, "label": [10, 2, 0, np.nan]}), root=tmp_path)
    assert numeric.class_map == {"0": 0, "2": 1, "10": 2}  # numeric order, and 2.0 (NaN column) reads as "2"
    assert numeric.labels().tolist() == [2, 1, 0, -1]
    bad = ClassificationDataset(frame, root=tmp_path, path_col="file", label_col="y", class_map={"cat": 0})
    with pytest.raises(LabelError, match=r"table row 0 \(a.png\): label 'dog' is not in the class map"):
        bad[0]


def test_hflip_moves_box_and_keypoints_where_they_should_be(tmp_path):
    name = _image(tmp_path)
    frame = pd.DataFrame({"path": [name], "label": ["a"], "x1": [2], "y1": [3], "x2": [10], "y2": [8],
                          "kx": [5.0], "ky": [7.0], "mx": [np.nan], "my": [np.nan]})
    box = BoxDataset(frame, root=tmp_path, transform=_flip())[0]
    assert box["features"][0, 0, -1].item() == 1.0 and box["features"][0, 0, 0].item() == 0.0
    assert torch.allclose(box["boxes"], torch.tensor([(W - 10) / W, 3 / H, (W - 2) / W, 8 / H]))
    assert box["box_visible"].item() == 1.0

    kp = KeypointDataset(frame, keypoint_cols=["kx", "ky", "mx", "my"], root=tmp_path, transform=_flip())[0]
    # albumentations puts keypoints on pixel centres: a flip maps x to W - 1 - x
    assert torch.allclose(kp["targets"][:2], torch.tensor([(W - 1 - 5) / W, 7 / H]))
    assert torch.isnan(kp["targets"][2:]).all()
    assert kp["keypoints_mask"].tolist() == [1, 1, 0, 0]

    fmt = BoxDataset(frame.assign(x2=[8], y2=[5]), root=tmp_path, box_format="xywh")[0]  # no transform
    assert torch.allclose(fmt["boxes"], torch.tensor([2 / W, 3 / H, 10 / W, 8 / H]))


def test_box_cropped_away_is_marked_invisible(tmp_path):
    name = _image(tmp_path)
    frame = pd.DataFrame({"path": [name], "label": ["a"], "x1": [30], "y1": [2], "x2": [38], "y2": [6]})
    crop = augment.compose([A.Crop(x_min=0, y_min=0, x_max=20, y_max=20)])
    item = BoxDataset(frame, root=tmp_path, transform=crop)[0]
    assert item["box_visible"].item() == 0.0 and item["boxes"].tolist() == [0, 0, 0, 0]


def test_segmentation_png_and_rle_give_the_same_channels_and_flip_together(tmp_path):
    name = _image(tmp_path)
    ids = np.zeros((H, W), np.uint8)
    ids[2:5, 1:4], ids[10:12, 30:35] = 1, 2
    cv2.imwrite(str(tmp_path / "m.png"), ids)
    png = SegmentationDataset(pd.DataFrame({"path": [name], "mask": ["m.png"]}), root=tmp_path, num_classes=2,
                              transform=_flip())
    onehot = np.stack([ids == 1, ids == 2]).astype(np.float32)
    got = png[0]["targets"]
    assert got.dtype == torch.float32 and got.shape == (2, H, W)
    assert np.array_equal(got.numpy(), onehot[:, :, ::-1])
    rle = pd.DataFrame({"ImageId": [name, name], "ClassId": [2, 1],
                        "EncodedPixels": [rle_of(ids == 2), rle_of(ids == 1)]})
    from_rle = SegmentationDataset.from_rle(rle, tmp_path, num_classes=2, transform=_flip())
    assert len(from_rle) == 1 and torch.equal(from_rle[0]["targets"], got)


def rle_of(mask):
    from cvkit.data.rle import rle_encode

    return rle_encode(mask.astype(np.uint8))


def test_folders_dataset_and_demo_csv_agree(tmp_path):
    root = demo.build_classification(tmp_path / "cls", per_class=2, size=16)
    folders = ClassificationDataset.from_folders(root / "images", class_map=root / "encode_classes.json")
    csv = ClassificationDataset(pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "test.csv")]),
                                root=root, class_map=root / "encode_classes.json")
    assert len(folders) == len(csv) == 20
    assert sorted(folders.labels().tolist()) == sorted(csv.labels().tolist()) == sorted(list(range(10)) * 2)
    assert folders.frame.path[0].startswith("digit_0/")


def test_stl10_unlabeled_split_has_no_targets(tmp_path):
    from cvkit.data import stl10

    rng = np.random.default_rng(0)
    stl10.write_images(tmp_path / "unlabeled_X.bin", rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8))
    item = STL10Dataset(tmp_path, "unlabeled", transform=augment.create_preset("light", 32))[1]
    assert item["features"].shape == (3, 32, 32) and int(item["targets"]) == -1 and item["index"] == 1


@pytest.mark.parametrize("name", augment.list_presets())
def test_every_preset_moves_image_mask_box_and_keypoints_together(name):
    """A white square with its mask, box and centre keypoint must stay aligned after any preset."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 24:44] = 255
    mask = np.zeros((64, 64, 1), np.uint8)
    mask[20:40, 24:44] = 1
    transform = augment.create_preset(name, 48, normalize="none")
    torch.manual_seed(0)
    for seed in range(3):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask, bboxes=np.array([[24 / 64, 20 / 64, 44 / 64, 40 / 64]]),
                        keypoints=np.array([[33.5, 29.5]]))
        assert out["image"].shape == (3, 48, 48) and out["mask"].shape == (1, 48, 48)
        ys, xs = np.nonzero(out["mask"][0].numpy())
        if len(xs) < 20 or len(out["bboxes"]) == 0:
            continue
        x1, y1, x2, y2 = np.asarray(out["bboxes"][0]) * 48
        # the box encloses the moved mask (rotation makes it the enclosing box) within a pixel or two
        assert x1 - 2 <= xs.min() and xs.max() <= x2 + 2 and y1 - 2 <= ys.min() and ys.max() <= y2 + 2
        kx, ky = out["keypoints"][0][:2]
        assert abs(kx - xs.mean()) < 3 and abs(ky - ys.mean()) < 3
        bright = out["image"].mean(0).numpy()
        assert bright[out["mask"][0].numpy() > 0].mean() > bright[out["mask"][0].numpy() == 0].mean()


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_preset_saves_and_loads_with_albumentations_serialisation(tmp_path, suffix):
    transform = augment.create_preset("heavy", (32, 48))
    augment.save_transform(transform, tmp_path / f"aug{suffix}")
    loaded = augment.load_transform(tmp_path / f"aug{suffix}")
    assert augment.transform_to_dict(loaded) == augment.transform_to_dict(transform)
    assert type(loaded.transforms[0]).__name__ == "OneWarp" and loaded.transforms[0].rotate == (-30.0, 30.0)
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    for seed in range(3):
        transform.set_random_seed(seed)
        loaded.set_random_seed(seed)
        assert torch.equal(transform(image=image)["image"], loaded(image=image)["image"])


@pytest.mark.parametrize("name, mode", [("resize", "resize"), ("letterbox", "letterbox"), ("light", "crop"),
                                        ("medium", "crop"), ("heavy", "crop")])
def test_presets_warp_once_then_change_colours(name, mode):
    """Geometry is one OneWarp first (so table datasets can decode reduced); colour steps follow it."""
    from cvkit.data.warp import OneWarp

    steps = augment.create_preset(name, (24, 32)).transforms
    assert isinstance(steps[0], OneWarp) and steps[0].mode == mode and steps[0].size == (24, 32)
    assert not any(isinstance(t, (OneWarp, A.DualTransform)) for t in steps[1:])
    assert (steps[0].hflip, steps[0].affine) == {"light": (0.5, 0.0), "medium": (0.5, 0.5),
                                                 "heavy": (0.5, 0.7)}.get(name, (0.0, 0.0))


def test_unknown_preset_suggests_close_names():
    with pytest.raises(KeyError, match="did you mean .medium."):
        augment.create_preset("meduim", 32)


def test_fast_affine_gives_the_same_pixels_mask_and_keypoints_as_albumentations_affine():
    """FastAffine warps RGB through RGBA for speed; nothing it returns may differ from A.Affine's."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (50, 70), dtype=np.uint8)
    gray = image[..., 0].copy()
    kwargs = dict(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-30, 30),
                  border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0)
    ours = A.Compose([augment.FastAffine(**kwargs)], keypoint_params=augment.keypoint_params())
    theirs = A.Compose([A.Affine(**kwargs)], keypoint_params=augment.keypoint_params())
    for seed in range(4):
        ours.set_random_seed(seed)
        theirs.set_random_seed(seed)
        a = ours(image=image, mask=mask, keypoints=np.array([[10.0, 20.0]]))
        b = theirs(image=image, mask=mask, keypoints=np.array([[10.0, 20.0]]))
        assert not np.array_equal(a["image"], image)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
        np.testing.assert_allclose(a["keypoints"], b["keypoints"])
        ours.set_random_seed(seed)
        theirs.set_random_seed(seed)
        assert np.array_equal(ours(image=gray)["image"], theirs(image=gray)["image"])


@pytest.mark.parametrize("normalize", ["imagenet", "none", ((0.2, 0.3, 0.4), (0.5, 0.6, 0.7))])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_normalize_to_tensor_equals_albumentations_normalize_then_to_tensor(normalize, dtype):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 20, 3)).astype(dtype)
    mask = rng.integers(0, 2, (30, 20, 2), dtype=np.uint8)
    mean, std = augment._mean_std(normalize)
    ours = augment.compose([], normalize)(image=image, mask=mask)
    theirs = A.Compose([A.Normalize(mean, std, max_pixel_value=255.0),
                        ToTensorV2(transpose_mask=True)])(image=image, mask=mask)
    assert ours["image"].dtype == torch.float32 and ours["image"].is_contiguous()
    assert ours["image"].shape == (3, 30, 20)
    torch.testing.assert_close(ours["image"], theirs["image"].float(), rtol=0, atol=1e-6)
    assert torch.equal(ours["mask"], theirs["mask"]) and ours["mask"].shape == (2, 30, 20)


def test_normalize_to_tensor_gray_image_and_channel_mismatch():
    gray = np.full((4, 5), 51, np.uint8)
    out = A.Compose([augment.NormalizeToTensor(mean=(0.1,), std=(0.5,))])(image=gray)["image"]
    assert out.shape == (1, 4, 5)
    torch.testing.assert_close(out, torch.full((1, 4, 5), (0.2 - 0.1) / 0.5))
    with pytest.raises(ValueError, match="1 channels but mean/std have 3 values"):
        A.Compose([augment.NormalizeToTensor()])(image=gray)
    with pytest.raises(ValueError, match="std > 0"):
        augment.NormalizeToTensor(mean=(0.5,), std=(0.0,))
