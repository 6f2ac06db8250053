"""Epoch metrics that gather statistics batch by batch and reduce once (constant memory).

A metric has ``reset()``, ``update(outputs, targets)`` and ``compute() -> {name: value}``.
The same objects serve the validation loop (through :class:`cvkit.callbacks.MetricsCallback`)
and the final test evaluation, so a number in ``metrics.json`` means what it meant in training.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch

_METRICS: Dict[str, Type["Metric"]] = {}


def register_metric(cls: Type["Metric"]) -> Type["Metric"]:
    """Class decorator: make a metric creatable by its ``name`` attribute."""
    _METRICS[cls.name] = cls
    return cls


def list_metrics() -> List[str]:
    """Names of every registered metric."""
    return sorted(_METRICS)


def create_metric(name: str, **kwargs) -> "Metric":
    """Build a registered metric by name; unknown names list the close matches."""
    if name not in _METRICS:
        close = difflib.get_close_matches(name, list(_METRICS), n=3)
        raise KeyError(f"unknown metric {name!r}" + (f"; did you mean {close}?" if close else "") + f" valid: {list_metrics()}")
    return _METRICS[name](**kwargs)


class Metric:
    """Base class: statistics over a loader, reduced once in :meth:`compute`."""

    name = "metric"

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError

    def sync(self) -> None:
        """Sum the statistics over all processes (called under DDP before :meth:`compute`)."""
        raise NotImplementedError(f"{type(self).__name__} does not support distributed training")


@register_metric
class ClassificationMetrics(Metric):
    """Accuracy and macro F1 from a confusion matrix; targets are class indices or one-hot rows."""

    name = "classification"

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pred = outputs.detach().argmax(dim=1).cpu()
        true = targets.detach().cpu()
        if true.ndim == 2:
            true = true.argmax(dim=1)
        index = true.long() * self.num_classes + pred.long()
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)

    def sync(self) -> None:
        torch.distributed.all_reduce(self.confusion)

    def compute(self) -> Dict[str, float]:
        cm = self.confusion.double()
        tp = cm.diag()
        support = cm.sum(dim=1)
        predicted = cm.sum(dim=0)
        precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
        present = support > 0
        total = cm.sum().item()
        return {
            "accuracy": float(tp.sum().item() / total) if total else 0.0,
            "f1_macro": float(f1[present].mean().item()) if present.any() else 0.0,
        }


MetricFactory = Callable[[], Metric]


def box_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(B, 4)`` xyxy box tensors (corners sorted first); 0 for empty unions."""
    pred = torch.cat([torch.minimum(pred[:, :2], pred[:, 2:]), torch.maximum(pred[:, :2], pred[:, 2:])], dim=1)
    true = torch.cat([torch.minimum(true[:, :2], true[:, 2:]), torch.maximum(true[:, :2], true[:, 2:])], dim=1)
    low = torch.maximum(pred[:, :2], true[:, :2])
    high = torch.minimum(pred[:, 2:], true[:, 2:])
    inter = (high - low).clamp(min=0).prod(dim=1)
    union = (pred[:, 2:] - pred[:, :2]).prod(dim=1) + (true[:, 2:] - true[:, :2]).prod(dim=1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


@register_metric
class BoxMetrics(Metric):
    """Classification + one box: accuracy, macro F1 and the mean box IoU.

    Outputs: a :class:`~cvkit.models.tasks.ClassBoxModel` tensor ``(B, C + 4)`` (logits, xyxy box),
    or ``{"class", "box"}`` / ``(class, box)``. Targets: ``(B, 5)`` = class index then xyxy box,
    or the same dict/tuple form. Samples whose target box is NaN (no box) are left out of the IoU.
    """

    name = "box"

    def __init__(self, num_classes: int) -> None:
        self.classes = ClassificationMetrics(num_classes)
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.classes.reset()
        self.iou = torch.zeros(2, dtype=torch.float64)  # sum of IoU, number of boxes

    def update(self, outputs: object, targets: object) -> None:
        logits, box = _split_class_box(outputs, self.num_classes, "outputs")
        label, true_box = _split_class_box(targets, self.num_classes, "targets")
        self.classes.update(logits, label.long() if label.is_floating_point() else label)
        box, true_box = box.detach().double().cpu(), true_box.detach().double().cpu()
        present = torch.isfinite(true_box).all(dim=1)
        self.iou += torch.stack([box_iou(box[present], true_box[present]).sum(), present.sum().double()])

    def sync(self) -> None:
        _all_reduce(self.classes.confusion)
        _all_reduce(self.iou)

    def compute(self) -> Dict[str, float]:
        out = self.classes.compute()
        total, count = self.iou.tolist()
        out["box_iou"] = total / count if count else 0.0
        return out


def _split_class_box(value: object, num_classes: int, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(value, dict):
        return value["class"], value["box"]
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    if isinstance(value, torch.Tensor) and value.ndim == 2:
        width = num_classes + 4 if what == "outputs" else 5
        if value.shape[1] == width:
            return (value[:, :-4], value[:, -4:]) if what == "outputs" else (value[:, 0], value[:, 1:])
    expected = f"(B, {num_classes + 4}) logits + box" if what == "outputs" else "(B, 5) class index + box"
    raise ValueError(f"{what} must be a {expected} tensor, a dict with 'class'/'box' or a 2-tuple; "
                     f"got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}")


def _all_reduce(sums: torch.Tensor) -> None:
    """Sum a CPU statistics tensor over processes in place (through the GPU when the backend is NCCL)."""
    if torch.distributed.get_backend() == "nccl":
        on_gpu = sums.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(on_gpu)
        sums.copy_(on_gpu.cpu())
    else:
        torch.distributed.all_reduce(sums)


Size = Union[int, Tuple[int, int]]


@register_metric
class KeypointMetrics(Metric):
    """Keypoint error in pixels and normalised, over the points whose target is present (not NaN).

    Outputs and targets are ``(B, 2N)`` as x0, y0, x1, y1... in [0, 1] of the image (the
    :class:`~cvkit.models.tasks.KeypointModel` convention). ``image_size`` (int or (H, W)) turns
    them into pixels of the original image; :meth:`update` also takes ``sizes`` (B, 2) as (W, H)
    per sample when images differ in size. The normalised error of a sample is its mean error
    divided by the distance between target points ``norm_points`` (e.g. the two eye centres), or
    by the image diagonal when None; samples without that distance are left out of it.

    Gives ``mean_error_px`` (mean over present points) and ``nme`` (mean over samples).
    """

    name = "keypoint"

    def __init__(self, image_size: Size, norm_points: Optional[Tuple[int, int]] = None) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        self.width, self.height = float(width), float(height)
        self.norm_points = None if norm_points is None else (int(norm_points[0]), int(norm_points[1]))
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64)  # error px, points, nme, samples with nme

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, sizes: Optional[torch.Tensor] = None) -> None:
        if outputs.shape != targets.shape or outputs.ndim != 2 or outputs.shape[1] % 2:
            raise ValueError(f"keypoint outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
                             "must both be (B, 2N)")
        pred = outputs.detach().double().cpu().view(len(outputs), -1, 2)
        true = targets.detach().double().cpu().view(len(targets), -1, 2)
        scale = (torch.tensor([self.width, self.height], dtype=torch.float64).expand(len(pred), 2)
                 if sizes is None else sizes.detach().double().cpu().view(-1, 2))
        scale = scale[:, None, :]
        present = torch.isfinite(true).all(dim=2)
        error = torch.where(present, ((pred - true) * scale).norm(dim=2), torch.zeros(()).double())
        count = present.sum(dim=1)
        if self.norm_points is None:
            reference = scale[:, 0].norm(dim=1)
        else:
            i, j = self.norm_points
            reference = ((true[:, i] - true[:, j]) * scale[:, 0]).norm(dim=1)
        usable = (count > 0) & torch.isfinite(reference) & (reference > 0)
        nme = error.sum(dim=1)[usable] / count[usable] / reference[usable]
        self.sums += torch.stack([error.sum(), count.sum().double(), nme.sum(), usable.sum().double()])

    def sync(self) -> None:
        _all_reduce(self.sums)

    def compute(self) -> Dict[str, float]:
        error, points, nme, samples = self.sums.tolist()
        return {"mean_error_px": error / points if points else float("nan"),
                "nme": nme / samples if samples else float("nan")}


