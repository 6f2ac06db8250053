"""Post-processing tuned on validation: synthetic cases with a known answer, a brute-force search, JSON files."""
from __future__ import annotations

import itertools
import json
from typing import List, Tuple

import numpy as np
import pytest
import torch

from cvkit.metrics import SegmentationMetrics
from cvkit.postprocess import (
    POSTPROCESS_FILE,
    SegmentationPostprocess,
    load_postprocess,
    tune_segmentation,
)
from cvkit.run_folder import write_tuning


def _dice_image(masks: List[np.ndarray], truths: List[np.ndarray]) -> List[float]:
    """Per-class dice_image of binary masks, through the registered metric (logits +-9 around its 0.5)."""
    metric = SegmentationMetrics(len(masks[0]))
    for mask, truth in zip(masks, truths):
        logits = torch.from_numpy(np.where(mask > 0, 9.0, -9.0)).float()
        metric.update(logits[None], torch.from_numpy(truth)[None].float())
    result = metric.compute()
    return [result[f"dice_image/{c + 1}"] for c in range(len(masks[0]))]


def _speckled_blobs(seed: int, images: int = 24, size: int = 32) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Half the images hold a 10x10 true blob found at p 0.9; every image gets 1-pixel speckles at p 0.8."""
    rng = np.random.default_rng(seed)
    probs, truths = [], []
    for i in range(images):
        truth = np.zeros((1, size, size), np.float32)
        prob = rng.uniform(0, 0.2, (1, size, size))
        if i % 2 == 0:
            y, x = rng.integers(0, size - 10, 2)
            truth[0, y:y + 10, x:x + 10] = 1
            prob[0, y:y + 10, x:x + 10] = rng.uniform(0.85, 0.95, (10, 10))
        for _ in range(3):  # isolated single pixels away from the blob
            while True:
                y, x = rng.integers(1, size - 1, 2)
                if not truth[0, y - 1:y + 2, x - 1:x + 2].any() and (prob[0, y - 1:y + 2, x - 1:x + 2] < 0.5).all():
                    prob[0, y, x] = 0.8
                    break
        probs.append(prob)
        truths.append(truth)
    return probs, truths


def test_min_area_removes_speckle_and_raises_dice_image():
    probs, truths = _speckled_blobs(0)
    post = tune_segmentation(iter(probs), iter(truths), thresholds=[0.3, 0.5, 0.7], min_areas=[0, 2, 50, 101],
                             min_totals=[0])
    assert post.min_areas == [2]  # the smallest area that drops 1-pixel speckle and keeps the 100-pixel blobs
    assert post.thresholds == [0.5]  # 0.3 and 0.7 score the same; the baseline's threshold wins the tie
    assert post.after == pytest.approx(1.0) and post.before < 0.6  # speckle zeroes every empty image
    assert post.before == pytest.approx(_dice_image([(p > 0.5).astype(np.uint8) for p in probs], truths)[0])
    assert post.after == pytest.approx(_dice_image([post.apply(p) for p in probs], truths)[0])


def test_threshold_picks_the_level_between_halo_and_object():
    """Objects at p 0.32-0.38, a halo at p 0.12-0.18 around them: only thresholds in [0.18, 0.32) are exact."""
    rng = np.random.default_rng(1)
    probs, truths = [], []
    for _ in range(10):
        truth = np.zeros((1, 20, 20), np.float32)
        truth[0, 6:14, 6:14] = 1
        prob = np.zeros((1, 20, 20))
        prob[0, 4:16, 4:16] = rng.uniform(0.12, 0.18, (12, 12))
        prob[0, 6:14, 6:14] = rng.uniform(0.32, 0.38, (8, 8))
        probs.append(prob)
        truths.append(truth)
    post = tune_segmentation(probs, truths, thresholds=[0.1, 0.2, 0.3, 0.4], min_areas=[0, 4], min_totals=[0, 4])
    assert post.thresholds == [0.3] and post.min_areas == [0] and post.min_totals == [0]
    assert post.before == 0.0 and post.after == 1.0  # at 0.5 nothing is predicted on any image


def test_min_total_empties_small_false_masks_that_min_area_cannot_tell_apart():
    """True masks: five 3x3 squares (45 px); empty images: two 3x3 false squares (18 px)."""
    probs, truths = [], []
    corners = [(1, 1), (1, 9), (9, 1), (9, 9), (5, 15)]
    for i in range(12):
        truth = np.zeros((1, 20, 20), np.float32)
        prob = np.zeros((1, 20, 20))
        for y, x in corners if i % 2 == 0 else corners[:2]:
            prob[0, y:y + 3, x:x + 3] = 0.9
            if i % 2 == 0:
                truth[0, y:y + 3, x:x + 3] = 1
        probs.append(prob)
        truths.append(truth)
    post = tune_segmentation(probs, truths, thresholds=[0.5], min_areas=[0, 4, 10], min_totals=[0, 8, 32, 64])
    assert post.min_totals == [32] and post.min_areas == [0]
    assert post.before == pytest.approx(0.5) and post.after == 1.0


def test_tuned_choice_equals_a_brute_force_search_with_apply():
    """Random soft masks, two classes: tune's per-class best equals trying every candidate through apply()."""
    rng = np.random.default_rng(2)
    probs, truths = [], []
    for _ in range(8):
        truth = (rng.random((2, 12, 12)) < rng.choice([0.0, 0.1, 0.5], (2, 1, 1))).astype(np.float32)
        noise = rng.random((2, 12, 12))
        probs.append(np.clip(0.35 * truth + 0.8 * noise * (rng.random((2, 12, 12)) < 0.4), 0, 1))
        truths.append(truth)
    grid = dict(thresholds=[0.2, 0.45, 0.5, 0.7], min_areas=[0, 2, 5], min_totals=[0, 3, 12])  # 0.5: the baseline
    post = tune_segmentation(probs, truths, **grid)
    best = [-1.0, -1.0]
    for t, a, m in itertools.product(*grid.values()):
        candidate = SegmentationPostprocess([t, t], [a, a], [m, m])
        scores = _dice_image([candidate.apply(p) for p in probs], truths)
        best = [max(b, s) for b, s in zip(best, scores)]
    assert post.class_after == pytest.approx(best, abs=1e-12)
    assert _dice_image([post.apply(p) for p in probs], truths) == pytest.approx(post.class_after, abs=1e-12)
    assert post.after == pytest.approx(np.mean(best)) and post.after > post.before
    assert max(best) < 1.0  # a case the grid cannot solve exactly


