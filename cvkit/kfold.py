"""K-fold training with out-of-fold (OOF) predictions, on the same builders as one run.

:func:`kfold` trains fold ``k`` of ``K`` into ``<logdir>/fold_<k>/`` as an ordinary run whose
``config.json`` says ``data.fold: k`` (so each fold repeats from its folder), then predicts every
training row with the one fold model that did not train on it:

- ``oof.csv``: one row per training row, in the task's submission format, plus ``fold``, ``row``
  (the row of the training table) and the true target where the task has one;
- ``cv.json``: each fold's best valid metric, their mean and standard deviation, and the task's
  metrics over all out-of-fold predictions pooled;
- the task's post-processing (segmentation thresholds and areas: ``postprocess.json``) tuned on the
  pooled out-of-fold predictions, its score before and after in ``cv.json``; an ensemble prediction
  from the k-fold folder applies it.

``kfold.json`` in the k-fold folder records its setup (``folds``, ``group_col``, the completed
experiment) once; every later job on the folder must bring the same setup.

Folds as independent jobs: ``kfold(config, folds, fold=k)`` trains fold ``k`` alone (a Slurm array
task, one per fold, on machines sharing the folder; the experiment must name its logdir so every job
finds the same folder). The job that finds every fold finished after its own writes ``oof.csv`` and
``cv.json``; :func:`collect` (``cvkit kfold collect``) writes them on demand. A fold job holds only its
fold's folder while it trains, so folds train at once, and takes the k-fold folder's lock
(:class:`cvkit.lock.RunLock`) for the collect step alone, waiting while another job collects.

A killed k-fold run continues with ``resume=True``: finished folds are kept, the unfinished one
resumes from its last epoch, later ones start. All folds in one call hold the k-fold folder's lock
from the first fold to ``cv.json``; each fold's run holds its own folder's.

``cvkit.kfold`` is this module, and calling it calls :func:`kfold` (``cvkit.kfold(config, folds=5)``),
whether or not ``import cvkit.kfold`` ran before.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import pandas as pd

from cvkit.run_folder import CV_FILE, KFOLD_FILE, METRICS_FILE, write_kfold_setup

COLLECT_WAIT_S = 600.0  # how long a fold job waits for the k-fold folder while another job collects


def fold_config(config: Mapping[str, Any], folds: int, fold: int, group_col: Optional[str] = None) -> Dict[str, Any]:
    """The experiment of fold ``fold``: its own logdir, and the data split into that fold."""
    out = copy.deepcopy(dict(config))
    out["logdir"] = str(Path(config["logdir"]) / f"fold_{fold}")
    out["data"] = {**out["data"], "folds": folds, "fold": fold, **({"group_col": group_col} if group_col else {})}
    return out


def kfold(config: Mapping[str, Any], folds: int = 5, group_col: Optional[str] = None, resume: bool = False,
          verbose: bool = True, allow_changes: bool = False, fold: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """Train every fold (or only ``fold``), write ``oof.csv`` and ``cv.json`` into the logdir once every
    fold has finished; returns what cv.json holds, or None while a fold job leaves folds unfinished.

    With ``fold``, the experiment must name its logdir: the jobs of one k-fold meet there.
    """
    from cvkit.config import ConfigError, claim_logdir, complete
    from cvkit.lock import RunLock

    named = bool(config.get("logdir"))
    if fold is not None:
        if not named:
            raise ConfigError("kfold: a single fold (fold=K) trains into a k-fold folder every fold's job shares; "
                              "name it in the experiment (logdir: runs/x)")
        if not 0 <= fold < folds:
            raise ConfigError(f"kfold: fold {fold} is not a fold of {folds} (0 to {folds - 1})")
    config = complete(config)
    if not named:  # the time-stamped folder, claimed once the experiment checks out
        config["logdir"] = claim_logdir(config)
    if fold is None:
        with RunLock(config["logdir"]):
            _record_setup(config, folds, group_col, replace=not resume, allow_changes=allow_changes)
            for k in range(folds):
                _train_fold(config, folds, k, group_col, resume, verbose, allow_changes)
            return _collect_locked(config, folds, verbose)
    _record_setup(config, folds, group_col, replace=False, allow_changes=allow_changes)
    _train_fold(config, folds, fold, group_col, resume, verbose, allow_changes)
    return _collect_if_last(config, folds, fold, verbose)


def _train_fold(config: Dict[str, Any], folds: int, fold: int, group_col: Optional[str], resume: bool,
                verbose: bool, allow_changes: bool) -> None:
    """One fold's ordinary run in ``<logdir>/fold_<fold>/`` (holding that folder's lock only)."""
    from cvkit.training import run

    if verbose:
        print(f"[cvkit] fold {fold + 1}/{folds} -> {Path(config['logdir']) / f'fold_{fold}'}")
    run(fold_config(config, folds, fold, group_col), resume=resume, verbose=verbose, allow_changes=allow_changes)


def _record_setup(config: Mapping[str, Any], folds: int, group_col: Optional[str], replace: bool,
                  allow_changes: bool) -> None:
    """Write ``kfold.json`` (the k-fold's setup) into the k-fold folder: created only when absent, so jobs
    started at once never clash, or replaced (``replace``: all folds retrain in this call). An existing one
    with another setup is refused naming the key; ``allow_changes`` lets the experiment change (a resume)."""
    from cvkit.config import ConfigError
    from cvkit.training import changed_keys

    folder = Path(config["logdir"])
    path = folder / KFOLD_FILE
    setup = {"folds": folds, "group_col": group_col, "experiment": json.loads(json.dumps(config, default=str))}
    if write_kfold_setup(folder, setup, replace):
        return
    saved = _read_setup(folder)
    start_over = f"give the same setup, another logdir, or remove {folder} to start over"
    for key in ("folds", "group_col"):
        if saved.get(key) != setup[key]:
            raise ConfigError(f"{path}: this k-fold folder was set up with {key}={saved.get(key)!r}, this job has "
                              f"{key}={setup[key]!r}; {start_over}")
    changed = changed_keys(saved["experiment"], setup["experiment"])
    if changed and not allow_changes:
        raise ConfigError(f"{path}: this k-fold folder was set up with another experiment (it differs in "
                          f"{', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); {start_over}")
    if changed:
        write_kfold_setup(folder, setup, replace=True)


def _read_setup(folder: Path) -> Dict[str, Any]:
    """The k-fold folder's ``kfold.json``, or one line saying it is not a k-fold folder."""
    from cvkit.config import ConfigError, read_mapping

    path = folder / KFOLD_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: {folder} is not a k-fold folder (cvkit train --folds K writes it)")
    setup = read_mapping(path, "k-fold setup (kfold.json)")
    if not isinstance(setup.get("folds"), int) or not isinstance(setup.get("experiment"), dict):
        raise ConfigError(f"{path}: expected 'folds' (an integer) and 'experiment' (a mapping), as cvkit writes it")
    return setup


def collect(logdir: Union[str, Path], verbose: bool = True) -> Dict[str, Any]:
    """Write a k-fold folder's ``oof.csv``, ``cv.json`` and tuned post-processing from its finished folds
    (after fold jobs, or to redo them); returns what cv.json holds. A fold that is missing or has no
    ``metrics.json`` (an unfinished run) is refused in one line naming it."""
    from cvkit.lock import RunLock

    folder = Path(logdir)
    setup = _read_setup(folder)
    config = {**setup["experiment"], "logdir": str(folder)}
    with RunLock(folder):
        return _collect_locked(config, setup["folds"], verbose)


def _collect_if_last(config: Mapping[str, Any], folds: int, fold: int, verbose: bool) -> Optional[Dict[str, Any]]:
    """After fold job ``fold``: None while some fold is unfinished; else collect, unless another job did
    since the last fold finished (its cv.json is returned then)."""
    from cvkit.lock import RunLockedError

    folder = Path(config["logdir"])
    if _unfinished(folder, folds):
        return None
    try:
        with _held_when_free(folder, COLLECT_WAIT_S):
            if (folder / CV_FILE).is_file() and _summary_is_current(folder, folds):
                return json.loads((folder / CV_FILE).read_text())
            return _collect_locked(config, folds, verbose)
    except RunLockedError as exc:
        raise RunLockedError(f"fold {fold} of {folds} finished, but {exc} (waited {COLLECT_WAIT_S:.0f} s); "
                             f"collect later: cvkit kfold collect {folder}") from None


@contextmanager
def _held_when_free(folder: Path, wait_s: float) -> Iterator[None]:
    """Hold ``folder``'s :class:`~cvkit.lock.RunLock`, waiting up to ``wait_s`` seconds while another
    process holds it (a job collecting); :class:`~cvkit.lock.RunLockedError` after that."""
    from cvkit.lock import RunLock, RunLockedError

    lock = RunLock(folder)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock.acquire()
            break
        except RunLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)
    try:
        yield
    finally:
        lock.release()


