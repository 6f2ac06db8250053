"""Epoch metrics that gather statistics batch by batch and reduce once (constant memory).

A metric has ``reset()``, ``update(outputs, targets)`` and ``compute() -> {name: value}``;
``keys()`` names what ``compute()`` returns and ``lower_is_better`` which of those keys improve
downwards, so the direction of a monitored key comes from the metric itself
(:func:`metric_minimized`). The same objects serve the validation loop (through
:class:`cvkit.callbacks.MetricsCallback`) and the final test evaluation, so a number in
``metrics.json`` means what it meant in training. Under DDP, :meth:`Metric.sync` sums every
metric's :meth:`~Metric.state_tensors` over processes, one path for all of them.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.distributed as dist

from cvkit.registry import Registry
from cvkit.layouts import CLASS_BOX

MetricExample = Callable[[int], Tuple[Dict[str, Any], Any, Any]]
METRICS: Registry[Type["Metric"]] = Registry("metric")


def register_metric(
    cls: Optional[Type["Metric"]] = None,
    *,
    name: str = "",
    example: Optional[MetricExample] = None,
    override: bool = False,
) -> Any:
    """Class decorator: make a metric creatable by ``name`` (default: its ``name`` attribute).

    ``example(batch_size) -> (init_kwargs, outputs, targets)`` is a tiny valid configuration and
    batch, kept as the entry's ``example`` metadata for the registry tests. A taken name raises
    :class:`cvkit.registry.RegistryError` unless ``override=True``. Works bare or with arguments.
    """

    def wrap(metric_cls: Type["Metric"]) -> Type["Metric"]:
        return METRICS.register(metric_cls, name=name or metric_cls.name, override=override, example=example)

    return wrap(cls) if cls is not None else wrap


def list_metrics(pattern: str = "*") -> List[str]:
    """Names of the registered metrics matching a shell-style ``pattern``."""
    return METRICS.list(pattern)


def create_metric(name: str, **kwargs: Any) -> "Metric":
    """Build a registered metric by name; unknown names list the close matches."""
    return METRICS.get(name)(**kwargs)


def metric_example(name: str, batch_size: int = 4) -> Tuple[Dict[str, Any], Any, Any]:
    """``(init_kwargs, outputs, targets)`` the metric was registered with (KeyError if none)."""
    example = METRICS.meta(name).get("example")
    if example is None:
        raise KeyError(f"metric {name!r} registered no example input")
    return example(batch_size)


def _all_reduce(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over the processes of the default group, in place, on the device its backend needs.

    NCCL only reduces CUDA tensors, so a CPU statistics tensor goes to the current GPU and back;
    gloo (and a mixed ``cpu:gloo,cuda:nccl`` group) reduces it where it is.
    """
    backend = str(dist.get_backend())
    if "nccl" not in backend or "gloo" in backend or tensor.is_cuda:
        dist.all_reduce(tensor)
        return
    on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(on_gpu)
    tensor.copy_(on_gpu.to(tensor.device))


