"""OneWarp: one resampling that matches albumentations' step-by-step crop / resize / flip / affine.

Measured on sklearn's china.jpg and flower.jpg (427x640), same parameters, 224x224 output:
- image without an affine (crop, flip, resize, letterbox) at full decode: identical pixels;
- image with an affine: mean abs difference 1.9-8.4 grey levels, because albumentations resamples
  twice (resize, then warp), which blurs: Laplacian variance 2-4x lower step by step (china:
  2182 vs 5969). On the same photos blurred (sigma 2), where one more resampling changes little,
  0.45-0.82: the geometry is the same;
- boxes and keypoints: equal to 1e-4 px over 400 random draws of every step;
- masks: identical without an affine; with one, 1.0-1.9 % of the pixels of a two-class region
  mask differ (two nearest-neighbour roundings against one), all next to a region edge;
- reduced decode vs full decode at 224 from 1280x854 JPEGs: same boxes and keypoints, images
  1.4-2.3 grey levels apart on average (the full decode aliases more; see that test).
"""
from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import load_sample_image

from cvkit.data import augment, datasets as ds_module
from cvkit.data.datasets import BoxDataset, ClassificationDataset, KeypointDataset, SegmentationDataset
from cvkit.data.seeding import reseed_transform
from cvkit.data.io import decode_scale
from cvkit.data.warp import SOURCE_KEY, AffineDraw, OneWarp, WarpParams, WarpSource, largest_stretch, needed_source_size

PHOTOS = ("china.jpg", "flower.jpg")
MEDIUM = dict(scale=(0.6, 1.0), hflip=0.5, affine=0.5, affine_scale=(0.9, 1.1),
              translate_percent=(-0.0625, 0.0625), rotate=(-15, 15))
HEAVY = dict(scale=(0.3, 1.0), hflip=0.5, affine=0.7, affine_scale=(0.8, 1.2), translate_percent=(-0.1, 0.1),
             rotate=(-30, 30), shear=(-10, 10))


@pytest.fixture(scope="module")
def photos():
    return {name: load_sample_image(name) for name in PHOTOS}


def _fixed(size, params, mode="crop"):
    """A Compose whose OneWarp always draws ``params``."""
    warp = OneWarp(size, mode=mode)
    warp.sample = lambda height, width, rng: params
    return augment._declared([warp])


def _step_by_step(size, params):
    """The same parameters as albumentations' own steps: Crop, Resize, HorizontalFlip, Affine."""
    x0, y0, x1, y1 = params.crop
    steps = [A.Crop(x0, y0, x1, y1), A.Resize(*size)]
    if params.flip:
        steps.append(A.HorizontalFlip(p=1.0))
    if params.affine is not None:
        a = params.affine
        steps.append(A.Affine(translate_px={"x": (a.translate_x,) * 2, "y": (a.translate_y,) * 2},
                              shear={"x": (-a.shear_x,) * 2, "y": (-a.shear_y,) * 2},
                              scale={"x": (a.scale_x,) * 2, "y": (a.scale_y,) * 2}, rotate=(a.rotate, a.rotate),
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=1.0))
    return augment._declared(steps)


def _old_steps(size, options):
    """RandomResizedCrop + HorizontalFlip + Affine with OneWarp's ``options``: the pipeline it replaces."""
    return augment._declared([
        A.RandomResizedCrop(size=size, scale=options["scale"]), A.HorizontalFlip(p=options["hflip"]),
        A.Affine(scale=options["affine_scale"], translate_percent=options["translate_percent"],
                 rotate=options["rotate"], shear=options.get("shear", (0, 0)), border_mode=cv2.BORDER_CONSTANT,
                 fill=0, fill_mask=0, p=options["affine"])])


