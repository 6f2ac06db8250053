"""Leaderboard scores (Severstal Dice, facial keypoints RMSE, ImageNet localisation, F1) against references.

Each reference is scikit-learn where it has the score, otherwise the competition's published formula
transcribed in plain NumPy here, checked on random cases fed to the metric in random batch splits.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, mean_squared_error

from cvkit.metrics import BoxMetrics, ClassificationMetrics, KeypointMetrics, SegmentationMetrics, metric_minimized

NAN = float("nan")


def _batches(n: int, rng: np.random.Generator) -> Iterator[slice]:
    """Random contiguous batch boundaries covering ``range(n)``."""
    start = 0
    while start < n:
        stop = start + int(rng.integers(1, 5))
        yield slice(start, min(stop, n))
        start = stop


# --- Severstal: mean Dice over (image, class) pairs ----------------------------------------------------


def _severstal_dice(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-class mean over images of ``2|X n Y| / (|X| + |Y|)``, 1 when X and Y are both empty."""
    images, classes = pred.shape[:2]
    scores = np.zeros((images, classes))
    for i in range(images):
        for c in range(classes):
            x, y = pred[i, c].astype(bool), true[i, c].astype(bool)
            scores[i, c] = 1.0 if x.sum() + y.sum() == 0 else 2 * (x & y).sum() / (x.sum() + y.sum())
    return scores.mean(axis=0)


def _random_masks(rng: np.random.Generator, images: int, classes: int, size: int) -> np.ndarray:
    """0/1 masks where some (image, class) pairs are empty and others have a random density."""
    density = rng.choice([0.0, 0.02, 0.3, 0.8], size=(images, classes, 1, 1))
    return (rng.random((images, classes, size, size)) < density).astype(np.float32)