class Metric:
    """Base class: statistics over a loader, reduced once in :meth:`compute`.

    Subclasses implement ``reset``/``update``/``compute``, ``keys`` (what ``compute`` returns for
    this configuration) and ``state_tensors`` (the sums :meth:`sync` adds up over processes), and
    list in ``lower_is_better`` the keys where a smaller value is better.
    """

    name = "metric"
    lower_is_better: Tuple[str, ...] = ()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> Dict[str, float]:
        raise NotImplementedError

    def keys(self) -> List[str]:
        """The keys :meth:`compute` returns with this metric's configuration."""
        raise NotImplementedError(f"{type(self).__name__} does not list its keys()")

    def state_tensors(self) -> List[torch.Tensor]:
        """The statistics tensors :meth:`sync` sums over processes; they are updated in place."""
        raise NotImplementedError(f"{type(self).__name__} does not support distributed training (no state_tensors())")

    def sync(self) -> None:
        """Sum the statistics over all processes (called under DDP before :meth:`compute`; no-op without a group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        for tensor in self.state_tensors():
            _all_reduce(tensor)


def metric_minimized(metrics: Sequence[Metric], key: str) -> bool:
    """Whether a smaller ``key`` is better: ``loss*`` keys are, other keys as the metric producing them declares.

    A key that none of ``metrics`` produces is a ValueError listing the keys they do produce.
    """
    if key.startswith("loss"):
        return True
    for metric in metrics:
        if key in metric.keys():
            return key in metric.lower_is_better
    produced = [k for metric in metrics for k in metric.keys()]
    raise ValueError(f"valid metric {key!r} is produced by none of the metrics "
                     f"{[type(m).__name__ for m in metrics]}; expected 'loss' or one of {produced}")


def _classification_example(batch_size: int) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
    return {"num_classes": 3}, torch.randn(batch_size, 3), torch.randint(0, 3, (batch_size,))


@register_metric(example=_classification_example)
class ClassificationMetrics(Metric):
    """Accuracy and F1 (macro, weighted, micro) from a confusion matrix; targets are class indices or one-hot rows.

    The F1 averages are scikit-learn's ``f1_score(labels=range(num_classes), average=...)``:
    per class ``2 tp / (2 tp + fp + fn)``, 0 when a class is neither true nor predicted
    (sklearn's ``zero_division`` default); macro averages all ``num_classes`` classes, weighted
    averages by true count, micro pools the counts.
    """

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

    def state_tensors(self) -> List[torch.Tensor]:
        return [self.confusion]

    def keys(self) -> List[str]:
        return ["accuracy", "f1_macro", "f1_weighted", "f1_micro"]

    def compute(self) -> Dict[str, float]:
        cm = self.confusion.double()
        tp = cm.diag()
        support = cm.sum(dim=1)
        fp = cm.sum(dim=0) - tp
        fn = support - tp
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        total = float(support.sum())
        return {
            "accuracy": float(tp.sum()) / total if total else 0.0,
            "f1_macro": float(f1.mean()),
            "f1_weighted": float((f1 * support).sum()) / total if total else 0.0,
            "f1_micro": float(_ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
        }


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (sklearn's zero_division default)."""
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), torch.zeros_like(numerator))


