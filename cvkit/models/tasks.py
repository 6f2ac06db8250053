"""Task models beyond plain classification, and one registry to build any of them by name.

* :class:`ClassBoxModel` — class logits + one box, for classification-with-localisation;
* :class:`KeypointModel` — ``N`` (x, y) points normalised to the input image;
* :func:`create_segmentation_model` — an smp model (``Unet``, ``FPN``...) with local weights only.

Each one follows the group contract of :mod:`cvkit.models.groups`: the wrappers name their head
in ``head_names`` and keep the timm network under ``backbone`` (``backbone.layer3`` is a valid
``trainable`` block); smp models are found by their ``decoder`` + ``segmentation_head``.
Nothing downloads: pretrained weights come from a file (``pretrained=True`` looks in
``weights/``, then in installed weight packages, see :func:`cvkit.models.pretrained.resolve_pretrained`).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import timm
import torch
from torch import Tensor, nn

from cvkit.io import load_checkpoint, state_dict_of
from cvkit.models.factory import create_model, load_backbone_weights, start_small
from cvkit.models.pretrained import resolve_pretrained, weights_record
from cvkit.registry import Registry
from cvkit.layouts import BOX_DIMS, CLASS_BOX

Pretrained = Union[bool, str, os.PathLike, None]


def timm_backbone(arch: str, pretrained: Pretrained = None, **timm_kwargs) -> nn.Module:
    """A timm network without classifier (``num_classes=0``): forward gives pooled features.

    ``pretrained`` is None/False (random), True (``weights/<arch>.*`` or packaged weights) or a file
    path; a loaded backbone carries ``cvkit_weights`` (:func:`~cvkit.models.pretrained.weights_record`).
    """
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise KeyError(f"unknown timm architecture arch={arch!r}; close names: {close}")
    timm_kwargs = {k: v for k, v in timm_kwargs.items() if v is not None}
    backbone = timm.create_model(arch, pretrained=False, num_classes=0, **timm_kwargs)
    if pretrained:
        path = resolve_pretrained(arch) if pretrained is True else Path(pretrained)
        load_backbone_weights(backbone, path)
        backbone.cvkit_weights = weights_record(path)
    return backbone


class _BackboneModel(nn.Module):
    """A timm backbone under ``backbone`` whose depth groups (for layer decay) carry the prefix."""

    backbone: nn.Module

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm-style matcher: the backbone's own depth levels, then the heads last."""
        matcher = getattr(self.backbone, "group_matcher", None)
        levels: Dict[str, int] = {}
        if callable(matcher):
            from timm.models import group_parameters

            levels = group_parameters(self.backbone, matcher(coarse=coarse), reverse=True)
        top = max(levels.values(), default=0) + 1

        def match(name: str) -> int:
            if name.startswith("backbone."):
                return levels.get(name[len("backbone."):], top - 1)
            return top

        return match


class ClassBoxModel(_BackboneModel):
    """A timm backbone with a class head and a box head, returning ONE tensor ``(B, C + 4)``.

    Columns ``[:C]`` are class logits, ``[C:]`` the box as ``x1, y1, x2, y2`` in [0, 1] of the
    input image (sigmoid), packed by the layout's codec (:class:`cvkit.layouts.ClassBoxLayout`).
    One tensor keeps Catalyst's callbacks, the runner's ``logits`` key, checkpoints and exports
    unchanged; :func:`split_output` gives the two parts back. The sigmoid does
    not force ``x1 < x2``: the loss teaches it, and TTA's box inverse re-sorts corners.
    """

    def __init__(self, arch: str, num_classes: int, pretrained: Pretrained = None, dropout: float = 0.0, **timm_kwargs) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        self.num_classes = num_classes
        self.backbone = timm_backbone(arch, pretrained, **timm_kwargs)
        self.num_features = self.backbone.num_features
        self.drop = nn.Dropout(dropout)
        self.cls_head = start_small(nn.Linear(self.num_features, num_classes))
        self.box_head = start_small(nn.Linear(self.num_features, BOX_DIMS))
        self.head_names = ("cls_head", "box_head")

    def forward(self, x: Tensor) -> Tensor:
        features = self.drop(self.backbone(x))
        return CLASS_BOX.join({"class": self.cls_head(features), "box": torch.sigmoid(self.box_head(features))})


