"""Task metrics against counts worked out by hand: boxes, keypoints, segmentation masks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cvkit.metrics import (
    BoxMetrics,
    ClassificationMetrics,
    KeypointMetrics,
    SegmentationMetrics,
    box_iou,
    create_metric,
    list_metrics,
)

NAN = float("nan")


def test_registered_by_name():
    assert {"box", "keypoint", "segmentation"} <= set(list_metrics())
    assert isinstance(create_metric("segmentation", num_classes=2), SegmentationMetrics)


def test_box_iou_by_hand_and_with_swapped_corners():
    pred = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0], [0.6, 0.6, 0.8, 0.8]])
    true = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 0.5], [0.0, 0.0, 0.1, 0.1]])
    assert box_iou(pred, true).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_box_metrics_accuracy_f1_iou_and_nan_box_left_out():
    metric = BoxMetrics(3)
    # logits (3 classes) then box; predicted classes 0, 1, 2
    out = torch.tensor([[9.0, 0, 0, 0.0, 0.0, 0.5, 0.5],
                        [0, 9.0, 0, 0.0, 0.0, 0.5, 0.5],
                        [0, 0, 9.0, 0.2, 0.2, 0.4, 0.4]])
    # true classes 0, 2, 2; the third image has no box
    target = torch.tensor([[0, 0.0, 0.0, 0.5, 0.5], [2, 0.0, 0.0, 0.25, 0.5], [2, NAN, NAN, NAN, NAN]])
    metric.update(out[:2], target[:2])
    metric.update(out[2:], target[2:])
    result = metric.compute()
    assert result["accuracy"] == pytest.approx(2 / 3)
    # class 0: P=R=1 -> F1 1; class 2: P=1, R=1/2 -> F1 2/3; class 1: predicted once, never true -> F1 0
    assert result["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert result["box_iou"] == pytest.approx((1.0 + 0.5) / 2)
    dict_form = BoxMetrics(3)
    dict_form.update({"class": out[:, :3], "box": out[:, 3:]}, (target[:, 0].long(), target[:, 1:]))
    assert dict_form.compute() == pytest.approx(result)


def _sklearn_f1(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> dict:
    from sklearn.metrics import f1_score

    labels = list(range(num_classes))
    return {f"f1_{average}": f1_score(true.numpy(), pred.numpy(), labels=labels, average=average, zero_division="warn")
            for average in ("macro", "weighted", "micro")}


def _classification(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> dict:
    metric = ClassificationMetrics(num_classes)
    metric.update(F.one_hot(pred, num_classes).float(), true)
    return metric.compute()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_classification_f1_matches_sklearn_with_a_predicted_but_absent_class():
    true = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 3, 1, 1, 3, 2, 0, 3])  # class 3 is predicted three times but never true
    result = _classification(true, pred, 4)
    assert result == pytest.approx({"accuracy": 3 / 8, **_sklearn_f1(true, pred, 4)})
    # per class 2tp / (2tp + fp + fn): 2/5, 2/4, 2/4, 0 -> macro 0.35 (not 0.467 over the three true classes)
    assert result["f1_macro"] == pytest.approx((2 / 5 + 2 / 4 + 2 / 4 + 0) / 4)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_classification_f1_matches_sklearn_on_random_cases():
    """Random sizes, some classes absent from the truth, some from the predictions, some from both."""
    g = torch.Generator().manual_seed(0)
    for case in range(300):
        num_classes = int(torch.randint(2, 9, (1,), generator=g))
        true_classes, pred_classes = (torch.randperm(num_classes, generator=g)[: int(k)]
                                      for k in torch.randint(1, num_classes + 1, (2,), generator=g))
        n = int(torch.randint(1, 40, (1,), generator=g))
        true = true_classes[torch.randint(0, len(true_classes), (n,), generator=g)]
        pred = torch.where(torch.rand(n, generator=g) < 0.4, true,
                           pred_classes[torch.randint(0, len(pred_classes), (n,), generator=g)])
        result = _classification(true, pred, num_classes)
        expected = _sklearn_f1(true, pred, num_classes)
        assert {k: result[k] for k in expected} == pytest.approx(expected, abs=1e-12), (case, true, pred)
        assert result["accuracy"] == pytest.approx(float((true == pred).double().mean()))


def test_box_metrics_reject_wrong_width():
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        BoxMetrics(3).update(torch.zeros(2, 6), torch.zeros(2, 5))


def test_keypoint_metrics_pixels_nme_and_missing_points():
    metric = KeypointMetrics(image_size=(50, 100), norm_points=(0, 1))  # H=50, W=100
    # sample 0: point 0 off by 0.1 in x (10 px), point 1 exact; inter-point distance 0.5*100 = 50 px
    # sample 1: point 0 missing, point 1 off by 0.2 in y (10 px); no reference distance -> no NME
    out = torch.tensor([[0.1, 0.5, 0.5, 0.5], [0.3, 0.3, 0.5, 0.7]])
    target = torch.tensor([[0.0, 0.5, 0.5, 0.5], [NAN, NAN, 0.5, 0.5]])
    metric.update(out, target)
    result = metric.compute()
    assert result["mean_error_px"] == pytest.approx((10 + 0 + 10) / 3)
    assert result["nme"] == pytest.approx((10 / 2) / 50)


def test_keypoint_metrics_default_diagonal_and_per_sample_sizes():
    metric = KeypointMetrics(image_size=10)
    metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.8]]), sizes=torch.tensor([[40.0, 30.0]]))
    result = metric.compute()
    assert result["mean_error_px"] == pytest.approx(0.3 * 30)
    assert result["nme"] == pytest.approx(9 / 50)  # diagonal of a 40x30 image
    assert math.isnan(KeypointMetrics(8).compute()["mean_error_px"])


def test_segmentation_metrics_from_summed_counts():
    metric = SegmentationMetrics(2, class_names=["a", "b"])
    big = 10.0
    # image 1: class a predicted on pixels 0,1 (truth 1,2); class b predicted nowhere, true nowhere
    logits = torch.full((1, 2, 1, 4), -big)
    logits[0, 0, 0, :2] = big
    target = torch.zeros(1, 2, 1, 4)
    target[0, 0, 0, 1:3] = 1
    metric.update(logits, target)
    # image 2: class a tp=1 (pixel 3); class b fp=1 (pixel 0)
    logits2 = torch.full((1, 2, 1, 4), -big)
    logits2[0, 0, 0, 3] = big
    logits2[0, 1, 0, 0] = big
    target2 = torch.zeros(1, 2, 1, 4)
    target2[0, 0, 0, 3] = 1
    metric.update(logits2, target2)
    result = metric.compute()
    # class a over both images: tp=2, fp=1, fn=1 -> dice 4/6, iou 2/4; class b: tp=0, fp=1 -> 0, 0
    assert result["dice_a"] == pytest.approx(4 / 6)
    assert result["iou_a"] == pytest.approx(0.5)
    assert result["dice_b"] == 0.0 and result["iou_b"] == 0.0
    assert result["dice"] == pytest.approx(2 / 6)
    assert result["iou"] == pytest.approx(0.25)


def test_segmentation_metrics_empty_class_scores_one_and_threshold():
    metric = SegmentationMetrics(1, threshold=0.9)
    metric.update(torch.full((2, 1, 3, 3), 1.0), torch.zeros(2, 3, 3))  # sigmoid(1) = 0.73 < 0.9
    assert metric.compute() == {"dice": 1.0, "iou": 1.0, "dice_1": 1.0, "iou_1": 1.0,
                                "dice_image": 1.0, "dice_image/1": 1.0}
    with pytest.raises(ValueError, match="threshold"):
        SegmentationMetrics(1, threshold=1.5)


def test_sync_sums_over_processes(tmp_path):
    """One-process gloo group: sync runs through all_reduce and keeps the sums."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        metrics = [BoxMetrics(2), KeypointMetrics(8), SegmentationMetrics(1)]
        metrics[0].update(torch.tensor([[1.0, 0, 0, 0, 1, 1]]), torch.tensor([[0.0, 0, 0, 1, 1]]))
        metrics[1].update(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.75]]))
        metrics[2].update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
        before = [m.compute() for m in metrics]
        for m in metrics:
            m.sync()
        assert [m.compute() for m in metrics] == before
    finally:
        dist.destroy_process_group()