CASES = {
    "crop": ((224, 224), lambda h, w: WarpParams(h, w, (100, 50, 500, 400), False, None)),
    "crop+flip": ((224, 224), lambda h, w: WarpParams(h, w, (100, 50, 500, 400), True, None)),
    "crop x0.5+flip": ((200, 200), lambda h, w: WarpParams(h, w, (120, 10, 520, 410), True, None)),
    "crop+flip+affine": ((224, 224), lambda h, w: WarpParams(h, w, (60, 20, 580, 410), True,
                                                             AffineDraw(7, -5, 5.0, -3.0, 1.05, 0.95, 12.0))),
    "whole+rotate": ((224, 224), lambda h, w: WarpParams(h, w, (0, 0, w, h), False,
                                                         AffineDraw(0, 0, 0.0, 0.0, 1.2, 1.2, -25.0))),
}


def _sharpness(image, valid):
    return cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F)[valid].var()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", PHOTOS)
def test_one_warp_image_matches_albumentations_steps_and_is_not_blurrier(photos, name, case):
    image = photos[name]
    size, make = CASES[case]
    params = make(*image.shape[:2])
    ours = _fixed(size, params)(image=image)["image"]
    theirs = _step_by_step(size, params)(image=image)["image"]
    assert ours.shape == theirs.shape == (*size, 3)
    both = cv2.erode(((ours.sum(2) > 0) & (theirs.sum(2) > 0)).astype(np.uint8), np.ones((5, 5))) > 0
    if params.affine is None:
        assert np.array_equal(ours, theirs)  # the same single resampling
        return
    assert np.abs(ours.astype(int) - theirs).mean() < 10.0  # measured 1.9-8.4: their second resampling blurs
    assert _sharpness(ours, both) > 1.5 * _sharpness(theirs, both)
    smooth = cv2.GaussianBlur(image, (0, 0), 2)
    ours, theirs = _fixed(size, params)(image=smooth)["image"], _step_by_step(size, params)(image=smooth)["image"]
    assert np.abs(ours.astype(int) - theirs)[both].mean() < 1.2  # same geometry: measured 0.45-0.82


@pytest.mark.parametrize("size", [(224, 224), (200, 160), (96, 128)])
def test_resize_and_letterbox_modes_match_albumentations(photos, size):
    image = photos["china.jpg"]
    boxes, points = np.array([[0.1, 0.2, 0.5, 0.9]]), np.array([[10.0, 20.0], [639.0, 426.5]])
    for mode, steps in [("resize", [A.Resize(*size)]),
                        ("letterbox", [A.LongestMaxSize(max_size_hw=size),
                                       A.PadIfNeeded(*size, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)])]:
        for flip in (False, True):
            ref = augment._declared(steps + ([A.HorizontalFlip(p=1.0)] if flip else []))
            ours = augment._declared([OneWarp(size, mode=mode, hflip=float(flip))])
            a, b = ref(image=image, bboxes=boxes, keypoints=points), ours(image=image, bboxes=boxes, keypoints=points)
            assert a["image"].shape == b["image"].shape == (*size, 3)
            assert np.array_equal(a["image"], b["image"])
            np.testing.assert_allclose(b["bboxes"], a["bboxes"], atol=1e-4 / max(size))
            np.testing.assert_allclose(b["keypoints"], a["keypoints"], atol=1e-4)


def test_the_image_is_resampled_once(photos, monkeypatch):
    calls = []
    warp_affine = cv2.warpAffine
    monkeypatch.setattr(cv2, "warpAffine", lambda *a, **k: calls.append(1) or warp_affine(*a, **k))
    monkeypatch.setattr(cv2, "resize", lambda *a, **k: pytest.fail("OneWarp must not resize"))
    size, make = CASES["crop+flip+affine"]
    _fixed(size, make(427, 640))(image=photos["china.jpg"])
    assert len(calls) == 1


