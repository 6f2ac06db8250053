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
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import yaml

from cvkit.errors import ConfigError
from cvkit.engines import ENGINES
from cvkit.loggers import DEFAULT_LOGGERS, logger_specs, require_packages
from cvkit.versions import get_version
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
    "pipelines": (dict, type(None)),
    "loggers": list,
}
REQUIRED = ("task", "data", "model", "stages")
# Facts StagedRunner writes into config.json next to the experiment; not experiment keys.
RUNNER_KEYS = ("loaders", "valid", "fast_paths", "versions", "started", "resumed_with_changes", "pretrained_weights")
AUGMENTATION_KEYS = {"preset", "size", "normalize"}
STAGE_KEYS = [f.name for f in dataclasses.fields(Stage)]
OPTIMIZER_KEYS = {"name", "weight_decay"}
SCHEDULER_KEYS = {"name", "interval", "monitor"}


def _near(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def read_mapping(path: Union[str, Path], what: str = "experiment file (YAML)") -> Dict[str, Any]:
    """A YAML or JSON file whose top level is a mapping (:func:`cvkit.io.read_mapping`), errors as ConfigError."""
    from cvkit.io import read_mapping as read

    try:
        return read(path, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_config(source: Union[str, Path, Mapping[str, Any]], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a YAML/JSON experiment (or take a dict), apply ``key.sub=value`` overrides, resolve it."""
    raw = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else read_mapping(source)
    for item in overrides:
        apply_override(raw, item)
    return resolve(raw)


def apply_override(config: Dict[str, Any], item: str) -> None:
    """Set ``a.b.0.c=value`` in place; the value is parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    dotted, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not a YAML value"
        raise ConfigError(f"override {item!r}: the value {text!r} is not valid YAML ({problem}); "
                          "quote strings, close brackets") from None
    set_key(config, dotted.strip(), value)


def set_key(config: Dict[str, Any], dotted: str, value: Any, existing: bool = False, what: str = "override") -> None:
    """Set the value at the dotted path ``a.b.0.c`` in place (list items by index).

    A mapping's last key may be new unless ``existing`` (then every key of the path must be there);
    errors name ``what`` and the part of the path at fault.
    """
    parts = dotted.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{what} {dotted!r}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node and (existing or not last):
                raise ConfigError(f"{what} {dotted!r}: no key {where!r}{_near(part, node)}")
            if last:
                node[part] = value
            else:
                node = node[part]
        else:
            raise ConfigError(f"{what} {dotted!r}: {'.'.join(parts[:depth])} is a value, not a mapping or list")


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
    from cvkit.tasks import get_task

    try:
        config["task"] = get_task(config["task"]).name
    except KeyError as exc:
        raise ConfigError(f"task: {exc}") from None
    for kind in ("model", "criterion", "augmentation", "data"):
        if isinstance(config.get(kind), str):
            config[kind] = get_version_or_error(kind, config[kind], kind)
    if "loggers" in config:
        try:
            logger_specs(config["loggers"])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
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


def load_experiment(path: Union[str, Path], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Read a YAML experiment or a run's ``config.json``, apply ``key=value`` overrides, resolve.

    A run's ``config.json`` is recognised by the facts the runner adds (``versions``, ``started``),
    which are dropped, and its ``logdir`` is the folder holding it (a copied or moved run continues
    where it is); everything else is checked like a hand-written experiment.
    """
    path = Path(path)
    raw = read_mapping(path)
    if _is_saved_run(raw):
        # A run's own config.json: the run is the folder that holds it, wherever it was moved.
        raw = {k: v for k, v in raw.items() if k not in RUNNER_KEYS}
        raw["logdir"] = str(path.parent)
    raw.setdefault("name", path.stem if path.name != "config.json" else path.parent.name)
    if any(o.startswith("augmentation") or ".image_size=" in o for o in overrides):
        raw.pop("pipelines", None)  # the recorded pipelines no longer describe the run
    try:
        return load_config(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _check_keys(where: str, spec: Mapping[str, Any], valid: Iterable[str]) -> None:
    valid = sorted(valid)
    for key in spec:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}{_near(key, valid)} valid: {valid}")


def _logdir_names(config: Mapping[str, Any], now: Optional[float], parent: Optional[Path]) -> Iterator[Path]:
    """:func:`default_logdir`'s name, then the same with ``_2``, ``_3``... (runs started in one second)."""
    import itertools
    import time

    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    arch = str(model.get("arch") or model.get("encoder") or model.get("name") or "model").replace("/", "-")
    stage = (config.get("stages") or [{}])[0]
    lr = stage.get("lr")
    if isinstance(lr, dict):
        lr = lr.get("head", next(iter(lr.values()), None))
    parts = [time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(now)), arch]
    parts += [f"bs{stage['batch_size']}"] if stage.get("batch_size") else []
    parts += [f"lr{lr:g}"] if isinstance(lr, (int, float)) else []
    folder = (parent if parent is not None else Path("runs") / str(config.get("name", "experiment"))) / "_".join(parts)
    yield folder
    for taken in itertools.count(2):
        yield folder.with_name(f"{folder.name}_{taken}")


def default_logdir(config: Mapping[str, Any], now: Optional[float] = None) -> str:
    """``runs/<name>/<YYYY-MM-DD_HH-MM-SS>_<arch>_bs<batch>_lr<lr>``: a new folder per run, named by
    the time and the first stage's key hyperparameters, so runs compare side by side; ``_2``, ``_3``...
    when taken. A name only: :func:`claim_logdir` creates it."""
    return str(next(folder for folder in _logdir_names(config, now, None) if not folder.exists()))


def claim_logdir(config: Mapping[str, Any], parent: Union[str, Path, None] = None) -> str:
    """Create the folder :func:`default_logdir` names (in ``parent`` when given), exclusively: of two
    runs started in one second, the second gets ``_2`` (never the first one's folder)."""
    names = _logdir_names(config, None, Path(parent) if parent is not None else None)
    while True:
        folder = next(names)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return str(folder)


def saved_run_folder(path: Union[str, Path]) -> Optional[Path]:
    """The run folder when ``path`` is a run's own ``config.json`` (it holds the facts the runner adds:
    ``versions``, ``started``), else None."""
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return None
    return path.parent if _is_saved_run(read_mapping(path)) else None


def _is_saved_run(raw: Mapping[str, Any]) -> bool:
    return "versions" in raw and "started" in raw


def latest_logdir(config: Mapping[str, Any]) -> str:
    """The folder ``runs/<name>/latest`` points to (the newest run of an experiment without a logdir)."""
    link = Path("runs") / str(config.get("name", "experiment")) / "latest"
    if not link.exists():
        raise ConfigError(f"--resume: the experiment names no logdir and {link} does not exist; "
                          "give --set logdir=<the run folder>")
    return str(link.resolve())


def complete(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The resolved experiment with every default written out (what ``config.json`` stores).

    Defaults come from the task (:mod:`cvkit.tasks`): model, criterion, valid metric, and the
    metric's own direction. Does not touch data on disk; the model's sizes (``num_classes``...)
    are filled in by :func:`cvkit.experiment.build` once the data is known.
    """
    from cvkit.metrics import METRICS
    from cvkit.perf import FastPaths
    from cvkit.tasks import get_task

    config = copy.deepcopy(dict(config))
    task = get_task(config["task"])
    config.setdefault("name", "experiment")
    if not config.get("logdir"):
        config["logdir"] = default_logdir(config)
    config.setdefault("seed", 42)
    config.setdefault("engine", None)
    config.setdefault("workers", 0)
    config.setdefault("profile", False)
    config.setdefault("fast", {})
    config.setdefault("loggers", list(DEFAULT_LOGGERS))
    config.setdefault("weights", None)
    config.setdefault("augmentation", None)
    config.setdefault("criterion", {"name": task.criterion})
    if isinstance(config["criterion"], str):
        config["criterion"] = {"name": config["criterion"]}
    config["model"] = dict(config["model"])
    config["model"].setdefault("name", task.model)
    config.setdefault("valid_metric", task.valid_metric)
    metric = METRICS.get(task.metric)
    minimized = config["valid_metric"].startswith("loss") or config["valid_metric"] in getattr(metric, "lower_is_better", ())
    config.setdefault("minimize_valid_metric", minimized)
    data = config["data"]
    kind = data.get("kind")
    if kind not in task.data_kinds:
        raise ConfigError(f"data.kind: {kind!r} is not a data kind of task {task.name!r}"
                          f"{_near(str(kind), task.data_kinds)} valid: {list(task.data_kinds)}")
    _check_keys(f"data ({kind})", data, task.data_keys(kind))
    augmentation = config["augmentation"]
    if isinstance(augmentation, dict) and "transform" not in augmentation:
        _check_keys("augmentation", augmentation, AUGMENTATION_KEYS)
        if "preset" not in augmentation:
            raise ConfigError("augmentation: needs 'preset' (a registered preset name) and 'size', "
                              "or an albumentations serialised pipeline with a 'transform' key")
    _check_keys("fast", config["fast"], FastPaths().to_dict())
    _check_values(config)
    return config


# Network input sides that make sense: below, a backbone's downsampling leaves nothing to see; above,
# one image is larger than any competition's and than a GPU's memory at a useful batch size.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 4096
MODEL_KEYS_ELSEWHERE = {"checkpoint_path": "weights: (a checkpoint or run folder) or model.pretrained: (a file)",
                        "pretrained_cfg_overlay": "model.pretrained: (a local weights file)"}


def _int_at_least(where: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where}: expected an integer >= {low}, got {value!r}")


def _image_size_in_range(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise ConfigError(f"{where}: expected an image size in pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
                          f"got {value!r}")


def _check_values(config: Mapping[str, Any]) -> None:
    """Ranges and types of the values :func:`resolve` cannot check by key alone (before any data is read)."""
    _int_at_least("seed", config["seed"], 0)
    _int_at_least("workers", config["workers"], 0)
    data = config["data"]
    for key in ("limit", "per_class", "num_keypoints", "num_classes"):
        if data.get(key) is not None:
            _int_at_least(f"data.{key}", data[key], 1)
    if "seed" in data:
        _int_at_least("data.seed", data["seed"], 0)
    if data.get("folds") is not None:
        _int_at_least("data.folds", data["folds"], 2)
    fraction = data.get("valid_fraction", 0.2)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"data.valid_fraction: expected a number between 0 and 1 (exclusive), got {fraction!r}")
    for key, instead in MODEL_KEYS_ELSEWHERE.items():
        if key in config["model"]:
            raise ConfigError(f"model.{key}: cvkit loads weights itself (no download, no pickled code); use {instead}")
    for key in ("num_classes", "num_keypoints"):
        if config["model"].get(key) is not None:
            _int_at_least(f"model.{key}", config["model"][key], 1)
    augmentation = config["augmentation"]
    if isinstance(augmentation, dict) and "transform" not in augmentation:
        if augmentation.get("size") is not None:
            _image_size_in_range("augmentation.size", augmentation["size"])
        from cvkit.data.augment import _mean_std

        try:
            mean, std = _mean_std(augmentation.get("normalize", "imagenet"))
        except (TypeError, ValueError):
            mean = std = ()
        if not mean or len(mean) != len(std) or not all(isinstance(v, (int, float)) for v in (*mean, *std)) or min(std) <= 0:
            raise ConfigError(f"augmentation.normalize: expected 'imagenet', 'none' or [mean, std] with one "
                              f"number per channel each and std > 0, got {augmentation.get('normalize')!r}")
    for index, stage in enumerate(config["stages"]):
        if stage.get("image_size") is not None:
            _image_size_in_range(f"stages[{index}].image_size", stage["image_size"])
    engine = config["engine"]
    if engine is not None and (not isinstance(engine, str) or engine not in ENGINES):
        raise ConfigError(f"engine: unknown engine {engine!r}{_near(str(engine), ENGINES)} valid: {ENGINES.list()}")
    if engine is not None and ENGINES.meta(engine).get("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"engine: {engine!r} needs a CUDA GPU and none is visible on this machine; use engine: cpu")


def check_loggers_installed(config: Mapping[str, Any]) -> None:
    """Refuse, in one line, an experiment whose ``loggers`` need a package this machine lacks (before
    training; predicting from or exporting such a run needs none of them)."""
    try:
        require_packages(logger_specs(config.get("loggers", DEFAULT_LOGGERS)))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def stages_from(config: Mapping[str, Any]) -> List[Stage]:
    """The resolved config's stages as :class:`Stage` objects."""
    return [Stage(**{**s, "monitor": tuple(s["monitor"]) if s.get("monitor") else None}) for s in config["stages"]]


def dumps(config: Mapping[str, Any]) -> str:
    """The resolved config as indented JSON (what ``config.json`` holds)."""
    return json.dumps(config, indent=2, default=list)