def test_before_is_the_metric_dice_image_at_threshold_half():
    rng = np.random.default_rng(3)
    probs = [rng.uniform(0.01, 0.99, (3, 9, 7)) for _ in range(6)]
    truths = [(rng.random((3, 9, 7)) < 0.3).astype(np.float32) for _ in range(6)]
    metric = SegmentationMetrics(3)
    for p, t in zip(probs, truths):
        metric.update(torch.logit(torch.from_numpy(p))[None].float(), torch.from_numpy(t)[None])
    post = tune_segmentation(probs, truths, thresholds=[0.9], min_areas=[0], min_totals=[0])
    assert post.before == pytest.approx(metric.compute()["dice_image"], abs=1e-12)
    assert 0.5 in [post.baseline_threshold] and post.images == 6


def test_apply_by_hand():
    probs = np.array([[[0.9, 0.9, 0.0, 0.0, 0.6],
                       [0.9, 0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 0.7, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.4, 0.4]]])
    # threshold 0.5: components {3 px top-left, 1 px top-right, 1 px centre}; min_area 2 keeps the 3 px one
    post = SegmentationPostprocess(thresholds=[0.5], min_areas=[2], min_totals=[0])
    expected = np.array([[[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]], np.uint8)
    assert np.array_equal(post.apply(probs), expected)
    # threshold 0.3: the centre pixel and the bottom pair touch diagonally (8-connectivity) -> one 3 px component
    post = SegmentationPostprocess(thresholds=[0.3], min_areas=[3], min_totals=[0])
    expected = np.array([[[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]], np.uint8)
    assert np.array_equal(post.apply(probs), expected)
    # min_total 7 > the 6 pixels left: the class is predicted empty
    assert not SegmentationPostprocess([0.3], [3], [7]).apply(torch.from_numpy(probs)).any()
    assert SegmentationPostprocess([0.5], [0], [0]).apply(probs[0]).shape == (1, 4, 5)


def test_json_round_trip_through_an_atomic_file(tmp_path):
    probs, truths = _speckled_blobs(4, images=6)
    post = tune_segmentation(probs, truths, thresholds=[0.5], min_areas=[0, 2], min_totals=[0],
                             class_names=["scratch"])
    write_tuning(tmp_path, POSTPROCESS_FILE, post)
    path = tmp_path / POSTPROCESS_FILE
    assert [p.name for p in tmp_path.iterdir()] == [POSTPROCESS_FILE]  # no temporary left behind
    loaded = load_postprocess(path)
    assert loaded == post
    assert json.loads(path.read_text())["classes"][0] == {"name": "scratch", "threshold": 0.5, "min_area": 2,
                                                         "min_total": 0, "before": post.class_before[0],
                                                         "after": post.class_after[0]}
    assert np.array_equal(loaded.apply(probs[0]), post.apply(probs[0]))


def test_bad_files_and_inputs_name_what_is_wrong(tmp_path):
    path = tmp_path / POSTPROCESS_FILE
    path.write_text(json.dumps({"classes": [{"name": "1", "threshold": 0.5, "min_area": 0}]}))
    with pytest.raises(ValueError, match=r"postprocess\.json: classes\[0\] lacks \['min_total'\]"):
        load_postprocess(path)
    path.write_text(json.dumps({"classes": [{"name": "1", "threshold": "high", "min_area": 0, "min_total": 0}]}))
    with pytest.raises(ValueError, match=r"postprocess\.json: classes\[0\] needs threshold in \[0, 1\]"):
        load_postprocess(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_postprocess(tmp_path)
    with pytest.raises(ValueError, match=r"truths\[1\] has shape"):
        tune_segmentation([np.zeros((2, 4, 4))] * 2, [np.zeros((2, 4, 4)), np.zeros((2, 4, 5))])
    with pytest.raises(ValueError, match=r"probs\[1\] has shape .* expected \(2, H, W\)"):
        tune_segmentation([np.zeros((2, 4, 4)), np.zeros((3, 4, 4))], [np.zeros((2, 4, 4))] * 2)
    with pytest.raises(ValueError, match="truths ended at image 1"):
        tune_segmentation([np.zeros((4, 4))] * 2, [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="more masks"):
        tune_segmentation([np.zeros((4, 4))], [np.zeros((4, 4))] * 2)
    with pytest.raises(ValueError, match="thresholds must be"):
        tune_segmentation([np.zeros((4, 4))], [np.zeros((4, 4))], thresholds=[1.5])