def _region_mask(image):
    """A realistic mask: the bright regions of a smoothed photo, two classes."""
    grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (0, 0), 4)
    return np.stack([grey > 140, grey < 60], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("options", [MEDIUM, HEAVY], ids=["medium", "heavy"])
def test_draws_boxes_keypoints_and_masks_equal_the_step_by_step_pipeline(photos, options):
    """Under one shared random state (as cvkit reseeds) OneWarp draws what RandomResizedCrop,
    HorizontalFlip and Affine draw, and moves boxes and keypoints exactly as they do."""
    image = photos["flower.jpg"]
    mask = _region_mask(image)
    size = (160, 192)
    ours, theirs = augment._declared([OneWarp(size, **options)]), _old_steps(size, options)
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.6, 0.05, 0.95, 0.4], [0.0, 0.0, 1.0, 1.0], [0.02, 0.9, 0.08, 0.99]])
    points = np.array([[10.0, 20.0], [300.5, 200.25], [639.0, 426.0], [0.0, 0.0]])
    seen = {"flip": 0, "affine": 0, "dropped": 0}
    mask_differs = []
    for seed in range(200):
        for pipeline in (ours, theirs):
            pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        a = theirs(image=image, mask=mask, bboxes=boxes, keypoints=points)
        b = ours(image=image, mask=mask, bboxes=boxes, keypoints=points)
        drawn = ours.transforms[0].params["warp"]
        assert drawn.crop == tuple(int(v) for v in theirs.transforms[0].params["crop_coords"])
        assert drawn.flip == bool(theirs.transforms[1].params)
        assert (drawn.affine is None) == (not theirs.transforms[2].params)
        seen["flip"] += drawn.flip
        seen["affine"] += drawn.affine is not None
        seen["dropped"] += len(b["bboxes"]) < len(boxes)
        assert len(a["bboxes"]) == len(b["bboxes"])
        pixels = np.array([size[1], size[0], size[1], size[0]])
        np.testing.assert_allclose(np.asarray(b["bboxes"]) * pixels, np.asarray(a["bboxes"]) * pixels, atol=1e-4)
        np.testing.assert_allclose(b["keypoints"], a["keypoints"], atol=1e-4)
        if drawn.affine is None:
            assert np.array_equal(a["mask"], b["mask"])
        else:  # two nearest roundings against one: pixels next to a region edge (of either) may differ
            differs = (a["mask"] != b["mask"]).any(axis=-1)
            kernel = np.ones((3, 3), np.uint8)
            edge = np.zeros(differs.shape, bool)
            for m in (a["mask"], b["mask"]):
                edge |= (cv2.dilate(m, kernel) != cv2.erode(m, kernel)).any(axis=-1)
            assert not (differs & ~edge)[2:-2, 2:-2].any()  # (on the border the edge may lie just outside)
            mask_differs.append(differs.mean())
    assert min(seen.values()) > 10  # flips, affines and boxes cropped away all happened
    assert np.mean(mask_differs) < 0.025 and np.max(mask_differs) < 0.04  # measured 1.7-1.9 % (max 2.3 %)


def test_targets_follow_the_fixed_steps_including_a_box_clipped_before_rotation(photos):
    image = photos["china.jpg"]
    size, make = CASES["crop+flip+affine"]
    params = make(*image.shape[:2])
    boxes = np.array([[0.05, 0.05, 0.3, 0.3], [0.5, 0.5, 0.99, 0.99], [0.2, 0.3, 0.4, 0.6]])  # two cut by the crop
    points = np.array([[5.0, 5.0], [320.0, 213.0], [600.0, 420.0]])
    a = _step_by_step(size, params)(image=image, bboxes=boxes, keypoints=points)
    b = _fixed(size, params)(image=image, bboxes=boxes, keypoints=points)
    np.testing.assert_allclose(np.asarray(b["bboxes"]) * 224, np.asarray(a["bboxes"]) * 224, atol=1e-4)
    np.testing.assert_allclose(b["keypoints"], a["keypoints"], atol=1e-4)
    # clipping the first box to the crop window before rotating gives a smaller box than rotating it whole
    whole = A.Compose([A.Affine(rotate=(12, 12), p=1.0)], bbox_params=augment.bbox_params())
    assert not np.allclose(np.asarray(b["bboxes"])[0], whole(image=image, bboxes=boxes)["bboxes"][0])


