"""Which loggers a run writes to (``loggers: [tensorboard, mlflow]`` in YAML, ``fit(loggers=...)`` in Python),
and the small lifecycle every logger follows: a registry of :class:`RunLogger` classes.

Each entry of ``loggers`` is a logger's name or a mapping with ``name`` and that logger's options:

- ``tensorboard`` (the default): event files under ``<logdir>/tensorboard``, every stage on one
  global-epoch timeline, plus the HParams tab (:mod:`cvkit.callbacks.tensorboard`);
- ``mlflow`` (the optional ``cvkit[mlflow]`` extra): one MLflow run per cvkit run
  (:mod:`cvkit.callbacks.mlflow`). Options: ``tracking_uri`` (default: a SQLite store in the run
  folder, :func:`default_tracking_uri`) and ``experiment`` (default: the run's name).

A new logger is one file: subclass :class:`RunLogger` and decorate it with ``@register_logger(name)``.
The runner calls, in order, ``start(run)`` once, ``stage(stage, index)`` before each stage (it may
return a Catalyst logger that then receives Catalyst's metrics), ``epoch(row)`` after each epoch
with its ``log.csv`` row, ``finish(result)`` with ``metrics.json``'s content, and ``end(status)``
(``FINISHED``, ``FAILED`` or ``KILLED``), also when the run fails.

Checking names and options needs no logger package (the built-in loggers' modules load when one is
built); :func:`require_packages` says in one line which package a chosen logger lacks, before anything trains.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

from cvkit.registry import Registry

if TYPE_CHECKING:
    from cvkit.stages import Stage

DEFAULT_LOGGERS: Tuple[str, ...] = ("tensorboard",)
LoggerSpec = Union[str, Mapping[str, Any]]


@dataclass
class LoggerRun:
    """What a logger learns at ``start``: the run folder, the run's name (its ``name`` or the folder's),
    the hyperparameters that tell runs apart, and the resume payload a resumed run continues (else None)."""

    logdir: Path
    name: str
    hparams: Dict[str, Any] = field(default_factory=dict)
    resumed: Optional[Mapping[str, Any]] = None


class RunLogger:
    """One logger of a staged run; every method is optional (the defaults do nothing).

    ``options`` names the keyword arguments its constructor takes (a spec's other keys);
    ``package`` the import it needs with the cvkit extra installing it, e.g. ``("mlflow", "mlflow")``.
    The object travels into DDP workers by pickling; :meth:`epoch` runs on the main process only.
    """

    options: Tuple[str, ...] = ()
    package: Optional[Tuple[str, str]] = None

    def start(self, run: LoggerRun) -> None:
        """The run starts (or resumes)."""

    def stage(self, stage: "Stage", index: int) -> Any:
        """A stage starts; a Catalyst ``ILogger`` returned here receives that stage's metrics."""
        return None

    def epoch(self, row: Mapping[str, Any]) -> None:
        """An epoch ended; ``row`` is its ``log.csv`` row."""

    def finish(self, result: Mapping[str, Any]) -> None:
        """The run's result (``metrics.json``'s content) before it is written."""

    def end(self, status: str = "FINISHED") -> None:
        """The run ended: ``FINISHED``, ``FAILED`` or ``KILLED``."""

    def resume_state(self) -> Dict[str, Any]:
        """Entries this logger adds to every resume payload (read back from ``LoggerRun.resumed``)."""
        return {}


LOGGERS: Registry[Callable[..., RunLogger]] = Registry("logger")


def register_logger(name: str, override: bool = False) -> Callable[[Type[RunLogger]], Type[RunLogger]]:
    """Class decorator: ``@register_logger("name")`` makes ``loggers: [name]`` build the class."""

    def add(cls: Type[RunLogger]) -> Type[RunLogger]:
        LOGGERS.register(cls, name=name, override=override, options=tuple(cls.options), package=cls.package)
        return cls

    return add


def _builtin(module: str, cls: str) -> Callable[..., RunLogger]:
    """A built-in logger's class, imported when the logger is built (its module needs Catalyst)."""

    def build(**options: Any) -> RunLogger:
        return getattr(importlib.import_module(module), cls)(**options)

    return build


LOGGERS.register(_builtin("cvkit.callbacks.tensorboard", "TensorboardRunLogger"), name="tensorboard", options=(),
                 package=None)
LOGGERS.register(_builtin("cvkit.callbacks.mlflow", "MLflowRunLogger"), name="mlflow",
                 options=("tracking_uri", "experiment"), package=("mlflow", "mlflow"))


def logger_specs(loggers: Sequence[LoggerSpec], where: str = "loggers") -> List[Dict[str, Any]]:
    """``loggers`` as ``[{"name": ..., **options}]``; ValueError naming the bad entry and the nearest name."""
    if isinstance(loggers, (str, Mapping)) or not isinstance(loggers, Sequence):
        raise ValueError(f"{where}: expected a list of logger names, e.g. [tensorboard, mlflow], got {loggers!r}")
    out: List[Dict[str, Any]] = []
    for index, entry in enumerate(loggers):
        at = f"{where}[{index}]"
        spec = {"name": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, Mapping) else None
        if spec is None:
            raise ValueError(f"{at}: expected a logger name or a mapping with 'name', got {entry!r}")
        name = spec.get("name")
        if not isinstance(name, str) or name not in LOGGERS:
            close = difflib.get_close_matches(str(name), LOGGERS.list(), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{at}: unknown logger {name!r}{hint} valid: {LOGGERS.list()}")
        options = LOGGERS.meta(name)["options"]
        unknown = sorted(set(spec) - {"name", *options})
        if unknown:
            raise ValueError(f"{at}: unknown {name} options {unknown}; valid: {list(options)}")
        for key in options:
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise ValueError(f"{at}.{key}: expected a string, got {spec[key]!r}")
        if name in (s["name"] for s in out):
            raise ValueError(f"{at}: logger {name!r} is listed twice")
        out.append(spec)
    return out


def require_packages(specs: Sequence[Mapping[str, Any]], where: str = "loggers") -> None:
    """Check that every chosen logger's package imports; ValueError in one line naming the extra if not."""
    for spec in specs:
        package, extra = LOGGERS.meta(spec["name"]).get("package") or (None, None)
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(f"{where}: {spec['name']} needs the {package} package: "
                             f"pip install 'cvkit[{extra}]'") from None


def build_loggers(specs: Sequence[Mapping[str, Any]]) -> List[RunLogger]:
    """One logger object per checked spec (:func:`logger_specs`), built with its options."""
    return [LOGGERS.get(spec["name"])(**{k: v for k, v in spec.items() if k != "name"}) for spec in specs]


def stage_loggers(specs: Sequence[Mapping[str, Any]], loggers: Sequence[RunLogger], stage: "Stage",
                  index: int) -> Dict[str, Any]:
    """The Catalyst loggers of a stage by logger name: what each logger's ``stage`` returns (None: none)."""
    out = {spec["name"]: logger.stage(stage, index) for spec, logger in zip(specs, loggers)}
    return {name: logger for name, logger in out.items() if logger is not None}


def final_scores(result: Mapping[str, Any]) -> Dict[str, Any]:
    """A run result's valid and test scores as ``{"valid/<key>": value, "test/<key>": ...}`` (per-class losses left out)."""
    return {f"{split}/{key}": value for split in ("valid", "test") for key, value in
            (result.get(split) or {}).items() if not key.startswith("loss/")}


def default_tracking_uri(logdir: Union[str, Path]) -> str:
    """The local MLflow store of a run: SQLite at ``<logdir>/mlruns/mlflow.db`` (no server).

    MLflow 3 keeps its file store (``./mlruns`` folders) behind ``MLFLOW_ALLOW_FILE_STORE`` in
    maintenance mode; SQLite is the local store it supports.
    """
    folder = Path(logdir).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').as_posix()}"


__all__ = ["DEFAULT_LOGGERS", "LOGGERS", "LoggerRun", "LoggerSpec", "RunLogger", "build_loggers", "default_tracking_uri",
           "final_scores", "logger_specs", "register_logger", "require_packages", "stage_loggers"]