def test_dice_image_matches_the_severstal_formula_on_random_cases():
    rng = np.random.default_rng(0)
    for case in range(60):
        images, classes, size = int(rng.integers(1, 12)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
        true = _random_masks(rng, images, classes, size)
        pred = _random_masks(rng, images, classes, size)
        # logits with the metric's threshold convention: sigmoid(logit) > 0.5
        logits = torch.from_numpy(np.where(pred > 0, 3.0, -3.0) + rng.uniform(-1, 1, pred.shape)).float()
        names = [f"c{k}" for k in range(classes)]
        metric = SegmentationMetrics(classes, class_names=names)
        for part in _batches(images, rng):
            metric.update(logits[part], torch.from_numpy(true[part]))
        result = metric.compute()
        expected = _severstal_dice(pred, true)
        assert [result[f"dice_image/{n}"] for n in names] == pytest.approx(expected.tolist(), abs=1e-12), case
        assert result["dice_image"] == pytest.approx(expected.mean(), abs=1e-12), case


def test_dice_image_pair_equals_sklearn_f1_with_empty_pairs_scoring_one():
    """A pair's Dice is the binary F1 of its pixels; sklearn's zero_division=1.0 gives the empty-pair rule."""
    rng = np.random.default_rng(1)
    true = _random_masks(rng, 30, 1, 6)
    pred = _random_masks(rng, 30, 1, 6)
    metric = SegmentationMetrics(1)
    metric.update(torch.from_numpy(np.where(pred > 0, 5.0, -5.0)).float(), torch.from_numpy(true))
    per_pair = [f1_score(t.ravel(), p.ravel(), zero_division=1.0) for t, p in zip(true, pred)]
    assert metric.compute()["dice_image"] == pytest.approx(np.mean(per_pair), abs=1e-12)
    assert any(t.sum() == p.sum() == 0 for t, p in zip(true, pred))  # the rule was exercised


def test_dice_image_differs_from_pooled_dice_and_follows_the_threshold():
    """Image 1: 100 true pixels all found; image 2: one speckle pixel on an empty image."""
    true = torch.zeros(2, 1, 10, 10)
    true[0] = 1
    logits = torch.full((2, 1, 10, 10), -9.0)
    logits[0] = 9.0
    logits[1, 0, 0, 0] = 0.5  # sigmoid(0.5) = 0.62: predicted at threshold 0.5, not at 0.7
    metric = SegmentationMetrics(1)
    metric.update(logits, true)
    result = metric.compute()
    assert result["dice_image"] == pytest.approx((1.0 + 0.0) / 2)  # the speckle costs a whole image
    assert result["dice"] == pytest.approx(200 / 201)  # pooled pixels barely notice it
    strict = SegmentationMetrics(1, threshold=0.7)
    strict.update(logits, true)
    assert strict.compute()["dice_image"] == 1.0


def test_dice_image_state_is_constant_in_the_number_of_images():
    metric = SegmentationMetrics(3)
    sizes = [t.numel() for t in metric.state_tensors()]
    for _ in range(5):
        metric.update(torch.randn(4, 3, 8, 8), (torch.rand(4, 3, 8, 8) > 0.5).float())
    assert [t.numel() for t in metric.state_tensors()] == sizes
    assert metric.image_dice[1].tolist() == [20.0, 20.0, 20.0]


def test_dice_image_is_a_key_of_the_default_segmentation_metric_and_maximised():
    assert "dice_image" in SegmentationMetrics(2).keys()
    assert "dice_image" not in SegmentationMetrics.lower_is_better  # what config.complete reads
    assert not metric_minimized([SegmentationMetrics(2)], "dice_image")
    assert not metric_minimized([SegmentationMetrics(2)], "dice_image/2")
    with pytest.raises(ValueError, match="class named 'image'"):
        SegmentationMetrics(2, class_names=["scratch", "image"])  # its dice_<name> would be the mean's key


# --- Facial keypoints: RMSE over present coordinates, in pixels ----------------------------------------


def test_rmse_px_matches_sklearn_over_present_coordinates():
    rng = np.random.default_rng(2)
    for case in range(40):
        samples, points = int(rng.integers(1, 15)), int(rng.integers(1, 6))
        height, width = int(rng.integers(8, 100)), int(rng.integers(8, 100))
        true = rng.random((samples, 2 * points))
        true[rng.random(true.shape) < 0.25] = np.nan  # x and y missing independently
        true[0, 0] = 0.5  # at least one present coordinate
        pred = rng.random((samples, 2 * points))
        metric = KeypointMetrics(image_size=(height, width))
        for part in _batches(samples, rng):
            metric.update(torch.from_numpy(pred[part]), torch.from_numpy(true[part]))
        pixels = np.tile([width, height], points)
        present = np.isfinite(true)
        expected = math.sqrt(mean_squared_error((true * pixels)[present], (pred * pixels)[present]))
        assert metric.compute()["rmse_px"] == pytest.approx(expected, rel=1e-12), case


def test_rmse_px_by_hand_with_per_sample_sizes_and_direction():
    metric = KeypointMetrics(image_size=10)
    # sample 0 (96 x 96): x off by 0.5 (48 px), y exact; sample 1 (W 40, H 20): x missing, y off by 0.25 (5 px)
    metric.update(torch.tensor([[0.5, 0.5], [0.0, 0.75]]), torch.tensor([[0.0, 0.5], [NAN, 0.5]]),
                  sizes=torch.tensor([[96.0, 96.0], [40.0, 20.0]]))
    assert metric.compute()["rmse_px"] == pytest.approx(math.sqrt((48**2 + 0 + 5**2) / 3))
    assert "rmse_px" in KeypointMetrics.lower_is_better  # config.complete reads the class attribute
    assert metric_minimized([metric], "rmse_px")
    assert math.isnan(KeypointMetrics(8).compute()["rmse_px"])


# --- Classification F1 ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_f1_from_logits_and_one_hot_targets_matches_sklearn():
    rng = np.random.default_rng(3)
    for case in range(40):
        classes, samples = int(rng.integers(2, 7)), int(rng.integers(1, 50))
        logits = rng.normal(size=(samples, classes))
        labels = rng.integers(0, max(2, classes - 1), samples)  # the last class often never true
        metric = ClassificationMetrics(classes)
        for part in _batches(samples, rng):
            one_hot = np.eye(classes)[labels[part]]
            metric.update(torch.from_numpy(logits[part]), torch.from_numpy(one_hot))
        result = metric.compute()
        pred = logits.argmax(axis=1)
        for average in ("macro", "weighted", "micro"):
            expected = f1_score(labels, pred, labels=list(range(classes)), average=average)
            assert result[f"f1_{average}"] == pytest.approx(expected, abs=1e-12), (case, average)
            assert not metric_minimized([metric], f"f1_{average}")


# --- ImageNet localisation: class right and IoU >= t ----------------------------------------------------


def _numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.concatenate([np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])], axis=1)
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
    wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = np.prod(a[:, 2:] - a[:, :2], axis=1) + np.prod(b[:, 2:] - b[:, :2], axis=1) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _localisation(logits: np.ndarray, boxes: np.ndarray, labels: np.ndarray, true_boxes: np.ndarray,
                  t: float) -> float:
    """ImageNet rule over the samples that have a box: argmax right and IoU >= t."""
    has_box = np.isfinite(true_boxes).all(axis=1)
    hit = (logits.argmax(axis=1) == labels) & (_numpy_iou(boxes, np.nan_to_num(true_boxes)) >= t)
    return float(hit[has_box].mean()) if has_box.any() else 0.0


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.75])
def test_loc_acc_matches_the_imagenet_rule_on_random_cases(threshold: float):
    rng = np.random.default_rng(int(threshold * 100))
    key = f"loc_acc@{threshold:g}"
    for case in range(40):
        classes, samples = int(rng.integers(2, 5)), int(rng.integers(1, 30))
        logits = rng.normal(size=(samples, classes))
        labels = np.where(rng.random(samples) < 0.6, logits.argmax(axis=1), rng.integers(0, classes, samples))
        true_boxes = np.sort(rng.random((samples, 2, 2)), axis=1).reshape(samples, 4)
        boxes = np.clip(true_boxes + rng.normal(scale=0.1, size=true_boxes.shape), 0, 1)
        true_boxes[rng.random(samples) < 0.2] = np.nan
        metric = BoxMetrics(classes, loc_threshold=threshold) if threshold != 0.5 else BoxMetrics(classes)
        targets = np.concatenate([labels[:, None], true_boxes], axis=1)
        outputs = np.concatenate([logits, boxes], axis=1)
        for part in _batches(samples, rng):
            metric.update(torch.from_numpy(outputs[part]), torch.from_numpy(targets[part]))
        result = metric.compute()
        assert key in metric.keys() and set(metric.keys()) == set(result)
        assert result[key] == pytest.approx(_localisation(logits, boxes, labels, true_boxes, threshold),
                                            abs=1e-12), case