def test_distribution_of_crops_flips_and_angles_is_albumentations(photos):
    """Independent draws (different seeds) of OneWarp and of the steps it replaces: same distributions."""
    from scipy.stats import ks_2samp

    height, width = 120, 160
    warp = OneWarp((32, 32), **HEAVY)
    rng = random.Random(1)
    ours = [warp.sample(height, width, rng) for _ in range(5000)]
    theirs = _old_steps((32, 32), HEAVY)
    theirs.set_random_seed(2)
    tiny = np.zeros((height, width, 3), np.uint8)
    crops, flips, angles, scales = [], [], [], []
    for _ in range(5000):
        theirs(image=tiny)
        crops.append(theirs.transforms[0].params["crop_coords"])
        flips.append(bool(theirs.transforms[1].params))
        affine = theirs.transforms[2].params
        if affine:
            angles.append(affine["rotate"])
            scales.append(affine["scale"]["x"])

    def area_and_ratio(crop):
        x0, y0, x1, y1 = crop
        return (x1 - x0) * (y1 - y0) / (height * width), (x1 - x0) / (y1 - y0)

    ours_ar, theirs_ar = np.array([area_and_ratio(p.crop) for p in ours]), np.array([area_and_ratio(c) for c in crops])
    for k in range(2):
        assert ks_2samp(ours_ar[:, k], theirs_ar[:, k]).pvalue > 1e-3
    assert ks_2samp([p.affine.rotate for p in ours if p.affine], angles).pvalue > 1e-3
    assert ks_2samp([p.affine.scale_x for p in ours if p.affine], scales).pvalue > 1e-3
    sigma = np.sqrt(0.25 / 5000)
    assert abs(np.mean([p.flip for p in ours]) - np.mean(flips)) < 5 * sigma
    assert abs(np.mean([p.affine is not None for p in ours]) - len(angles) / 5000) < 5 * np.sqrt(0.21 / 5000)


def _jpegs(tmp_path, photos, scale=2):
    """The photos upscaled ``scale`` times (854x1280) as JPEG, so a 96-pixel output affords 1/4 decoding."""
    names = []
    for name, image in photos.items():
        big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        names.append(name)
    return names


@pytest.mark.parametrize("preset", ["medium", "heavy", "resize", "letterbox"])
def test_reduced_decode_gives_the_same_targets_and_nearly_the_same_image(tmp_path, photos, preset, monkeypatch):
    """Measured at 224 from 1280x854 JPEGs: mean abs difference 1.4-2.3 grey levels (one image up to 7),
    mostly the full decode's aliasing (bilinear from 3-6x larger): for ``resize`` the reduced decode is
    closer to an INTER_AREA (box-filtered) resize of the full image than the full decode is."""
    names = _jpegs(tmp_path, photos)
    frame = pd.DataFrame({"path": names * 4, "label": ["a"] * 8, "x1": [100.0] * 8, "y1": [80.0] * 8,
                          "x2": [700.0] * 8, "y2": [600.0] * 8, "kx": [640.0] * 8, "ky": [427.0] * 8})
    transform = augment.create_preset(preset, 224, normalize="none")
    boxes = BoxDataset(frame, root=tmp_path, transform=transform)
    points = KeypointDataset(frame, keypoint_cols=["kx", "ky"], root=tmp_path, transform=transform)
    scales = []
    read = ds_module.read_image
    monkeypatch.setattr(ds_module, "read_image", lambda path, reduce=1, header=None: scales.append(reduce) or read(path, reduce, header))
    header = ds_module.image_header

    def items(dataset, header):
        monkeypatch.setattr(ds_module, "image_header", header)
        torch.manual_seed(0)
        return [dataset[i] for i in range(len(dataset))]

    for dataset, key in [(boxes, "boxes"), (points, "targets")]:
        scales.clear()
        reduced = items(dataset, header)
        assert max(scales) >= 2, scales
        full = items(dataset, lambda path: None)
        mads = []
        for r, f in zip(reduced, full):
            np.testing.assert_allclose(r[key].numpy() * 224, f[key].numpy() * 224, atol=1e-4)
            mads.append((r["features"] - f["features"]).abs().mean().item() * 255)
        assert np.mean(mads) < 3.5 and max(mads) < 9.0, mads
    if preset == "resize":
        area = [torch.from_numpy(cv2.resize(read(tmp_path / name), (224, 224), interpolation=cv2.INTER_AREA))
                .permute(2, 0, 1).float() / 255 for name in names * 4]
        def to_area(run):
            return np.mean([(item["features"] - a).abs().mean().item() for item, a in zip(run, area)])

        assert to_area(reduced) < to_area(full)