def _metrics_file(folder: Path, fold: int) -> Path:
    return folder / f"fold_{fold}" / METRICS_FILE


def _unfinished(folder: Path, folds: int) -> List[int]:
    """The folds without ``metrics.json`` (a run folder holding it is a finished run)."""
    return [k for k in range(folds) if not _metrics_file(folder, k).is_file()]


def _summary_is_current(folder: Path, folds: int) -> bool:
    """Whether ``cv.json`` was written after every fold's ``metrics.json`` (no fold retrained since)."""
    written = (folder / CV_FILE).stat().st_mtime_ns
    return all(_metrics_file(folder, k).stat().st_mtime_ns <= written for k in range(folds))


def _fold_score(folder: Path, folds: int, fold: int) -> float:
    """Fold ``fold``'s best valid score from its ``metrics.json``; one line naming it when it is missing."""
    from cvkit.config import ConfigError, read_mapping

    path = _metrics_file(folder, fold)
    if not path.parent.is_dir():
        raise ConfigError(f"fold {fold} of {folds} is missing: {path.parent} does not exist")
    if not path.is_file():
        raise ConfigError(f"fold {fold} of {folds} is not finished: {path.parent} has no metrics.json")
    best = read_mapping(path, "a finished run's metrics.json").get("best")
    if not isinstance(best, dict) or "score" not in best:
        raise ConfigError(f"{path}: expected 'best' with a 'score', as a finished run writes it")
    return float(best["score"])


