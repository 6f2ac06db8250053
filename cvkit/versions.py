"""Named "versions" of experiment ingredients: the one module that holds them.

The localisation project kept ``adam_v1``, ``rop_v1``, model ``v1``/``v2``... as functions; cvkit
keeps that habit: a version is a function returning the inline YAML form of the ingredient, and
an experiment can say ``optimizer: adam_v1`` instead of spelling it out::

    from cvkit.versions import register_version

    @register_version("optimizer")
    def sgd_fast():
        return {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

from cvkit.registry import Registry, RegistryError

KINDS = ("model", "augmentation", "criterion", "optimizer", "scheduler", "data")
VERSIONS: Dict[str, Registry[Callable[[], Dict[str, Any]]]] = {kind: Registry(f"{kind} version") for kind in KINDS}

Version = Callable[[], Dict[str, Any]]


def _registry(kind: str) -> Registry[Version]:
    if kind not in VERSIONS:
        raise RegistryError(f"unknown version kind {kind!r}; valid: {list(KINDS)}")
    return VERSIONS[kind]


def register_version(kind: str, name: str = "", override: bool = False) -> Callable[[Version], Version]:
    """Decorator: the function (no arguments, returns a dict) becomes version ``name`` (default: its name)."""
    registry = _registry(kind)

    def wrap(fn: Version) -> Version:
        return registry.register(fn, name=name, override=override)

    return wrap


def list_versions(kind: str, pattern: str = "*") -> List[str]:
    """Registered version names of one kind."""
    return _registry(kind).list(pattern)


def get_version(kind: str, name: str) -> Dict[str, Any]:
    """A fresh copy of version ``name``'s dict; unknown names list the close ones."""
    value = _registry(kind).get(name)()
    if not isinstance(value, dict):
        raise TypeError(f"{kind} version {name!r} must return a dict, got {type(value).__name__}")
    return copy.deepcopy(value)


@register_version("optimizer")
def adam_v1() -> Dict[str, Any]:
    """Adam, no weight decay (the localisation project's first optimizer)."""
    return {"name": "adam"}


@register_version("optimizer")
def adamw_v1() -> Dict[str, Any]:
    """AdamW with weight decay 1e-4 (the keypoints project)."""
    return {"name": "adamw", "weight_decay": 1e-4}


@register_version("optimizer")
def sgd_v1() -> Dict[str, Any]:
    """SGD, momentum 0.9, Nesterov, weight decay 5e-4 (STL-10)."""
    return {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


@register_version("scheduler")
def rop_v1() -> Dict[str, Any]:
    """ReduceLROnPlateau: factor 0.15, patience 2 (the localisation project)."""
    return {"name": "plateau", "factor": 0.15, "patience": 2}


@register_version("scheduler")
def step_v1() -> Dict[str, Any]:
    """StepLR: x0.8 every 2 epochs (the sports project)."""
    return {"name": "step", "step_size": 2, "gamma": 0.8}


@register_version("scheduler")
def onecycle_v1() -> Dict[str, Any]:
    """One-cycle per batch over the stage."""
    return {"name": "onecycle", "interval": "batch"}


@register_version("model")
def v1() -> Dict[str, Any]:
    """Localisation project, first model: ResNet-34 with a class head and a box head."""
    return {"name": "class_box", "arch": "resnet34", "dropout": 0.2}


@register_version("model")
def v2() -> Dict[str, Any]:
    """Localisation project, second model: EfficientNet-B0 class + box, more dropout."""
    return {"name": "class_box", "arch": "efficientnet_b0", "dropout": 0.3}


@register_version("model")
def tiny_v1() -> Dict[str, Any]:
    """timm's ``test_resnet`` classifier: seconds per epoch on a CPU, for smoke runs."""
    return {"name": "classifier", "arch": "test_resnet"}


@register_version("augmentation")
def light_v1() -> Dict[str, Any]:
    """Light preset (crop 0.8-1, flip, brightness/contrast) at 224 px."""
    return {"preset": "light", "size": 224}


@register_version("augmentation")
def medium_v1() -> Dict[str, Any]:
    """Medium preset (crop, flip, affine, colour, blur) at 224 px."""
    return {"preset": "medium", "size": 224}


@register_version("criterion")
def class_box_v1() -> Dict[str, Any]:
    """Localisation loss: cross-entropy plus 5 x SmoothL1 on the box."""
    return {"name": "class_box", "box_weight": 5.0}


__all__ = ["KINDS", "VERSIONS", "get_version", "list_versions", "register_version"]