@register_metric
class SegmentationMetrics(Metric):
    """Dice and IoU per class and their mean, from true/false positive/negative pixel sums over the loader.

    Outputs are logits ``(B, C, H, W)`` (sigmoid, then ``threshold``), targets 0/1 masks of the same
    shape (``(B, H, W)`` when C = 1). Sums are taken over all images, then reduced once; a class
    neither present nor predicted anywhere scores 1. Keys: ``dice``, ``iou``, ``dice_<name>``,
    ``iou_<name>`` with names ``class_names`` or 1..C (Severstal's ``ClassId``).
    """

    name = "segmentation"

    def __init__(self, num_classes: int, threshold: float = 0.5, class_names: Optional[Sequence[str]] = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold is a probability in (0, 1), got {threshold}")
        names = list(class_names) if class_names is not None else [str(c + 1) for c in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class_names for num_classes={num_classes}")
        self.num_classes, self.threshold, self.class_names = num_classes, threshold, names
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(3, self.num_classes, dtype=torch.float64)  # tp, fp, fn per class

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if targets.ndim == outputs.ndim - 1:
            targets = targets.unsqueeze(1)
        if outputs.shape != targets.shape or outputs.shape[1] != self.num_classes:
            raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} must both be "
                             f"(B, {self.num_classes}, H, W)")
        pred = torch.sigmoid(outputs.detach().float()) > self.threshold
        true = targets.detach() > 0.5
        dims = [0] + list(range(2, outputs.ndim))
        tp = (pred & true).sum(dim=dims)
        fp = (pred & ~true).sum(dim=dims)
        fn = (~pred & true).sum(dim=dims)
        self.stats += torch.stack([tp, fp, fn]).double().cpu()

    def sync(self) -> None:
        _all_reduce(self.stats)

    def compute(self) -> Dict[str, float]:
        tp, fp, fn = self.stats
        denominator = 2 * tp + fp + fn
        dice = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
        iou = torch.where(denominator > 0, tp / (tp + fp + fn).clamp(min=1), torch.ones_like(tp))
        out = {"dice": float(dice.mean()), "iou": float(iou.mean())}
        for name, d, j in zip(self.class_names, dice.tolist(), iou.tolist()):
            out[f"dice_{name}"], out[f"iou_{name}"] = d, j
        return out