def test_a_mask_keeps_the_full_decode_and_a_wrong_header_falls_back(tmp_path, photos, monkeypatch):
    names = _jpegs(tmp_path, photos)
    masks = []
    for name in names:
        big = cv2.imread(str(tmp_path / name))
        cv2.imwrite(str(tmp_path / f"{name}.png"), (big[..., 1] > 128).astype(np.uint8))
        masks.append(f"{name}.png")
    seg = SegmentationDataset(pd.DataFrame({"path": names, "mask": masks}), root=tmp_path,
                              transform=augment.create_preset("medium", 64, normalize="none"))
    scales = []
    read = ds_module.read_image
    monkeypatch.setattr(ds_module, "read_image", lambda path, reduce=1, header=None: scales.append(reduce) or read(path, reduce, header))
    torch.manual_seed(0)
    first = [seg[i]["targets"] for i in range(2)]
    assert scales == [1, 1]
    monkeypatch.setattr(ds_module, "image_header", lambda path: None)
    torch.manual_seed(0)
    assert all(torch.equal(a, seg[i]["targets"]) for i, a in enumerate(first))

    from cvkit.data.io import ImageHeader

    cls = ClassificationDataset(pd.DataFrame({"path": names, "label": ["a", "b"]}), root=tmp_path,
                                transform=augment.create_preset("resize", 64, normalize="none"))
    torch.manual_seed(0)
    truth = [cls[i]["features"] for i in range(2)]
    monkeypatch.setattr(ds_module, "image_header", lambda path: ImageHeader(2000, 3000, 1, "jpeg"))
    torch.manual_seed(0)
    assert all(torch.equal(a, cls[i]["features"]) for i, a in enumerate(truth))


def test_needed_size_and_decode_scale_upsample_no_output_pixel():
    warp = OneWarp((224, 224), **HEAVY)
    rng = random.Random(0)
    scales = set()
    for _ in range(300):
        params = warp.sample(960, 1280, rng)
        needed_h, needed_w = warp.needed_source_size(params)
        stretch = largest_stretch(warp.matrix(params))
        assert (needed_h, needed_w) == pytest.approx((960 * stretch, 1280 * stretch), rel=1e-8)
        reduce = decode_scale((960, 1280), (needed_h, needed_w))
        scales.add(reduce)
        # reduced pixels -> output stretches no direction by more than 1: nothing upsampled
        assert largest_stretch(warp.matrix(params) @ np.diag([reduce, reduce, 1.0])) <= 1.0 + 1e-6
        if reduce < 8:  # and the next scale would upsample
            assert largest_stretch(warp.matrix(params) @ np.diag([2 * reduce, 2 * reduce, 1.0])) > 1.0 - 1e-3
    assert scales >= {2, 4}


