"""Criteria with a per-sample ``reduction="none"``, and helpers that turn any loss into one value per sample.

Selecting samples by their loss (:class:`cvkit.callbacks.loss_range.LossRangeCallback`) needs a
vector of shape ``(B,)``. Every criterion here takes ``reduction="mean" | "none"``; ``"none"``
returns that vector (for boxes, keypoints and masks: the mean over the sample's own elements) and
``"mean"`` is its plain mean, so ``loss(reduction="mean") == loss(reduction="none").mean()``.

    from cvkit.losses import create_criterion, list_criteria
    criterion = create_criterion("keypoint", kind="mse")
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from cvkit.registry import Registry
from cvkit.layouts import CLASS_BOX

Outputs = Union[torch.Tensor, Mapping[str, torch.Tensor], Sequence[torch.Tensor]]
Example = Callable[[int], Tuple[Any, Any]]

_REDUCTIONS = ("mean", "none")
CRITERIA: Registry[Callable[..., nn.Module]] = Registry("criterion")


# Registry -----------------------------------------------------------------------------------

def register_criterion(
    fn: Optional[Callable[..., nn.Module]] = None,
    *,
    name: str = "",
    example: Optional[Example] = None,
    override: bool = False,
) -> Any:
    """Decorator: make a criterion class or factory creatable by name (default: its ``__name__``).

    ``example(batch_size) -> (outputs, targets)`` gives a tiny valid input, kept as the entry's
    ``example`` metadata; the registry tests use it to check every criterion's shapes and
    gradients (a criterion without one is skipped there). A taken name raises
    :class:`cvkit.registry.RegistryError` unless ``override=True``. Works bare
    (``@register_criterion``) or with arguments (``@register_criterion(name="x")``).
    """

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        return CRITERIA.register(factory, name=name, override=override, example=example)

    return wrap(fn) if fn is not None else wrap


def list_criteria(pattern: str = "*") -> List[str]:
    """Registered criterion names matching a shell-style ``pattern``."""
    return CRITERIA.list(pattern)


def create_criterion(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered criterion; ``None`` kwargs are dropped, unknown names list the close ones."""
    return CRITERIA.create(name, **kwargs)


def criterion_example(name: str, batch_size: int = 4) -> Tuple[Any, Any]:
    """A tiny ``(outputs, targets)`` pair the criterion accepts (KeyError if none was registered)."""
    example = CRITERIA.meta(name).get("example")
    if example is None:
        raise KeyError(f"criterion {name!r} registered no example input")
    return example(batch_size)


# Per-sample helpers ---------------------------------------------------------------------------

