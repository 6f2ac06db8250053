"""The run folder's files: each one's name, its one writer and its reader, without torch.

A run folder holds ``config.json`` (the completed experiment, the runner's facts and each stage's
pipelines), ``classes.json``, ``log.csv``, ``tensorboard/``, ``checkpoints/``, ``best.pth``, the task's
tuned post-processing (its ``tuning_file``, e.g. ``postprocess.json``) and ``metrics.json``, written
last: a folder holding it is a finished run. A k-fold folder holds ``fold_<k>/`` runs, ``oof.csv``
and ``cv.json``. Every write is atomic (:mod:`cvkit.io`); building a model from a folder is
:func:`cvkit.inference.load_run`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from cvkit.errors import DataError
from cvkit.io import atomic_write_bytes, atomic_write_json, create_whole, save_checkpoint

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
CLASSES_FILE = "classes.json"
METRICS_FILE = "metrics.json"
BEST_FILE = "best.pth"
CV_FILE = "cv.json"
OOF_FILE = "oof.csv"
KFOLD_FILE = "kfold.json"
CHECKPOINTS_DIR = "checkpoints"
RESUME_FILE = "resume.pth"
LAST_FILE = "last.pth"
LOG_FILE = "log.csv"
PROGRESS_FILE = "progress.png"


def read_json(path: PathLike) -> Any:
    """A JSON file of a run folder; a :class:`DataError` naming it when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected the file cvkit wrote") from None


def write_config(logdir: PathLike, config: Mapping[str, Any]) -> None:
    """``config.json``: the completed experiment with the runner's facts (replaced whole)."""
    atomic_write_json(Path(logdir) / CONFIG_FILE, dict(config))


def update_config(logdir: PathLike, entries: Mapping[str, Any]) -> Dict[str, Any]:
    """Set top-level keys of an existing ``config.json`` (a stage's pipelines, a resume's changes); returns it."""
    path = Path(logdir) / CONFIG_FILE
    config = read_json(path)
    config.update(entries)
    atomic_write_json(path, config)
    return config


def record_pipelines(logdir: PathLike, stage: str, pipelines: Mapping[str, Any]) -> None:
    """Add a stage's loaders' exact pipelines (albumentations' serialised form) to ``config.json``'s ``pipelines``."""
    path = Path(logdir) / CONFIG_FILE
    config = read_json(path) if path.is_file() else {}
    config.setdefault("pipelines", {})[stage] = dict(pipelines)
    atomic_write_json(path, config)


def read_config(logdir: PathLike) -> Dict[str, Any]:
    """The run's ``config.json``, or {} before it is written."""
    path = Path(logdir) / CONFIG_FILE
    return read_json(path) if path.is_file() else {}


def stage_checkpoints(logdir: PathLike, stage: str) -> Path:
    """``checkpoints/<stage>``: the folder of a stage's ``last.pth`` and ``best.pth``."""
    return Path(logdir) / CHECKPOINTS_DIR / stage


def resume_file(logdir: PathLike) -> Path:
    """``checkpoints/resume.pth``: the state after the run's last finished epoch (:mod:`cvkit.resume`)."""
    return Path(logdir) / CHECKPOINTS_DIR / RESUME_FILE