def test_loc_acc_by_hand_boundary_iou_and_nan_boxes_left_out():
    metric = BoxMetrics(2)
    outputs = torch.tensor([[5.0, 0, 0, 0, 1, 0.5],   # class 0 right, IoU exactly 0.5 -> hit
                            [5.0, 0, 0, 0, 1, 0.49],  # class 0 right, IoU 0.49 -> miss
                            [0, 5.0, 0, 0, 1, 1],     # IoU 1 but class wrong -> miss
                            [5.0, 0, 0, 0, 1, 1]])    # class right, box NaN -> left out of loc_acc
    targets = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, NAN, NAN, NAN, NAN]])
    metric.update(outputs, targets)
    result = metric.compute()
    assert result["loc_acc@0.5"] == pytest.approx(1 / 3)
    assert result["accuracy"] == pytest.approx(3 / 4)  # the NaN-box sample still counts for its class
    assert not metric_minimized([metric], "loc_acc@0.5")
    assert BoxMetrics(2, loc_threshold=0.75).keys()[-1] == "loc_acc@0.75"
    with pytest.raises(ValueError, match="loc_threshold"):
        BoxMetrics(2, loc_threshold=0.0)


def test_loc_acc_dict_targets_with_one_hot_classes():
    metric = BoxMetrics(3)
    box = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]])
    metric.update({"class": torch.tensor([[0, 9.0, 0], [9.0, 0, 0]]), "box": box},
                  {"class": torch.tensor([[0, 1.0, 0], [0, 0, 1.0]]), "box": box})
    assert metric.compute()["loc_acc@0.5"] == pytest.approx(1 / 2)


def test_every_new_key_gets_its_direction_from_lower_is_better():
    metrics = [SegmentationMetrics(2), KeypointMetrics(8), BoxMetrics(2, loc_threshold=0.7), ClassificationMetrics(2)]
    minimized = {k for m in metrics for k in m.lower_is_better}
    for key in ("dice_image", "rmse_px", "loc_acc@0.7", "f1_macro", "f1_weighted", "f1_micro"):
        assert any(key in m.keys() for m in metrics)
        assert metric_minimized(metrics, key) is (key in minimized)
