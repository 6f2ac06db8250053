"""One run of an experiment: build it (:mod:`cvkit.experiment`), check the data, train every stage with
:class:`~cvkit.runners.StagedRunner`, tune the task's post-processing on the valid split; what ``cvkit train``
runs. Resuming checks the experiment against the run's ``config.json`` and records allowed changes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from torch import nn

from cvkit.config import ConfigError, check_loggers_installed, claim_logdir, complete, load_experiment
from cvkit.experiment import Experiment, build, eval_transform, image_size, pipelines
from cvkit.stages import Stage
from cvkit.run_folder import CONFIG_FILE, finished_metrics, read_json, update_config, write_classes, write_tuning


def _flat(value: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a.b.0": leaf}`` for nested mappings and lists (to name the keys two configs differ in)."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: Dict[str, Any] = {}
    for key, item in items:
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """The dotted keys whose values differ between two completed experiments (pipelines and logdir aside)."""
    ignore = ("pipelines", "logdir", "name")
    a = _flat({k: v for k, v in json.loads(json.dumps(saved, default=str)).items() if k not in ignore})
    b = _flat({k: v for k, v in json.loads(json.dumps(current, default=str)).items() if k not in ignore})
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _check_resume(full: Mapping[str, Any], allow_changes: bool) -> Dict[str, Any]:
    """Refuse to resume a run whose experiment changed since it started, naming the keys; with
    ``allow_changes``, the changed dotted keys with their values before (None: the key was absent)."""
    saved_path = Path(full["logdir"]) / CONFIG_FILE
    if not saved_path.is_file():
        return {}
    saved = complete(load_experiment(saved_path))
    changed = changed_keys(saved, full)
    if changed and not allow_changes:
        raise ConfigError(f"resume: the experiment differs from the run's {saved_path} in {changed[:8]}"
                          f"{' ...' if len(changed) > 8 else ''}; resume it unchanged, start a new logdir, or "
                          "allow the change explicitly (--resume-changed; the new values are recorded in config.json)")
    before = _flat(json.loads(json.dumps(saved, default=str)))
    return {key: before.get(key) for key in changed}


def _record_changes(experiment: Experiment, before: Dict[str, Any]) -> None:
    """Write a resumed run's new experiment into its config.json, and append to ``resumed_with_changes``
    the changed keys, their values before and the epoch the run resumes after (the new values apply from
    the next one; see :meth:`cvkit.runners.StagedRunner.fit`'s ``resume`` for the interrupted stage)."""
    from cvkit.runners import StagedRunner

    full = experiment.config
    saved = read_json(Path(full["logdir"]) / CONFIG_FILE)
    entry = {"keys": sorted(before), "before": before,
             "resumed_after": StagedRunner().resume_point(experiment.logdir, experiment.stages)}
    update_config(full["logdir"], {**json.loads(json.dumps(full, default=str)),
                                   "resumed_with_changes": saved.get("resumed_with_changes", []) + [entry]})


def _link_latest(logdir: Path) -> None:
    """Point ``runs/<name>/latest`` at this run (a symlink, replaced atomically) when the run folder is a
    time-stamped one (:func:`cvkit.config.default_logdir`); explicit logdirs get no link."""
    import os
    import re

    link = logdir.parent / "latest"
    if not re.match(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_", logdir.name) or (link.exists() and not link.is_symlink()):
        return
    logdir.mkdir(parents=True, exist_ok=True)
    temporary = logdir.parent / f".latest.{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(logdir.name, target_is_directory=True)
    os.replace(temporary, link)


def run(config: Mapping[str, Any], resume: bool = False, verbose: bool = True,
        allow_changes: bool = False, datasets: Optional[Dict[str, Any]] = None,
        callbacks: Optional[Callable[[Stage], Iterable[Any]]] = None) -> Dict[str, Any]:
    """Build, check the data, train every stage; returns what ``metrics.json`` holds.

    ``config.json`` in the logdir is the completed experiment (plus the runner's facts) and
    re-runs as it is; ``classes.json`` keeps the class names for :mod:`cvkit.inference.predict`.
    With ``resume``, a run that already finished is left as it is (its metrics are returned), and a
    run whose experiment changed since is refused unless ``allow_changes``. The run folder's lock
    (:class:`cvkit.lock.RunLock`) is held from the first write into it to the last. ``callbacks``
    (``f(stage) -> Catalyst callbacks``) adds callbacks to every stage, as
    :meth:`cvkit.runners.StagedRunner.fit`'s do (the pruning of :func:`cvkit.tune.tune`).
    """
    from cvkit.lock import RunLock

    check_loggers_installed(config)
    experiment = build(config, datasets)
    if not config.get("logdir"):  # the time-stamped folder, claimed once the experiment builds
        experiment.config["logdir"] = claim_logdir(experiment.config)
    with RunLock(experiment.logdir):
        return _run_locked(experiment, resume, verbose, allow_changes, callbacks)


def _run_locked(experiment: Experiment, resume: bool, verbose: bool, allow_changes: bool,
                callbacks: Optional[Callable[[Stage], Iterable[Any]]] = None) -> Dict[str, Any]:
    """:func:`run` once the run folder is held."""
    from cvkit.perf import FastPaths
    from cvkit.runners import StagedRunner

    full = experiment.config
    before: Dict[str, Any] = {}
    if resume:
        before = _check_resume(full, allow_changes)
        done = finished_metrics(experiment.logdir)
        if done is not None:
            if verbose:
                print(f"{experiment.logdir} is a finished run (metrics.json); nothing to resume")
            return done
    experiment.prepare()
    _link_latest(experiment.logdir)
    full["pipelines"] = pipelines(full, experiment.stages)
    if before:
        _record_changes(experiment, before)
    if experiment.classes:
        write_classes(experiment.logdir, experiment.classes)
    runner = StagedRunner().fit(
        experiment.model, experiment.stages, experiment.loaders, experiment.criterion, experiment.logdir,
        metrics=experiment.metrics, callbacks=callbacks, valid_metric=full["valid_metric"],
        minimize_valid_metric=full["minimize_valid_metric"], engine=full["engine"], seed=int(full["seed"]),
        verbose=verbose, config=json.loads(json.dumps(full)), test_loader=experiment.test_loader(),
        resume=resume or None, fast=FastPaths(**full["fast"]), profile=bool(full["profile"]),
        loggers=full["loggers"], postprocess=lambda model: _tune(experiment, model),
    )
    return runner.final_metrics


def _tune(experiment: Experiment, model: nn.Module) -> Dict[str, Any]:
    """The task's post-processing chosen on the valid split (never the test split) with the best weights
    (``model``), saved beside the run; ``{"postprocess": ...}`` (its valid score before and after) for
    ``metrics.json``, or {} for a task without post-processing."""
    from cvkit.inference.predict import predict_splits

    task, config = experiment.task, experiment.config
    if not task.tuning_file:
        return {}
    last = experiment.stages[-1]
    transform = eval_transform(config, image_size(config, config["stages"][-1]), last.name)
    device = next(model.parameters()).device.type
    tuning = task.tune(predict_splits([(model, experiment.datasets["valid"], transform)], task, device))
    if tuning is None:
        return {}
    write_tuning(experiment.logdir, task.tuning_file, tuning)
    return {"postprocess": {"file": task.tuning_file, "split": "valid", "before": tuning.before,
                            "after": tuning.after}}


__all__ = ["changed_keys", "run"]