def test_needed_source_size_draws_what_the_call_draws():
    transform = augment.create_preset("heavy", 96, normalize="none")
    image = np.zeros((480, 640, 3), np.uint8)
    for seed in range(20):
        torch.manual_seed(seed)
        reseed_transform(transform)
        needed = needed_source_size(transform, 480, 640)
        transform(image=image)
        warp = transform.transforms[0]
        assert needed == warp.needed_source_size(warp.params["warp"])
    assert needed_source_size(augment.compose([A.Resize(8, 8)]), 480, 640) is None


def test_a_reduced_image_must_match_the_declared_source():
    warp = augment._declared([OneWarp((32, 32), mode="resize")])
    with pytest.raises(ValueError, match=r"the image is 50x40 but warp_source says a 400x300 source at 1/4"):
        warp(image=np.zeros((40, 50, 3), np.uint8), warp_source=WarpSource(300, 400, 4))
    with pytest.raises(ValueError, match="OneWarp: mode='zoom'; expected one of crop, resize, letterbox"):
        OneWarp((32, 32), mode="zoom")
    with pytest.raises(ValueError, match="OneWarp: p=0.5; it always applies"):
        OneWarp((32, 32), p=0.5)


def test_old_pipelines_still_load():
    """Runs recorded before OneWarp name albumentations' own steps and FastAffine; they rebuild as they were
    (the round trip of the OneWarp presets: test_data_datasets.py)."""
    old = augment.compose([A.RandomResizedCrop(size=(32, 32), scale=(0.6, 1.0)), A.HorizontalFlip(p=0.5),
                           augment.FastAffine(rotate=(-15, 15), p=0.5)])
    rebuilt = augment.transform_from_dict(augment.transform_to_dict(old))
    assert [type(t).__name__ for t in rebuilt.transforms] == ["RandomResizedCrop", "HorizontalFlip", "FastAffine",
                                                              "NormalizeToTensor"]


def test_reseeding_the_same_way_repeats_the_output(tmp_path, photos):
    names = _jpegs(tmp_path, photos)
    dataset = ClassificationDataset(pd.DataFrame({"path": names, "label": ["a", "b"]}), root=tmp_path,
                                    transform=augment.create_preset("heavy", 64))

    def epoch(seed):
        torch.manual_seed(seed)
        return [dataset[i]["features"] for i in (0, 1, 0, 1)]

    first, again, other = epoch(3), epoch(3), epoch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("size", [(96, 96), (224, 224), (200, 320), (427, 640)])
def test_the_exported_path_decodes_and_resizes_as_the_resize_pipeline(tmp_path, photos, size):
    """cvkit.inference.runtime (no albumentations there) reads files with read_image_for_resize (posted
    bytes with decode_image) and resizes with its Preprocess: the same decode scale, full size and pixels as the ``resize`` preset, also where
    the sides do not divide by the scale (854 rows at 1/4 and 1/8: a last row of partial blocks)."""
    from cvkit.data.io import read_image_for_resize
    from cvkit.inference.runtime import Preprocess, decode_image

    prep = Preprocess({"resize": {"height": size[0], "width": size[1]},
                       "normalize": {"mean": [0.0] * 3, "std": [1.0] * 3, "max_pixel_value": 255.0}})
    for name in _jpegs(tmp_path, photos, scale=2):
        path = tmp_path / name
        data, full = ds_module.pipeline_input(path, augment.create_preset("resize", size, normalize="none"))
        image, runtime_full = read_image_for_resize(path, size)
        assert runtime_full == full == (854, 1280) and np.array_equal(image, data["image"])
        posted, posted_full = decode_image(path.read_bytes(), name, size)  # what the service decodes
        assert posted_full == full and np.array_equal(posted, image)
        assert data[SOURCE_KEY].reduce == {(96, 96): 8, (224, 224): 2, (200, 320): 4, (427, 640): 2}[size]
        ours = augment.create_preset("resize", size, normalize="none")(**data)["image"].numpy()
        assert np.abs(prep(image, runtime_full) - ours).max() < 1e-6