def box_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two ``(B, 4)`` xyxy box tensors (corners sorted first); 0 for empty unions."""
    pred = torch.cat([torch.minimum(pred[:, :2], pred[:, 2:]), torch.maximum(pred[:, :2], pred[:, 2:])], dim=1)
    true = torch.cat([torch.minimum(true[:, :2], true[:, 2:]), torch.maximum(true[:, :2], true[:, 2:])], dim=1)
    low = torch.maximum(pred[:, :2], true[:, :2])
    high = torch.minimum(pred[:, 2:], true[:, 2:])
    inter = (high - low).clamp(min=0).prod(dim=1)
    union = (pred[:, 2:] - pred[:, :2]).prod(dim=1) + (true[:, 2:] - true[:, :2]).prod(dim=1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _box_example(batch_size: int) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
    boxes = torch.rand(batch_size, 2, 2).sort(dim=1).values.reshape(batch_size, 4)
    targets = torch.cat([torch.randint(0, 3, (batch_size, 1)).float(), boxes], dim=1)
    targets[0, 1:] = float("nan")
    return {"num_classes": 3}, torch.cat([torch.randn(batch_size, 3), torch.rand(batch_size, 4)], dim=1), targets


@register_metric(example=_box_example)
class BoxMetrics(Metric):
    """Classification + one box: :class:`ClassificationMetrics`' keys, the mean box IoU and localisation accuracy.

    Outputs: a :class:`~cvkit.models.tasks.ClassBoxModel` tensor ``(B, C + 4)`` (logits, xyxy box),
    or ``{"class", "box"}`` / ``(class, box)``. Targets: ``(B, 5)`` = class index then xyxy box,
    or the same dict/tuple form. ``loc_acc@<t>`` (``t`` = ``loc_threshold``) is the ImageNet
    localisation rule: the fraction of samples whose predicted class is right and whose box has
    IoU >= t with the target box. Samples whose target box is NaN (no box, or cropped away) are
    left out of both ``box_iou`` and ``loc_acc`` (numerator and denominator): a box that cannot be
    scored is neither a hit nor a miss; they still count in the classification keys.
    """

    name = "box"

    def __init__(self, num_classes: int, loc_threshold: float = 0.5) -> None:
        if not 0 < loc_threshold <= 1:
            raise ValueError(f"loc_threshold is an IoU in (0, 1], got {loc_threshold}")
        self.classes = ClassificationMetrics(num_classes)
        self.num_classes = num_classes
        self.loc_threshold = float(loc_threshold)
        self.loc_key = f"loc_acc@{self.loc_threshold:g}"
        self.reset()

    def reset(self) -> None:
        self.classes.reset()
        self.iou = torch.zeros(3, dtype=torch.float64)  # sum of IoU, number of boxes, boxes located

    def update(self, outputs: object, targets: object) -> None:
        logits, box = CLASS_BOX.parts(outputs, self.num_classes)
        label, true_box = CLASS_BOX.parts(targets, targets=True)
        label = label.detach().cpu()
        label = label.argmax(dim=1) if label.ndim == 2 else label.long()
        self.classes.update(logits, label)
        box, true_box = box.detach().double().cpu(), true_box.detach().double().cpu()
        present = torch.isfinite(true_box).all(dim=1)
        iou = box_iou(box[present], true_box[present])
        right = logits.detach().argmax(dim=1).cpu()[present] == label[present]
        located = (right & (iou >= self.loc_threshold)).sum().double()
        self.iou += torch.stack([iou.sum(), present.sum().double(), located])

    def state_tensors(self) -> List[torch.Tensor]:
        return [*self.classes.state_tensors(), self.iou]

    def keys(self) -> List[str]:
        return [*self.classes.keys(), "box_iou", self.loc_key]

    def compute(self) -> Dict[str, float]:
        out = self.classes.compute()
        total, count, located = self.iou.tolist()
        out["box_iou"] = total / count if count else 0.0
        out[self.loc_key] = located / count if count else 0.0
        return out


Size = Union[int, Tuple[int, int]]


def _keypoint_example(batch_size: int) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
    targets = torch.rand(batch_size, 6)
    targets[0, :2] = float("nan")
    return {"image_size": (16, 24), "norm_points": (1, 2)}, torch.rand(batch_size, 6), targets


@register_metric(example=_keypoint_example)
class KeypointMetrics(Metric):
    """Keypoint error in pixels and normalised, over the points whose target is present (not NaN).

    Outputs and targets are ``(B, 2N)`` as x0, y0, x1, y1... in [0, 1] of the image (the
    :class:`~cvkit.models.tasks.KeypointModel` convention). ``image_size`` (int or (H, W)) turns
    them into pixels of the original image; :meth:`update` also takes ``sizes`` (B, 2) as (W, H)
    per sample when images differ in size. The normalised error of a sample is its mean error
    divided by the distance between target points ``norm_points`` (e.g. the two eye centres), or
    by the image diagonal when None; samples without that distance are left out of it.

    Gives ``mean_error_px`` (mean Euclidean error over present points), ``nme`` (mean over samples)
    and ``rmse_px``, the Facial Keypoints Detection leaderboard score: the square root of the mean
    squared pixel error over every present x and every present y coordinate, each coordinate
    counted on its own.
    """

    name = "keypoint"
    lower_is_better = ("mean_error_px", "nme", "rmse_px")

    def __init__(self, image_size: Size, norm_points: Optional[Tuple[int, int]] = None) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height <= 0 or width <= 0:
            raise ValueError(f"image_size must be positive, got {image_size!r}")
        self.width, self.height = float(width), float(height)
        self.norm_points = None if norm_points is None else (int(norm_points[0]), int(norm_points[1]))
        self.reset()

    def reset(self) -> None:
        # error px, points, nme, samples with nme, squared coordinate error px, present coordinates
        self.sums = torch.zeros(6, dtype=torch.float64)

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
        coordinate = torch.isfinite(true)
        squared = torch.where(coordinate, ((pred - true) * scale) ** 2, torch.zeros(()).double())
        self.sums += torch.stack([error.sum(), count.sum().double(), nme.sum(), usable.sum().double(),
                                  squared.sum(), coordinate.sum().double()])

    def state_tensors(self) -> List[torch.Tensor]:
        return [self.sums]

    def keys(self) -> List[str]:
        return ["mean_error_px", "nme", "rmse_px"]

    def compute(self) -> Dict[str, float]:
        error, points, nme, samples, squared, coordinates = self.sums.tolist()
        return {"mean_error_px": error / points if points else float("nan"),
                "nme": nme / samples if samples else float("nan"),
                "rmse_px": math.sqrt(squared / coordinates) if coordinates else float("nan")}


def _segmentation_example(batch_size: int) -> Tuple[Dict[str, Any], torch.Tensor, torch.Tensor]:
    kwargs = {"num_classes": 2, "class_names": ["scratch", "dent"]}
    return kwargs, torch.randn(batch_size, 2, 8, 8), (torch.rand(batch_size, 2, 8, 8) > 0.5).float()


@register_metric(example=_segmentation_example)
class SegmentationMetrics(Metric):
    """Pixel Dice and IoU per class and their mean, and the per-image Dice that Severstal scores.

    Outputs are logits ``(B, C, H, W)`` (sigmoid, then ``threshold``), targets 0/1 masks of the same
    shape (``(B, H, W)`` when C = 1). ``dice``/``iou``: true/false positive/negative pixels summed
    over all images, reduced once; a class neither present nor predicted anywhere scores 1.
    ``dice_image``: the Severstal leaderboard rule, Dice ``2|P & T| / (|P| + |T|)`` of every
    (image, class) pair, 1 where both are empty, averaged over all pairs; only each class's sum of
    pair scores and pair count are kept. Keys: ``dice``, ``iou``, ``dice_image``, then per class
    ``dice_<name>``, ``iou_<name>``, ``dice_image/<name>`` with names ``class_names`` or 1..C
    (Severstal's ``ClassId``).
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
        if "image" in names:
            raise ValueError(f"class_names {names}: a class named 'image' would make its dice_image key the mean's; "
                             "rename it")
        self.num_classes, self.threshold, self.class_names = num_classes, threshold, names
        self.reset()

    def reset(self) -> None:
        self.stats = torch.zeros(3, self.num_classes, dtype=torch.float64)  # tp, fp, fn per class
        self.image_dice = torch.zeros(2, self.num_classes, dtype=torch.float64)  # sum of pair Dice, pairs

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if targets.ndim == outputs.ndim - 1:
            targets = targets.unsqueeze(1)
        if outputs.shape != targets.shape or outputs.shape[1] != self.num_classes:
            raise ValueError(f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} must both be "
                             f"(B, {self.num_classes}, H, W)")
        pred = torch.sigmoid(outputs.detach().float()) > self.threshold
        true = targets.detach() > 0.5
        pixels = list(range(2, outputs.ndim))
        tp = (pred & true).sum(dim=pixels).double()  # (B, C)
        fp = (pred & ~true).sum(dim=pixels).double()
        fn = (~pred & true).sum(dim=pixels).double()
        self.stats += torch.stack([tp.sum(dim=0), fp.sum(dim=0), fn.sum(dim=0)]).cpu()
        denominator = 2 * tp + fp + fn
        pair = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
        self.image_dice += torch.stack([pair.sum(dim=0), torch.full_like(pair[0], len(pair))]).cpu()

    def state_tensors(self) -> List[torch.Tensor]:
        return [self.stats, self.image_dice]

    def keys(self) -> List[str]:
        per_class = (key for name in self.class_names for key in (f"dice_{name}", f"iou_{name}", f"dice_image/{name}"))
        return ["dice", "iou", "dice_image", *per_class]

    def compute(self) -> Dict[str, float]:
        tp, fp, fn = self.stats
        denominator = 2 * tp + fp + fn
        dice = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(tp))
        iou = torch.where(denominator > 0, tp / (tp + fp + fn).clamp(min=1), torch.ones_like(tp))
        total, pairs = self.image_dice
        image = torch.where(pairs > 0, total / pairs.clamp(min=1), torch.full_like(total, float("nan")))
        out = {"dice": float(dice.mean()), "iou": float(iou.mean()),
               "dice_image": float(total.sum() / pairs.sum()) if pairs.sum() else float("nan")}
        for name, d, j, m in zip(self.class_names, dice.tolist(), iou.tolist(), image.tolist()):
            out[f"dice_{name}"], out[f"iou_{name}"], out[f"dice_image/{name}"] = d, j, m
        return out

