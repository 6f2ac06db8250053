"""Named "versions" of experiment ingredients, registered by decorator and looked up by name.

The localisation project kept ``adam_v1``, ``rop_v1``, model ``v1``/``v2``... as functions; cvkit
keeps that habit: a version is a function returning the inline YAML form of the ingredient, and
an experiment can say ``optimizer: adam_v1`` instead of spelling it out.

    from cvkit.registry import register_version

    @register_version("optimizer")
    def sgd_fast():
        return {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
"""
from __future__ import annotations

import copy
import difflib
import warnings
from typing import Any, Callable, Dict, List

KINDS = ("model", "augmentation", "criterion", "optimizer", "scheduler", "data")

_VERSIONS: Dict[str, Dict[str, Callable[[], Dict[str, Any]]]] = {kind: {} for kind in KINDS}


def register_version(kind: str, name: str = "") -> Callable[[Callable[[], Dict[str, Any]]], Callable[[], Dict[str, Any]]]:
    """Decorator: the function (no arguments, returns a dict) becomes version ``name`` (default: its name)."""
    if kind not in _VERSIONS:
        raise KeyError(f"unknown version kind {kind!r}; valid: {list(KINDS)}")

    def wrap(fn: Callable[[], Dict[str, Any]]) -> Callable[[], Dict[str, Any]]:
        key = name or fn.__name__
        if key in _VERSIONS[kind]:
            warnings.warn(f"{kind} version {key!r} is registered again; the new one replaces the old", stacklevel=2)
        _VERSIONS[kind][key] = fn
        return fn

    return wrap


def list_versions(kind: str) -> List[str]:
    """Registered version names of one kind."""
    if kind not in _VERSIONS:
        raise KeyError(f"unknown version kind {kind!r}; valid: {list(KINDS)}")
    return sorted(_VERSIONS[kind])


def get_version(kind: str, name: str) -> Dict[str, Any]:
    """A fresh copy of version ``name``'s dict; unknown names list the close ones."""
    versions = _VERSIONS.get(kind)
    if versions is None:
        raise KeyError(f"unknown version kind {kind!r}; valid: {list(KINDS)}")
    if name not in versions:
        close = difflib.get_close_matches(name, list(versions), n=3, cutoff=0.5)
        hint = f"; did you mean {close}?" if close else ""
        raise KeyError(f"unknown {kind} version {name!r}{hint} registered: {sorted(versions)}")
    value = versions[name]()
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