def split_output(out: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """``(logits (B, C), boxes (B, 4))`` from a :class:`ClassBoxModel` output ``(B, C + 4)``."""
    if out.ndim != 2:
        raise ValueError(f"out must be (B, num_classes + 4) for num_classes={num_classes}, got {tuple(out.shape)}")
    parts = CLASS_BOX.split(out, num_classes)
    return parts["class"], parts["box"]


class KeypointModel(_BackboneModel):
    """A timm backbone regressing ``num_keypoints`` points: output ``(B, 2N)`` as x0, y0, x1, y1...

    Coordinates are normalised to [0, 1] of the input image (sigmoid; 0 is the left/top edge,
    1 the right/bottom edge), so they do not depend on the image size a stage trains at.
    """

    def __init__(self, arch: str, num_keypoints: int, pretrained: Pretrained = None, dropout: float = 0.0, **timm_kwargs) -> None:
        super().__init__()
        _check_positive("num_keypoints", num_keypoints)
        self.num_keypoints = num_keypoints
        self.backbone = timm_backbone(arch, pretrained, **timm_kwargs)
        self.num_features = self.backbone.num_features
        self.drop = nn.Dropout(dropout)
        self.head = start_small(nn.Linear(self.num_features, 2 * num_keypoints))
        self.head_names = ("head",)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.drop(self.backbone(x))))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


CLASSIFIER_KEYS = ("fc", "classifier", "head", "last_linear")


def create_segmentation_model(
    encoder: str,
    num_classes: int,
    architecture: str = "Unet",
    encoder_weights_path: Union[str, os.PathLike, None] = None,
    **smp_kwargs,
) -> nn.Module:
    """An smp segmentation model giving logits ``(B, num_classes, H, W)``; never downloads.

    Args:
        encoder: an smp encoder (``resnet18``, ``efficientnet-b0``...) or ``tu-<timm name>``.
        num_classes: output channels.
        architecture: smp class name, case-insensitive (``Unet``, ``FPN``, ``UnetPlusPlus``...).
        encoder_weights_path: a local file with encoder weights: smp's encoder state_dict, or a
            timm/torchvision backbone checkpoint (its classifier keys are dropped).
        **smp_kwargs: passed to smp (``encoder_depth``, ``decoder_channels``, ``in_channels``...).

    Trainable blocks: ``encoder.layer4`` for smp's own ResNets, ``encoder.model.layer4`` for
    ``tu-`` encoders (timm's network sits under ``encoder.model``). With ``encoder_depth < 5``
    smp keeps the encoder stages it never runs; they are replaced by ``nn.Identity`` here
    (listed in ``model.unused_encoder_modules``) so that no parameter lacks a gradient.
    """
    import segmentation_models_pytorch as smp

    _check_positive("num_classes", num_classes)
    archs = smp.MODEL_ARCHITECTURES_MAPPING
    if architecture.lower() not in archs:
        names = [a.__name__ for a in archs.values()]
        close = difflib.get_close_matches(architecture, names, n=3, cutoff=0.4)
        raise KeyError(f"unknown smp architecture={architecture!r}; close: {close}; valid: {names}")
    _check_encoder(encoder, smp.encoders.get_encoder_names())
    if smp_kwargs.pop("encoder_weights", None) is not None:
        raise ValueError("encoder_weights would download; pass encoder_weights_path=<local file> instead")
    model = smp.create_model(architecture, encoder_name=encoder, encoder_weights=None, classes=num_classes, **smp_kwargs)
    if encoder_weights_path is not None:
        load_encoder_weights(model.encoder, encoder_weights_path)
    model.unused_encoder_modules = _drop_unused_encoder_modules(model.encoder, smp_kwargs.get("encoder_depth", 5))
    return model


def _check_encoder(encoder: str, smp_names: List[str]) -> None:
    if encoder.startswith("tu-"):
        if not timm.is_model(encoder[3:]):
            close = difflib.get_close_matches(encoder[3:], timm.list_models(), n=5, cutoff=0.6)
            raise KeyError(f"unknown timm model in encoder={encoder!r}; close: {['tu-' + c for c in close]}")
    elif encoder not in smp_names:
        close = difflib.get_close_matches(encoder, smp_names, n=5, cutoff=0.5)
        raise KeyError(f"unknown smp encoder={encoder!r}; close: {close} (or any timm model as 'tu-<name>')")