def _collect_locked(config: Mapping[str, Any], folds: int, verbose: bool) -> Dict[str, Any]:
    """:func:`collect` once the k-fold folder is held: every fold must be finished."""
    from cvkit.run_folder import write_out_of_fold, write_tuning
    from cvkit.status import say

    base = Path(config["logdir"])
    scores = [_fold_score(base, folds, k) for k in range(folds)]
    if verbose:
        say(f"all {folds} folds finished: writing oof.csv and cv.json into {base}")
    frame, oof_metrics = out_of_fold(config, folds)
    summary = {"folds": folds, "valid_metric": config["valid_metric"], "per_fold": scores,
               "mean": statistics.fmean(scores), "std": statistics.pstdev(scores), "oof": oof_metrics}
    tuning = tune_out_of_fold(config, folds)
    if tuning is not None:
        task_file = tuning[0]
        write_tuning(base, task_file, tuning[1])
        summary["postprocess"] = {"file": task_file, "split": "out-of-fold", "before": tuning[1].before,
                                  "after": tuning[1].after}
    write_out_of_fold(base, frame, summary)
    return summary


def _fold_runs(config: Mapping[str, Any], folds: int) -> List[Any]:
    """Each fold's trained run (:func:`cvkit.inference.predict.load_run`) and its held-out rows."""
    from cvkit.experiment import build_datasets
    from cvkit.inference.runs import load_run

    out = []
    for fold in range(folds):
        trained = load_run(Path(config["logdir"]) / f"fold_{fold}")
        out.append((trained, build_datasets(trained.config)["valid"]))
    return out


def tune_out_of_fold(config: Mapping[str, Any], folds: int) -> "Optional[tuple[str, Any]]":
    """The task's post-processing chosen on every fold's held-out rows pooled (each predicted by the
    fold that did not train on it): ``(file name, tuning)``, or None for a task without tuning.

    More rows than one valid split, and the rows an ensemble of the folds never saw as a whole, so
    ``cvkit predict --checkpoint <k-fold run>`` applies this instead of fold 0's own.
    """
    runs = _fold_runs(config, folds)
    task = runs[0][0].task
    if not task.tuning_file:
        return None
    from cvkit.inference.predict import predict_splits

    tuning = task.tune(predict_splits([(trained.model.eval(), valid, trained.transform()) for trained, valid in runs],
                                      task))
    return None if tuning is None else (task.tuning_file, tuning)


def out_of_fold(config: Mapping[str, Any], folds: int) -> "tuple[pd.DataFrame, Dict[str, float]]":
    """Every training row predicted by its fold's model (a table), and the task's metrics over them pooled.

    Each fold's model and its held-out split come from that fold's own folder (``config.json``,
    ``best.pth``), so the split is the one it was trained with.
    """
    from cvkit.data.loaders import make_loader
    from cvkit.experiment import image_size, with_transform
    from cvkit.inference.loop import outputs_over
    from cvkit.inference.predict import iter_predict
    from cvkit.metrics import create_metric

    rows: List[Dict[str, Any]] = []
    metric = None
    for fold, (trained, valid) in enumerate(_fold_runs(config, folds)):
        task, classes, run_config = trained.task, trained.classes, trained.config
        size = image_size(run_config, run_config["stages"][-1])
        evaluated = task.wrap(with_transform(valid, trained.transform()))
        model = trained.model.eval()
        metric = metric or create_metric(task.metric, **task.metric_kwargs(run_config["model"], size))
        for batch, out in outputs_over(model, make_loader(evaluated, 64, train=False, workers=0)):
            metric.update(out, batch["targets"])
        if hasattr(valid, "path"):
            images: Any = [valid.path(i) for i in range(len(valid))]
            names = [str(valid.frame.at[i, valid.path_col]) for i in range(len(valid))]
        else:
            images, names = evaluated, [str(i) for i in range(len(valid))]
        table_rows = getattr(valid, "rows", None)
        for p in iter_predict(model, images, task, transform=trained.transform(), image_size=size, classes=classes,
                              device="cpu"):
            row = {"fold": fold, "row": int(table_rows[p.index]) if table_rows is not None else p.index}
            for out in task.rows(names[p.index], p.decode(task, classes), classes, tuning=trained.tuning):
                rows.append({**out, **row, **task.target_columns(valid, p.index, classes)})
    frame = pd.DataFrame(rows).sort_values(["row"], kind="stable").reset_index(drop=True)
    return frame, (metric.compute() if metric is not None else {})


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`kfold`: ``import cvkit.kfold`` binds the module to ``cvkit.kfold``,
    the package's attribute that the README calls as the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Optional[Dict[str, Any]]:
        return kfold(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["COLLECT_WAIT_S", "collect", "fold_config", "kfold", "out_of_fold", "tune_out_of_fold"]
