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

A killed k-fold run continues with ``resume=True``: finished folds are kept, the unfinished one
resumes from its last epoch, later ones start. The k-fold folder's lock (:class:`cvkit.lock.RunLock`) is
held from the first fold to ``cv.json``; each fold's run holds its own folder's.
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import pandas as pd
import torch


def fold_config(config: Mapping[str, Any], folds: int, fold: int, group_col: Optional[str] = None) -> Dict[str, Any]:
    """The experiment of fold ``fold``: its own logdir, and the data split into that fold."""
    out = copy.deepcopy(dict(config))
    out["logdir"] = str(Path(config["logdir"]) / f"fold_{fold}")
    out["data"] = {**out["data"], "folds": folds, "fold": fold, **({"group_col": group_col} if group_col else {})}
    return out


def kfold(config: Mapping[str, Any], folds: int = 5, group_col: Optional[str] = None, resume: bool = False,
          verbose: bool = True, allow_changes: bool = False) -> Dict[str, Any]:
    """Train every fold, write ``oof.csv`` and ``cv.json`` into the logdir; returns what cv.json holds."""
    from cvkit.config import claim_logdir, complete
    from cvkit.lock import RunLock

    named = bool(config.get("logdir"))
    config = complete(config)
    if not named:  # the time-stamped folder, claimed once the experiment checks out
        config["logdir"] = claim_logdir(config)
    with RunLock(config["logdir"]):
        return _kfold_locked(config, folds, group_col, resume, verbose, allow_changes)


def _kfold_locked(config: Dict[str, Any], folds: int, group_col: Optional[str], resume: bool, verbose: bool,
                  allow_changes: bool) -> Dict[str, Any]:
    """:func:`kfold` of a completed experiment once its folder is held."""
    from cvkit.training import run
    from cvkit.run_folder import write_out_of_fold, write_tuning

    base = Path(config["logdir"])
    scores: List[float] = []
    for fold in range(folds):
        if verbose:
            print(f"[cvkit] fold {fold + 1}/{folds} -> {base / f'fold_{fold}'}")
        result = run(fold_config(config, folds, fold, group_col), resume=resume, verbose=verbose,
                     allow_changes=allow_changes)
        scores.append(float(result["best"]["score"]))
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


@torch.no_grad()
def out_of_fold(config: Mapping[str, Any], folds: int) -> "tuple[pd.DataFrame, Dict[str, float]]":
    """Every training row predicted by its fold's model (a table), and the task's metrics over them pooled.

    Each fold's model and its held-out split come from that fold's own folder (``config.json``,
    ``best.pth``), so the split is the one it was trained with.
    """
    from cvkit.data.loaders import make_loader
    from cvkit.experiment import image_size, with_transform
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
        for batch in make_loader(evaluated, 64, train=False, workers=0):
            metric.update(model(batch["features"]), batch["targets"])
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


__all__ = ["fold_config", "kfold", "out_of_fold", "tune_out_of_fold"]