def write_best(logdir: PathLike, weights: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> None:
    """The root ``best.pth``: the run's best epoch's kept weights under ``model`` (what every weights reader
    takes), with that checkpoint's stage, epoch, metrics and which weights they are (``"ema"`` or ``"raw"``)."""
    save_checkpoint(Path(logdir) / BEST_FILE, {"model": dict(weights), "stage": checkpoint["stage"],
                                               "epoch": checkpoint["epoch"], "metrics": checkpoint["metrics"],
                                               "weights": checkpoint.get("weights", "raw")})


def write_classes(logdir: PathLike, classes: Sequence[str]) -> None:
    """``classes.json``: the class names in output order."""
    atomic_write_json(Path(logdir) / CLASSES_FILE, list(classes))


def classes_file(*folders: PathLike) -> Optional[Path]:
    """The first of ``folders`` holding ``classes.json``, as that file's path."""
    for folder in folders:
        if (Path(folder) / CLASSES_FILE).is_file():
            return Path(folder) / CLASSES_FILE
    return None


def write_metrics(logdir: PathLike, metrics: Mapping[str, Any]) -> None:
    """``metrics.json``, the run's last write: best and test scores, the tuned post-processing's."""
    atomic_write_json(Path(logdir) / METRICS_FILE, dict(metrics))


def finished_metrics(logdir: PathLike) -> Optional[Dict[str, Any]]:
    """The metrics of a run that finished in ``logdir`` (``metrics.json`` with its ``best``), else None."""
    path = Path(logdir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return metrics if isinstance(metrics, dict) and "best" in metrics else None


def write_tuning(logdir: PathLike, file: str, tuning: Any) -> None:
    """The task's post-processing tuned on held-out rows (``tuning.to_json()``) under the task's file name."""
    atomic_write_json(Path(logdir) / file, tuning.to_json())


def write_out_of_fold(logdir: PathLike, frame: Any, summary: Mapping[str, Any]) -> None:
    """A k-fold folder's ``oof.csv`` (a pandas table) and ``cv.json``, in that order."""
    atomic_write_bytes(Path(logdir) / OOF_FILE, frame.to_csv(index=False).encode())
    atomic_write_json(Path(logdir) / CV_FILE, dict(summary))


def write_kfold_setup(folder: PathLike, setup: Mapping[str, Any], replace: bool) -> bool:
    """A k-fold folder's ``kfold.json`` (its folds, group column and experiment): replaced when ``replace``,
    else created only when absent, in one step, so fold jobs started at once never clash. Whether it was written."""
    path = Path(folder) / KFOLD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        atomic_write_json(path, dict(setup))
        return True
    try:
        create_whole(path, (json.dumps(dict(setup), indent=2) + "\n").encode())
    except FileExistsError:
        return False
    return True


def kfold_members(folder: Optional[PathLike]) -> Tuple[List[Path], List[str]]:
    """A k-fold run folder's ``fold_k`` folders holding ``best.pth``, and the folds it lacks (``fold_1``,
    ``fold_2/best.pth``): the folds are those ``cv.json`` counts, else ``fold_0`` to the highest present.
    ``([], [])`` for an ordinary run folder or a file."""
    if folder is None or not Path(folder).is_dir() or (Path(folder) / BEST_FILE).is_file():
        return [], []
    folder = Path(folder)
    present = [int(p.name[5:]) for p in folder.glob("fold_*") if p.name[5:].isdigit() and p.is_dir()]
    count = max(present) + 1 if present else 0
    summary = folder / CV_FILE
    if summary.is_file():
        try:
            count = json.loads(summary.read_text())["folds"]
        except (ValueError, KeyError, TypeError):
            count = None
        if not isinstance(count, int) or isinstance(count, bool) or count < 2:
            raise DataError(f"{summary}: expected a JSON mapping whose 'folds' is the number of folds (>= 2)")
    folds, missing = [], []
    for k in range(count):
        fold = folder / f"fold_{k}"
        if (fold / BEST_FILE).is_file():
            folds.append(fold)
        else:
            missing.append(f"fold_{k}/{BEST_FILE}" if fold.is_dir() else f"fold_{k}")
    return folds, missing


def run_checkpoints(checkpoint: Union[None, PathLike, Sequence[PathLike]],
                    allow_missing_folds: bool = False) -> List[Optional[PathLike]]:
    """The checkpoints an ensemble prediction averages: each given file or run folder, a k-fold run
    folder standing for its ``fold_*/best.pth`` (None alone: the run's own best.pth).

    A k-fold folder lacking a fold that ``cv.json`` counts (a removed ``fold_k/`` or ``fold_k/best.pth``)
    is a :class:`~cvkit.errors.DataError` naming it, unless ``allow_missing_folds``: then the others average.
    """
    given = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    out: List[Optional[PathLike]] = []
    for item in given:
        folds, missing = kfold_members(item)
        if missing and (not allow_missing_folds or not folds):
            listed = "cv.json lists" if (Path(item) / CV_FILE).is_file() else "expected"
            hint = ("; restore it, or average the others (allow_missing_folds=True; CLI: --allow-missing-folds)"
                    if folds else "")
            raise DataError(f"{item}: k-fold run without {', '.join(missing)} ({listed} {len(folds) + len(missing)} "
                            f"folds){hint}")
        out += [f / BEST_FILE for f in folds] if folds else [item]
    return out or [None]


__all__ = ["BEST_FILE", "CHECKPOINTS_DIR", "CLASSES_FILE", "CONFIG_FILE", "CV_FILE", "KFOLD_FILE", "LAST_FILE",
           "LOG_FILE", "METRICS_FILE", "OOF_FILE", "PROGRESS_FILE", "RESUME_FILE", "classes_file", "write_best",
           "resume_file", "stage_checkpoints",
           "finished_metrics", "kfold_members", "read_config", "read_json", "record_pipelines", "run_checkpoints", "update_config", "write_classes",
           "write_config", "write_kfold_setup", "write_metrics", "write_out_of_fold", "write_tuning"]
