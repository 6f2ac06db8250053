"""YAML experiments: load, override, validate and resolve to the plain form saved as config.json.

An experiment names its ingredients inline or by a registered version (``optimizer: adam_v1``,
see :mod:`cvkit.registry`). Every key is checked: an unknown key or name is an error that names
the place (``stages[1].optimizer``) and the nearest valid spelling, never silently ignored.
Resolving is idempotent, so a run's saved ``config.json`` loads and runs again as it is.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Union

import yaml

from cvkit.registry import get_version
from cvkit.stages import Stage, list_optimizers, list_schedulers

TOP_LEVEL: Dict[str, Any] = {
    "name": str,
    "task": str,
    "data": dict,
    "model": (str, dict),
    "augmentation": (str, dict, type(None)),
    "criterion": (str, dict),
    "optimizer": (str, dict, type(None)),
    "scheduler": (str, dict, type(None)),
    "stages": list,
    "valid_metric": str,
    "minimize_valid_metric": bool,
    "seed": int,
    "logdir": str,
    "weights": (str, type(None)),
    "engine": (str, type(None)),
    "workers": int,
    "fast": dict,
    "profile": bool,
}
REQUIRED = ("task", "data", "model", "stages")
TASKS = ("classification", "class_box", "keypoints", "segmentation")
STAGE_KEYS = [f.name for f in dataclasses.fields(Stage)]
OPTIMIZER_KEYS = {"name", "weight_decay"}
SCHEDULER_KEYS = {"name", "interval", "monitor"}


class ConfigError(ValueError):
    """An experiment file or override is wrong; the message names the key and what was expected."""


def _near(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_config(source: Union[str, Path, Mapping[str, Any]], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a YAML/JSON experiment (or take a dict), apply ``key.sub=value`` overrides, resolve it."""
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"experiment file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return resolve(raw)


def apply_override(config: Dict[str, Any], item: str) -> None:
    """Set ``a.b.0.c=value`` in place; the value is parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    dotted, _, text = item.partition("=")
    parts = dotted.strip().split(".")
    value = yaml.safe_load(text)
    node: Any = config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted!r}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node:
                    raise ConfigError(f"override {dotted!r}: no key {where!r}{_near(part, node)}")
                node = node[part]
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:depth])} is a value, not a mapping or list")


def resolve(raw: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate every key and expand named versions; the result is plain data (JSON-able)."""
    config = copy.deepcopy(dict(raw))
    for key, value in config.items():
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown key {key!r}{_near(key, TOP_LEVEL)} valid keys: {sorted(TOP_LEVEL)}")
        if not isinstance(value, TOP_LEVEL[key]) or (TOP_LEVEL[key] is int and isinstance(value, bool)):
            expected = TOP_LEVEL[key]
            names = [t.__name__ for t in expected] if isinstance(expected, tuple) else [expected.__name__]
            raise ConfigError(f"{key}: expected {' or '.join(names)}, got {type(value).__name__} {value!r}")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ConfigError(f"missing required keys {missing}")
    if config["task"] not in TASKS:
        raise ConfigError(f"task: unknown task {config['task']!r}{_near(config['task'], TASKS)} valid: {list(TASKS)}")
    for kind in ("model", "criterion", "augmentation", "data"):
        if isinstance(config.get(kind), str):
            config[kind] = get_version_or_error(kind, config[kind], kind)
    defaults = {k: config.pop(k) for k in ("optimizer", "scheduler") if k in config}
    if not config["stages"]:
        raise ConfigError("stages: at least one stage is needed")
    config["stages"] = [_resolve_stage(i, s, defaults) for i, s in enumerate(config["stages"])]
    return config


def get_version_or_error(kind: str, name: str, where: str) -> Dict[str, Any]:
    try:
        return get_version(kind, name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None


def _resolve_stage(index: int, raw: Any, defaults: Mapping[str, Any]) -> Dict[str, Any]:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (name, epochs, ...), got {type(raw).__name__}")
    stage = dict(raw)
    for key in stage:
        if key not in STAGE_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_near(key, STAGE_KEYS)} valid: {STAGE_KEYS}")
    for kind, names, own_keys in (("optimizer", list_optimizers(), OPTIMIZER_KEYS), ("scheduler", list_schedulers(), SCHEDULER_KEYS)):
        spec = stage.get(kind, defaults.get(kind))
        if kind == "optimizer" and spec is None:
            spec = "adamw"
        if spec is None:
            stage[kind] = None
            continue
        if isinstance(spec, str) and spec not in names:
            spec = get_version_or_error(kind, spec, f"{where}.{kind}")
        if isinstance(spec, dict):
            spec = dict(spec)
            name = spec.pop("name", None)
            if name not in names:
                raise ConfigError(f"{where}.{kind}: unknown {kind} {name!r}{_near(str(name), names)} valid: {names}")
            stage[kind] = name
            kwargs = stage.setdefault(f"{kind}_kwargs", {})
            for key, value in spec.items():
                if key in own_keys:
                    stage.setdefault(key, value)
                else:
                    kwargs.setdefault(key, value)
        elif not isinstance(spec, str):
            raise ConfigError(f"{where}.{kind}: expected a name or a mapping, got {type(spec).__name__}")
        else:
            stage[kind] = spec
    try:
        built = Stage(**stage)
    except (TypeError, ValueError, KeyError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise ConfigError(f"{where}: {message}") from None
    return built.to_dict()


def stages_from(config: Mapping[str, Any]) -> List[Stage]:
    """The resolved config's stages as :class:`Stage` objects."""
    return [Stage(**{**s, "monitor": tuple(s["monitor"]) if s.get("monitor") else None}) for s in config["stages"]]


def dumps(config: Mapping[str, Any]) -> str:
    """The resolved config as indented JSON (what ``config.json`` holds)."""
    return json.dumps(config, indent=2, default=list)