def load_encoder_weights(encoder: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Load a local weight file into an smp encoder; a ValueError names the file and bad keys.

    Accepts the encoder's own state_dict, or a backbone checkpoint whose keys lack the ``model.``
    prefix of ``tu-`` encoders; classifier keys (``fc``, ``classifier``, ``head``) are ignored.
    """
    state = state_dict_of(load_checkpoint(path), path)
    own = encoder.state_dict()
    if own and all(k.startswith("model.") for k in own) and not any(k.startswith("model.") for k in state):
        state = {f"model.{k}": v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in own or not _is_classifier_key(k)}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"encoder weights in {path} do not fit {type(encoder).__name__}: shape mismatch {mismatched[:5]}, "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    nn.Module.load_state_dict(encoder, state, strict=True)


def _is_classifier_key(key: str) -> bool:
    parts = key.split(".")
    return (parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]) in CLASSIFIER_KEYS


def _drop_unused_encoder_modules(encoder: nn.Module, depth: int, size: int = 64) -> List[str]:
    """Replace encoder modules that a forward pass never runs by ``nn.Identity``; return their names."""
    if depth >= 5:
        return []
    ran = set()
    hooks = [m.register_forward_hook(lambda mod, *_: ran.add(id(mod))) for m in encoder.modules()]
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, getattr(encoder, "_in_channels", 3), size, size))
    finally:
        for hook in hooks:
            hook.remove()
        encoder.train(was_training)
    dropped: List[str] = []
    for name, module in list(encoder.named_modules()):
        if not name or any(name.startswith(d + ".") for d in dropped):
            continue
        has_params = any(True for _ in module.parameters())
        if has_params and not any(id(m) in ran for m in module.modules()):
            parent_name, _, attr = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            setattr(parent, attr, nn.Identity())
            dropped.append(name)
    return [f"encoder.{n}" for n in dropped]


# --- registry ---------------------------------------------------------------------------------

TASK_MODELS: Registry[Callable[..., nn.Module]] = Registry("task model")


def register_task_model(
    fn: Optional[Callable[..., nn.Module]] = None, *, name: Optional[str] = None, override: bool = False
) -> Any:
    """Register a model builder under its function name (or ``name``).

    Use as ``@register_task_model`` or ``@register_task_model(name="my_model")``; a taken name
    raises :class:`cvkit.registry.RegistryError` unless ``override=True``.
    """

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        return TASK_MODELS.register(builder, name=name or "", override=override)

    return add(fn) if fn is not None else add


def list_task_models(pattern: str = "*") -> List[str]:
    """Registered task model names matching a shell-style ``pattern``, sorted."""
    return TASK_MODELS.list(pattern)


def create_task_model(name: str, **kwargs) -> nn.Module:
    """Build a registered task model; keyword arguments that are None are dropped (timm's rule)."""
    return TASK_MODELS.create(name, **kwargs)


@register_task_model
def classifier(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """A timm classifier (:func:`cvkit.models.factory.create_model`): logits ``(B, C)``."""
    return create_model(arch, num_classes, **kwargs)


@register_task_model
def class_box(arch: str, num_classes: int, **kwargs) -> nn.Module:
    """:class:`ClassBoxModel`: ``(B, C + 4)`` class logits then an xyxy box in [0, 1]."""
    return ClassBoxModel(arch, num_classes, **kwargs)


@register_task_model
def keypoints(arch: str, num_keypoints: int, **kwargs) -> nn.Module:
    """:class:`KeypointModel`: ``(B, 2N)`` normalised x0, y0, x1, y1..."""
    return KeypointModel(arch, num_keypoints, **kwargs)


@register_task_model
def segmentation(encoder: str, num_classes: int, **kwargs) -> nn.Module:
    """:func:`create_segmentation_model`: logits ``(B, C, H, W)``."""
    return create_segmentation_model(encoder, num_classes, **kwargs)


__all__ = [
    "ClassBoxModel",
    "KeypointModel",
    "TASK_MODELS",
    "create_segmentation_model",
    "create_task_model",
    "list_task_models",
    "load_encoder_weights",
    "register_task_model",
    "split_output",
    "timm_backbone",
]