def per_sample(loss: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce an elementwise loss ``(B, ...)`` to ``(B,)``: the mean over each sample's elements.

    ``mask`` (same shape, True = counts) leaves out missing targets; a sample with no valid
    element gets loss 0 (nothing to learn from it).
    """
    if loss.dim() == 0:
        raise ValueError("per_sample needs a loss with a batch dimension; got a scalar (use reduction='none')")
    flat = loss.reshape(loss.shape[0], -1)
    if mask is None:
        return flat.mean(dim=1)
    if mask.shape != loss.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from loss shape {tuple(loss.shape)}")
    m = mask.reshape(flat.shape).to(flat.dtype)
    total = (torch.where(m > 0, flat, torch.zeros_like(flat)) * m).sum(dim=1)
    return total / m.sum(dim=1).clamp_min(1.0)


def _reduce(per_sample_loss: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_sample_loss if reduction == "none" else per_sample_loss.mean()


def _check_reduction(reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


@contextlib.contextmanager
def _reduction_none(criterion: nn.Module) -> Iterator[None]:
    old = criterion.reduction
    criterion.reduction = "none"
    try:
        yield
    finally:
        criterion.reduction = old


def per_sample_loss(criterion: Callable[..., torch.Tensor], outputs: Outputs, targets: Any) -> torch.Tensor:
    """One loss value per sample from any criterion that has a ``reduction`` attribute.

    cvkit criteria (``returns_per_sample = True``; set it on your own criterion that returns
    ``(B,)`` and handles missing targets itself) are called as they are. Other losses (torch's)
    return an elementwise loss, reduced here by :func:`per_sample`: NaN float targets (missing
    keypoints; replaced by 0 before the call so no NaN gradient appears) and ``ignore_index``
    targets are left out. The criterion's own reduction is restored afterwards.
    """
    if not hasattr(criterion, "reduction"):
        raise TypeError(
            f"{type(criterion).__name__} has no 'reduction' attribute, so per-sample losses cannot be "
            "taken from it; use a cvkit criterion (cvkit.losses.list_criteria()) or a torch loss"
        )
    if getattr(criterion, "returns_per_sample", False):
        with _reduction_none(criterion):
            loss = criterion(outputs, targets)
        if loss.dim() != 1:
            raise ValueError(f"{type(criterion).__name__} with reduction='none' returned shape {tuple(loss.shape)}, expected (B,)")
        return loss
    mask = None
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        missing = torch.isnan(targets)
        if bool(missing.any()):
            mask = ~missing
            targets = torch.where(missing, torch.zeros_like(targets), targets)
    with _reduction_none(criterion):
        loss = criterion(outputs, targets)
    if loss.dim() == 0:
        raise ValueError(f"{type(criterion).__name__} returned a scalar with reduction='none'")
    if mask is not None and mask.shape != loss.shape:
        mask = None
    if loss.dim() == 1:  # already one value per sample (torch gives ignored targets 0)
        return loss if mask is None else torch.where(mask, loss, torch.zeros_like(loss))
    ignore = getattr(criterion, "ignore_index", None)
    if mask is None and ignore is not None and isinstance(targets, torch.Tensor) and targets.shape == loss.shape:
        mask = targets != ignore
    return per_sample(loss, mask)


# Criteria -----------------------------------------------------------------------------------

def _classification_example(batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 5), torch.randint(0, 5, (batch_size,))


def class_weight_tensor(weight: Any, what: str = "weight") -> Optional[torch.Tensor]:
    """Class weights from YAML/JSON (a list of numbers) or Python (a tensor) as a float tensor; None stays None."""
    if weight is None or isinstance(weight, torch.Tensor):
        return None if weight is None else weight.float()
    if isinstance(weight, str):
        raise ValueError(f"{what}={weight!r}: a named weighting ('balanced') must be resolved from the train "
                         "labels first (cvkit.losses.balanced_class_weights); here a list of numbers is expected")
    try:
        tensor = torch.as_tensor([float(v) for v in weight], dtype=torch.float32)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of numbers, one per class; got {weight!r}") from None
    if tensor.dim() != 1 or not len(tensor) or not bool(torch.isfinite(tensor).all()) or bool((tensor < 0).any()):
        raise ValueError(f"{what} must be a non-empty list of finite numbers >= 0, one per class; got {weight!r}")
    return tensor


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> List[float]:
    """Inverse-frequency class weights ``n / (num_classes * count_c)`` (sklearn's "balanced"): 1.0 for
    every class of a balanced set; a class absent from ``labels`` gets 0 (nothing to weigh)."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long).flatten(), minlength=num_classes)
    if len(counts) > num_classes:
        raise ValueError(f"labels hold class {len(counts) - 1}, but num_classes is {num_classes}")
    total = float(counts.sum())
    if total == 0:
        raise ValueError("balanced class weights need at least one label")
    return [total / (num_classes * float(c)) if c else 0.0 for c in counts.tolist()]


@register_criterion(name="cross_entropy", example=_classification_example)
def cross_entropy(reduction: str = "mean", weight: Any = None, **kwargs: Any) -> nn.Module:
    """torch's ``nn.CrossEntropyLoss`` (``weight``, ``label_smoothing``, ``ignore_index`` pass through).

    ``weight`` may be a list (YAML). Targets may be class indices or class probabilities (mixup).
    Note: with class ``weight`` torch's ``"mean"`` is a weighted mean, not the mean of ``"none"``.
    """
    return nn.CrossEntropyLoss(reduction=_check_reduction(reduction), weight=class_weight_tensor(weight), **kwargs)


@register_criterion(name="focal", example=_classification_example)
class FocalLoss(nn.Module):
    """Softmax focal loss: ``-sum_c w_c t_c (1 - p_c)^gamma log p_c`` per sample (Lin et al., 2017).

    Targets: class indices ``(B,)`` or probabilities ``(B, C)`` (mixup). ``weight`` (a list or a
    tensor, one per class) weighs each class; ``gamma=0`` is cross-entropy. ``"mean"`` is the plain
    mean of the per-sample losses; a target equal to ``ignore_index`` gives loss 0.
    """

    returns_per_sample = True

    def __init__(self, reduction: str = "mean", gamma: float = 2.0, weight: Any = None,
                 label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
            raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.gamma, self.label_smoothing, self.ignore_index = float(gamma), float(label_smoothing), int(ignore_index)
        self.register_buffer("weight", class_weight_tensor(weight), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits.float(), dim=1)
        valid = None
        if targets.dim() == 1 and not targets.is_floating_point():
            valid = targets != self.ignore_index
            probs = F.one_hot(torch.where(valid, targets, 0).long(), num_classes).to(log_p.dtype)
        else:
            probs = targets.to(log_p.dtype)
        if self.label_smoothing:
            probs = probs * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        if self.weight is not None:
            probs = probs * self.weight.to(log_p.device)
        loss = -(probs * (1 - log_p.exp()).pow(self.gamma) * log_p).sum(dim=1)
        if valid is not None:
            loss = torch.where(valid, loss, torch.zeros_like(loss))
        return _reduce(loss.to(logits.dtype), self.reduction)


@register_criterion(name="bce_one_hot", example=_classification_example)
class BCEOneHotLoss(nn.Module):
    """Binary cross-entropy on one-hot class targets (the "sigmoid head" for single-label tasks).

    Targets: class indices ``(B,)`` or soft/multi-label ``(B, C)`` floats. ``label_smoothing``
    moves one-hot targets to ``eps/C`` and ``1 - eps + eps/C``. Per sample: mean over classes.
    """

    returns_per_sample = True

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0, pos_weight: Any = None) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", class_weight_tensor(pos_weight, "pos_weight"), persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1 and not targets.is_floating_point():
            num_classes = logits.shape[1]
            targets = F.one_hot(targets.long(), num_classes).to(logits.dtype)
            if self.label_smoothing:
                targets = targets * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=self.pos_weight, reduction="none")
        return _reduce(per_sample(loss), self.reduction)


def _class_box_example(batch_size: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    boxes = torch.rand(batch_size, 4)
    boxes[0] = float("nan")
    return (
        {"class": torch.randn(batch_size, 3), "box": torch.rand(batch_size, 4)},
        {"class": torch.randint(0, 3, (batch_size,)), "box": boxes},
    )


@register_criterion(name="class_box", example=_class_box_example)
class ClassBoxLoss(nn.Module):
    """Class + one box: CE (or BCE on one-hot) on the class plus ``box_weight`` x SmoothL1 on the box.

    ``forward(outputs, targets)``: each is a dict ``{"class": ..., "box": ...}`` or a 2-tuple
    ``(class, box)``. Class outputs are logits ``(B, C)``, class targets indices ``(B,)``; boxes
    are ``(B, 4)`` numbers in [0, 1] (any fixed convention, e.g. normalised xyxy) taken as the model
    gives them (put a sigmoid in the model's head if it should be bounded). A NaN target box
    (image without a box) adds no box loss for that sample.
    """

    returns_per_sample = True

    def __init__(
        self,
        reduction: str = "mean",
        class_loss: str = "ce",
        box_weight: float = 1.0,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        if class_loss not in ("ce", "bce"):
            raise ValueError(f"class_loss must be 'ce' or 'bce', got {class_loss!r}")
        self.class_loss = class_loss
        self.box_weight, self.beta, self.label_smoothing = float(box_weight), float(beta), float(label_smoothing)
        self._bce = BCEOneHotLoss(reduction="none", label_smoothing=label_smoothing)

    def forward(self, outputs: Outputs, targets: Any) -> torch.Tensor:
        class_logits, box = CLASS_BOX.parts(outputs)
        class_target, box_target = CLASS_BOX.parts(targets, targets=True)
        if self.class_loss == "ce":
            cls = F.cross_entropy(class_logits, class_target.long(), reduction="none", label_smoothing=self.label_smoothing)
        else:
            cls = self._bce(class_logits, class_target)
        valid = ~torch.isnan(box_target)
        box_target = torch.where(valid, box_target, box.detach())
        box_loss = per_sample(F.smooth_l1_loss(box, box_target.to(box.dtype), beta=self.beta, reduction="none"), valid)
        return _reduce(cls + self.box_weight * box_loss, self.reduction)


def _keypoint_example(batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    targets = torch.rand(batch_size, 5, 2)
    targets[0, 1] = float("nan")
    return torch.rand(batch_size, 5, 2), targets


@register_criterion(name="keypoint", example=_keypoint_example)
class KeypointLoss(nn.Module):
    """SmoothL1 (``kind="smooth_l1"``) or MSE (``"mse"``) on keypoint coordinates, NaN targets masked.

    Outputs and targets have the same shape, e.g. ``(B, K, 2)`` or ``(B, 2K)``; a missing point is
    NaN in the target. Per sample: the mean over its present coordinates (0 if none is present).
    """

    returns_per_sample = True

    def __init__(self, reduction: str = "mean", kind: str = "smooth_l1", beta: float = 0.05) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        if kind not in ("smooth_l1", "mse"):
            raise ValueError(f"kind must be 'smooth_l1' or 'mse', got {kind!r}")
        self.kind, self.beta = kind, float(beta)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if outputs.shape != targets.shape:
            raise ValueError(f"keypoint outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in shape")
        valid = ~torch.isnan(targets)
        targets = torch.where(valid, targets, outputs.detach()).to(outputs.dtype)
        if self.kind == "mse":
            loss = F.mse_loss(outputs, targets, reduction="none")
        else:
            loss = F.smooth_l1_loss(outputs, targets, beta=self.beta, reduction="none")
        return _reduce(per_sample(loss, valid), self.reduction)


def _segmentation_example(batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch_size, 2, 8, 8), (torch.rand(batch_size, 2, 8, 8) > 0.5).float()


@register_criterion(name="dice_bce", example=_segmentation_example)
class DiceBCELoss(nn.Module):
    """Segmentation: ``dice_weight`` x per-sample soft Dice + ``bce_weight`` x per-sample BCE.

    Binary/multi-label: logits ``(B, C, H, W)`` and 0/1 targets of the same shape (``(B, H, W)``
    when C = 1). Multi-class: integer targets ``(B, H, W)`` with C > 1 use softmax Dice and CE.
    Unlike smp's ``DiceLoss`` (which sums over the batch), the Dice here is each image's own:
    mean over classes of ``1 - (2|p t| + smooth) / (|p| + |t| + smooth)``.
    """

    returns_per_sample = True

    def __init__(self, reduction: str = "mean", dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction)
        self.dice_weight, self.bce_weight, self.smooth = float(dice_weight), float(bce_weight), float(smooth)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        multiclass = not targets.is_floating_point() and logits.shape[1] > 1 and targets.dim() == logits.dim() - 1
        if multiclass:
            probs = logits.softmax(dim=1)
            onehot = F.one_hot(targets.long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)
            pixel = per_sample(F.cross_entropy(logits, targets.long(), reduction="none"))
        else:
            if targets.dim() == logits.dim() - 1:
                targets = targets.unsqueeze(1)
            onehot = targets.to(logits.dtype)
            probs = logits.sigmoid()
            pixel = per_sample(F.binary_cross_entropy_with_logits(logits, onehot, reduction="none"))
        dims = tuple(range(2, logits.dim()))
        inter = (probs * onehot).sum(dims)
        total = probs.sum(dims) + onehot.sum(dims)
        dice = 1 - (2 * inter + self.smooth) / (total + self.smooth)
        return _reduce(self.dice_weight * dice.mean(dim=1) + self.bce_weight * pixel, self.reduction)


class ClassBoxCriterion(nn.Module):
    """:class:`ClassBoxLoss` on a ClassBoxModel's ``(B, C + 4)`` output and ``(B, 5)`` targets (class, box).

    Built around ``loss`` (a configured :class:`ClassBoxLoss`) or a new one from ``box_weight``,
    ``reduction`` and ``kwargs``. ``box_weight`` and ``reduction`` pass through to it, so a callback
    can change the box weight between stages and the loss-range callback can ask for per-sample losses.
    """

    returns_per_sample = True

    def __init__(self, num_classes: int, box_weight: float = 1.0, reduction: str = "mean",
                 loss: Optional[nn.Module] = None, **kwargs: Any) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.loss = loss if loss is not None else ClassBoxLoss(reduction=reduction, box_weight=box_weight, **kwargs)

    @property
    def reduction(self) -> str:
        return self.loss.reduction

    @reduction.setter
    def reduction(self, value: str) -> None:
        self.loss.reduction = value

    @property
    def box_weight(self) -> float:
        return self.loss.box_weight

    @box_weight.setter
    def box_weight(self, value: float) -> None:
        self.loss.box_weight = float(value)

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        label, box = CLASS_BOX.split_targets(targets)
        return self.loss(CLASS_BOX.split(outputs, self.num_classes), {"class": label.long(), "box": box})


__all__ = [
    "BCEOneHotLoss",
    "CRITERIA",
    "ClassBoxCriterion",
    "ClassBoxLoss",
    "balanced_class_weights",
    "class_weight_tensor",
    "DiceBCELoss",
    "FocalLoss",
    "KeypointLoss",
    "create_criterion",
    "criterion_example",
    "cross_entropy",
    "list_criteria",
    "per_sample",
    "per_sample_loss",
    "register_criterion",
]
