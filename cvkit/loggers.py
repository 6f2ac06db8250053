"""Which loggers a run writes to: ``loggers: [tensorboard, mlflow]`` in YAML, ``fit(loggers=...)`` in Python.

Each entry is a logger's name or a mapping with ``name`` and that logger's options:

- ``tensorboard`` (the default): event files under ``<logdir>/tensorboard``, every stage on one
  global-epoch timeline, plus the HParams tab;
- ``mlflow`` (the optional ``cvkit[mlflow]`` extra): one MLflow run per cvkit run through Catalyst's
  MLflow logger (:class:`cvkit.callbacks.mlflow.RunMLflowLogger`). Options: ``tracking_uri``
  (default: a SQLite store in the run folder, :func:`default_tracking_uri`) and ``experiment``
  (default: the run's name).

Checking names and options needs no logger package; :func:`require_packages` says in one line which
package a chosen logger lacks, before anything trains.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

LOGGER_OPTIONS: Dict[str, Tuple[str, ...]] = {"tensorboard": (), "mlflow": ("tracking_uri", "experiment")}
DEFAULT_LOGGERS: Tuple[str, ...] = ("tensorboard",)
# The package each optional logger imports, and the cvkit extra that installs it.
_PACKAGES: Dict[str, Tuple[str, str]] = {"mlflow": ("mlflow", "mlflow")}
LoggerSpec = Union[str, Mapping[str, Any]]


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
        if name not in LOGGER_OPTIONS:
            close = difflib.get_close_matches(str(name), list(LOGGER_OPTIONS), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{at}: unknown logger {name!r}{hint} valid: {list(LOGGER_OPTIONS)}")
        unknown = sorted(set(spec) - {"name", *LOGGER_OPTIONS[name]})
        if unknown:
            raise ValueError(f"{at}: unknown {name} options {unknown}; valid: {list(LOGGER_OPTIONS[name])}")
        for key in LOGGER_OPTIONS[name]:
            if spec.get(key) is not None and not isinstance(spec[key], str):
                raise ValueError(f"{at}.{key}: expected a string, got {spec[key]!r}")
        if name in (s["name"] for s in out):
            raise ValueError(f"{at}: logger {name!r} is listed twice")
        out.append(spec)
    return out


def require_packages(specs: Sequence[Mapping[str, Any]], where: str = "loggers") -> None:
    """Check that every chosen logger's package imports; ValueError in one line naming the extra if not."""
    import importlib

    for spec in specs:
        package, extra = _PACKAGES.get(spec["name"], (None, None))
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(f"{where}: {spec['name']} needs the {package} package: "
                             f"pip install 'cvkit[{extra}]'") from None


def default_tracking_uri(logdir: Union[str, Path]) -> str:
    """The local MLflow store of a run: SQLite at ``<logdir>/mlruns/mlflow.db`` (no server).

    MLflow 3 keeps its file store (``./mlruns`` folders) behind ``MLFLOW_ALLOW_FILE_STORE`` in
    maintenance mode; SQLite is the local store it supports.
    """
    folder = Path(logdir).resolve() / "mlruns"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').as_posix()}"


__all__ = ["DEFAULT_LOGGERS", "LOGGER_OPTIONS", "default_tracking_uri", "logger_specs", "require_packages"]
