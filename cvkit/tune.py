"""Hyperparameter search over any experiment key with Optuna; every trial is an ordinary run.

A search space is a YAML mapping from dotted experiment keys (the paths ``--set`` takes) to what to
sample there::

    stages.1.lr: {low: 1e-4, high: 1e-2, log: true}     # a float, log-uniform
    stages.0.epochs: {low: 1, high: 4, int: true}        # an integer (step: 1 unless given)
    augmentation.preset: {choices: [light, medium]}      # one of the values

Every key must exist in the completed experiment (:func:`cvkit.config.complete`); the sampled
values are set with :func:`cvkit.config.set_key` and checked by :func:`cvkit.config.resolve`, so a
trial's experiment is validated as any YAML is. Trial ``n`` trains through
:func:`cvkit.training.run` into ``<logdir>/trial_<n>/`` (``cvkit train <that>/config.json``
repeats it); after each epoch its valid metric goes to the trial, and Optuna's pruner (median by
default) may stop it (the trial is PRUNED). A trial that fails (a sampled value the experiment
refuses, a crash) is FAILED with its reason in the trial's user attribute ``error``, and the study
goes on. The study's direction is the valid metric's (``minimize_valid_metric``).

The study lives in an Optuna storage, by default ``sqlite:///<logdir>/study.db``; several
processes given the same storage and study name share one study (``load_if_exists``), each running
its own ``trials``. At the end ``<logdir>/best.yaml`` (the best trial's experiment, without its
run folder) and ``<logdir>/tune.json`` (every trial: number, state, value, params, folder, error)
are written.

This module imports neither torch nor Optuna until a study runs, so the command checks a space file
before loading them.
"""
from __future__ import annotations

import copy
import difflib
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, Union

from cvkit.errors import ConfigError

if TYPE_CHECKING:
    import optuna

PathLike = Union[str, Path]
SPEC_KEYS = ("low", "high", "log", "step", "int", "choices")
# Keys a trial cannot sample: where it is written and what its objective is are the study's.
FIXED_KEYS = ("logdir", "name", "valid_metric", "minimize_valid_metric", "pipelines")
INSTALL = 'pip install -e ".[tune]"'
BEST_FILE, SUMMARY_FILE, STORAGE_FILE = "best.yaml", "tune.json", "study.db"
SQLITE_TIMEOUT_S = 60
STORAGE_TRIES = 5


class SpaceError(ConfigError):
    """A search space entry is wrong; the message names the file, the key and what was expected."""


@dataclass(frozen=True)
class Param:
    """What to sample at one dotted experiment key: ``choices``, or a range ``low``..``high``
    (integers with ``int``, log-uniform with ``log``, on a grid of ``step``)."""

    key: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    int: bool = False
    choices: Optional[Tuple[Any, ...]] = None

    def suggest(self, trial: "optuna.Trial") -> Any:
        """The trial's value for this key."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.int:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def _number(where: str, name: str, value: Any) -> float:
    """A YAML number (``1e-4``, which YAML 1.1 reads as text, included) as a float, else a SpaceError."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SpaceError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _param(where: str, key: str, spec: Any) -> Param:
    """One space entry checked: the keys of its spec, their types and the range."""
    example = "expected {low: 0.0001, high: 0.01, log: true}, {low: 1, high: 4, int: true} or {choices: [a, b]}"
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{where}: {example}, got {spec!r}")
    for name in spec:
        if name not in SPEC_KEYS:
            close = difflib.get_close_matches(str(name), SPEC_KEYS, n=1, cutoff=0.5)
            near = f"; did you mean {close[0]!r}?" if close else ""
            raise SpaceError(f"{where}: unknown key {name!r}{near} valid: {list(SPEC_KEYS)}")
    for name in ("log", "int"):
        if not isinstance(spec.get(name, False), bool):
            raise SpaceError(f"{where}: {name} must be true or false, got {spec[name]!r}")
    if "choices" in spec:
        others = sorted(set(spec) - {"choices"})
        if others:
            raise SpaceError(f"{where}: give either choices or a range (low, high...), not both; drop {others}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if c is not None and not isinstance(c, (str, bool, int, float))]
        if bad:
            raise SpaceError(f"{where}: choices must be numbers, strings, booleans or null; got {bad[0]!r}")
        return Param(key, choices=tuple(choices))
    missing = [name for name in ("low", "high") if name not in spec]
    if missing:
        raise SpaceError(f"{where}: {example}; missing {missing}")
    low, high = _number(where, "low", spec["low"]), _number(where, "high", spec["high"])
    step = _number(where, "step", spec["step"]) if spec.get("step") is not None else None
    log, integer = bool(spec.get("log", False)), bool(spec.get("int", False))
    if low >= high:
        raise SpaceError(f"{where}: low must be below high, got low {low:g} and high {high:g}")
    if log and low <= 0:
        raise SpaceError(f"{where}: log: true needs low > 0, got {low:g}")
    if step is not None and (step <= 0 or log):
        raise SpaceError(f"{where}: step must be > 0 and cannot go with log: true, got step {step:g}")
    if integer and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise SpaceError(f"{where}: int: true needs whole numbers for low, high and step, "
                          f"got {spec['low']!r}, {spec['high']!r}, {spec.get('step')!r}")
    return Param(key, low=low, high=high, log=log, step=step, int=integer)


def read_space(source: Union[PathLike, Mapping[str, Any]]) -> Dict[str, Param]:
    """A search space from a YAML file (or a mapping), every entry checked; errors name the file and key.

    Torch-free: the command checks the space before it loads anything heavy.
    """
    from cvkit.io import read_mapping

    if isinstance(source, Mapping):
        raw, name = dict(source), "space"
    else:
        try:
            raw, name = read_mapping(source, "search space (YAML: dotted key -> {low, high} or {choices})"), str(source)
        except ValueError as exc:
            raise SpaceError(str(exc)) from None
    if not raw:
        raise SpaceError(f"{name}: no keys to sample; expected e.g. stages.0.lr: {{low: 1e-4, high: 1e-2, log: true}}")
    space = {}
    for key, spec in raw.items():
        key = str(key)
        where = f"{name}: {key}"
        if any(not part for part in key.split(".")):
            raise SpaceError(f"{where}: expected a dotted experiment key like stages.0.lr")
        fixed = next((f for f in FIXED_KEYS if key == f or key.startswith(f + ".")), None)
        if fixed:
            raise SpaceError(f"{where}: {fixed} belongs to the study, not to a trial; it cannot be sampled")
        space[key] = _param(where, key, spec)
    return space


def check_space(space: Mapping[str, Param], completed: Mapping[str, Any], where: str = "space") -> None:
    """Refuse a key that is not in the completed experiment, naming it (a typo would otherwise sample nothing)."""
    from cvkit.config import set_key

    probe = copy.deepcopy(dict(completed))
    for key in space:
        set_key(probe, key, None, existing=True, what=f"{where}: key")


def trial_config(completed: Mapping[str, Any], params: Mapping[str, Any], logdir: PathLike) -> Dict[str, Any]:
    """The experiment of one trial: the completed experiment with ``params`` set at their dotted keys,
    its run folder ``logdir``, resolved and checked as any experiment is (a bad value is a ConfigError)."""
    from cvkit.config import resolve, set_key

    config = copy.deepcopy(dict(completed))
    config.pop("pipelines", None)  # recorded pipelines would hide a sampled augmentation
    for key, value in params.items():
        set_key(config, key, value, existing=True, what="space key")
    config["logdir"] = str(logdir)
    return resolve(config)


def _optuna() -> Any:
    """The optuna module, or a one-line ValueError naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise ValueError(f"hyperparameter search needs optuna, which is not installed: {INSTALL}") from None
    return optuna


def require_optuna() -> None:
    """Check that optuna imports (before a command loads anything else); ValueError naming the extra if not."""
    _optuna()


def storage_for(url: str) -> Any:
    """An Optuna RDB storage for ``url``; SQLite waits up to :data:`SQLITE_TIMEOUT_S` for another
    process's write instead of failing ("database is locked"), as Optuna's docs show for parallel runs."""
    import random
    import time

    optuna = _optuna()
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    attempt = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (ImportError, ArgumentError) as exc:  # a URL sqlalchemy cannot use, or its driver is missing
            raise ValueError(f"storage {_hide_password(url)}: {' '.join(str(exc).split())[:300]}; expected e.g. "
                             "sqlite:///runs/x/study.db or postgresql://user@host/db") from None
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            # Processes starting together race to create the tables and the schema's version row; the
            # loser finds them made on a later try.
            attempt += 1
            if attempt == STORAGE_TRIES:
                raise ValueError(f"storage {_hide_password(url)}: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:300]}") from None
            time.sleep(0.2 + random.random())


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy reads: nothing to hide, it is said as given
        return url


def pruning_callback(trial: "optuna.Trial", valid_metric: str, minimize: bool, valid_loader: str = "valid") -> Any:
    """Catalyst's :class:`~catalyst.callbacks.OptunaPruningCallback`: after each epoch it reports the
    valid metric to ``trial`` at the run's global epoch (``runner.epoch_step`` counts on across a
    StagedRunner's stages) and raises ``optuna.TrialPruned`` when the pruner says so.

    Moved after cvkit's history, checkpoint and console callbacks, so the epoch that prunes a trial is
    logged in its ``log.csv`` and ``resume.pth`` like any other.
    """
    from catalyst.callbacks import OptunaPruningCallback
    from catalyst.core.callback import CallbackOrder

    callback = OptunaPruningCallback(trial, loader_key=valid_loader, metric_key=valid_metric, minimize=minimize)
    callback.order = CallbackOrder.External + 30
    return callback


def _one_line(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    text = " ".join(str(message).split())
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def _default_logdir(config: Mapping[str, Any]) -> Path:
    return Path(config["logdir"]) if config.get("logdir") else Path("runs") / str(config.get("name", "experiment")) / "tune"


def tune(config: Mapping[str, Any], space: Union[PathLike, Mapping[str, Any]], trials: Optional[int] = None,
         storage: Optional[str] = None, timeout: Optional[float] = None, study_name: Optional[str] = None,
         logdir: Optional[PathLike] = None, pruner: Any = "median", sampler_seed: Optional[int] = None,
         verbose: bool = True) -> Dict[str, Any]:
    """Search ``space`` over the resolved experiment ``config``; returns what ``tune.json`` holds.

    Args:
        config: a resolved experiment (:func:`cvkit.config.load_experiment`).
        space: a space YAML file or mapping (:func:`read_space`).
        trials / timeout: this process runs at most ``trials`` trials and starts none after ``timeout``
            seconds (at least one of them; a running trial finishes).
        storage: an Optuna RDB URL; default ``sqlite:///<logdir>/study.db``. Processes sharing it and
            ``study_name`` share the study (a database server URL, e.g. postgresql, for many machines).
        study_name: default the experiment's ``name``.
        logdir: the study's folder (trial folders, best.yaml, tune.json); default the experiment's
            ``logdir``, else ``runs/<name>/tune``.
        pruner: ``"median"`` (Optuna's MedianPruner), None (no pruning) or an Optuna pruner.
        sampler_seed: seeds Optuna's TPE sampler (one process; processes sharing a study should not
            share a seed, or they sample alike).
        verbose: each trial's epoch table (a line per finished trial is said either way).
    """
    from cvkit.config import complete
    from cvkit.io import atomic_write_json

    optuna = _optuna()
    if trials is None and timeout is None:
        raise ValueError("give trials or timeout (or both); without either the search never ends")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
        raise ValueError(f"trials must be a whole number >= 1, got {trials!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    params = read_space(space)
    where = str(space) if not isinstance(space, Mapping) else "space"
    folder = Path(logdir) if logdir is not None else _default_logdir(config)
    study_name = study_name or str(config.get("name", "experiment"))
    base = complete({**config, "logdir": str(folder)})
    check_space(params, base, where)
    _check_logdir_study(folder, study_name)
    folder.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(folder / STORAGE_FILE).resolve().as_posix()}"
    direction = "minimize" if base["minimize_valid_metric"] else "maximize"
    if pruner == "median":
        pruner = optuna.pruners.MedianPruner()
    elif pruner is None:
        pruner = optuna.pruners.NopPruner()
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # cvkit says what happens itself, on stdout
    try:
        summary = _optimize(optuna, base, params, folder, url, study_name, direction, pruner, sampler_seed, trials,
                            timeout, verbose)
    finally:
        optuna.logging.set_verbosity(verbosity)
    atomic_write_json(folder / SUMMARY_FILE, summary)
    return summary


def _optimize(optuna: Any, base: Mapping[str, Any], params: Mapping[str, Param], folder: Path, url: str,
              study_name: str, direction: str, pruner: Any, sampler_seed: Optional[int], trials: Optional[int],
              timeout: Optional[float], verbose: bool) -> Dict[str, Any]:
    """:func:`tune`'s study: created or joined, optimised, summarised (best.yaml written)."""
    from cvkit.status import say

    try:
        study = optuna.create_study(storage=storage_for(url), study_name=study_name, direction=direction,
                                    pruner=pruner, sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                                    load_if_exists=True)
    except ValueError as exc:
        raise ConfigError(f"study {study_name!r} in {_hide_password(url)}: {' '.join(str(exc).split())}") from None
    _check_objective(study, base["valid_metric"], direction, url)

    def objective(trial: "optuna.Trial") -> float:
        return _run_trial(trial, base, params, folder, verbose)

    def report(study: "optuna.Study", trial: "optuna.trial.FrozenTrial") -> None:
        value = "" if trial.value is None else f" {base['valid_metric']} {trial.value:.6g}"
        error = f": {trial.user_attrs['error']}" if trial.user_attrs.get("error") else ""
        say(f"trial {trial.number} {trial.state.name.lower()}{value}{error} ({trial.user_attrs.get('folder')})")

    study.optimize(objective, n_trials=trials, timeout=timeout, catch=(Exception,), callbacks=[report])
    summary = _summary(study, base, url, folder)
    if summary["best"] is not None:
        _write_best(study.best_trial, base, folder / BEST_FILE, summary)
    return summary


def _check_objective(study: "optuna.Study", valid_metric: str, direction: str, url: str) -> None:
    """A joined study must optimise the same valid metric the same way (Optuna loads an existing study
    whatever direction is asked); a new one records its metric."""
    recorded = study.user_attrs.get("valid_metric")
    if recorded is None and not study.trials:
        study.set_user_attr("valid_metric", valid_metric)
        recorded = valid_metric
    have = study.direction.name.lower()
    if (recorded is not None and recorded != valid_metric) or have != direction:
        raise ConfigError(f"study {study.study_name!r} in {_hide_password(url)} {have}s {recorded or 'another metric'}; "
                          f"this experiment {direction}s {valid_metric}; give another --study or storage")


def _check_logdir_study(folder: Path, study_name: str) -> None:
    """One folder holds one study: trial folders are named by trial number, which every study starts at 0."""
    import json

    path = folder / SUMMARY_FILE
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text()).get("study")
    except (ValueError, AttributeError):
        return
    if recorded not in (None, study_name):
        raise ConfigError(f"{path} belongs to study {recorded!r}, not {study_name!r}; give each study its own "
                          "logdir (--logdir) or continue that study (--study)")


def _run_trial(trial: "optuna.Trial", base: Mapping[str, Any], params: Mapping[str, Param], folder: Path,
               verbose: bool) -> float:
    """Train one trial into ``<folder>/trial_<n>``; its best valid score. A failure is recorded in the
    trial's ``error`` attribute (one line) and raised for Optuna to mark the trial FAILED."""
    import optuna

    from cvkit.training import run

    run_folder = folder / f"trial_{trial.number}"
    trial.set_user_attr("folder", str(run_folder))
    try:
        values = {key: param.suggest(trial) for key, param in params.items()}
        config = trial_config(base, values, run_folder)
        try:
            run_folder.mkdir(parents=True)
        except FileExistsError:
            raise ValueError(f"{run_folder} already exists (a trial of another study?); give each study its own "
                             "logdir") from None
        minimize = bool(base["minimize_valid_metric"])
        result = run(config, verbose=verbose,
                     callbacks=lambda stage: [pruning_callback(trial, base["valid_metric"], minimize)])
        score = float(result["best"]["score"])
        if not math.isfinite(score):
            raise ValueError(f"{run_folder}: the best valid {base['valid_metric']} is {score}, not a number to compare")
        return score
    except optuna.TrialPruned:
        raise
    except Exception as exc:
        trial.set_user_attr("error", _one_line(exc))
        raise


def _summary(study: "optuna.Study", base: Mapping[str, Any], url: str, folder: Path) -> Dict[str, Any]:
    """What tune.json holds: the study, its direction and every trial of every process."""
    trials: List[Dict[str, Any]] = []
    counts: Dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        state = trial.state.name
        counts[state] = counts.get(state, 0) + 1
        trials.append({"number": trial.number, "state": state, "value": trial.value, "params": trial.params,
                       "folder": trial.user_attrs.get("folder"), "error": trial.user_attrs.get("error"),
                       "epochs": trial.last_step})
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = None
    if complete:
        chosen = study.best_trial
        best = {"number": chosen.number, "value": chosen.value, "params": chosen.params,
                "folder": chosen.user_attrs.get("folder"), "file": str(folder / BEST_FILE)}
    return {"study": study.study_name, "storage": _hide_password(url), "logdir": str(folder),
            "valid_metric": base["valid_metric"],
            "direction": study.direction.name.lower(), "counts": counts, "best": best, "trials": trials}


def _write_best(best: "optuna.trial.FrozenTrial", base: Mapping[str, Any], path: Path,
                summary: Mapping[str, Any]) -> None:
    """The best trial's experiment as YAML for ``cvkit train``: its run's config.json (the base
    experiment with the sampled values when that folder is out of reach), less the run folder and
    the runner's facts, so a repeat gets a new time-stamped folder."""
    import yaml

    from cvkit.config import RUNNER_KEYS, TOP_LEVEL, read_mapping
    from cvkit.io import atomic_write_bytes

    saved = Path(best.user_attrs.get("folder") or "") / "config.json"
    if saved.is_file():
        config = {k: v for k, v in read_mapping(saved).items() if k not in RUNNER_KEYS}
    else:
        config = trial_config(base, best.params, "")
    config = {key: config[key] for key in TOP_LEVEL if key in config and key not in ("logdir", "pipelines")}
    header = (f"# best trial {best.number} of study {summary['study']!r}: {summary['valid_metric']} {best.value:.6g} "
              f"({summary['direction']})\n# sampled: {best.params}\n# repeat it with: cvkit train {path}\n")
    atomic_write_bytes(path, (header + yaml.safe_dump(config, sort_keys=False)).encode())


def summary_lines(summary: Mapping[str, Any]) -> List[str]:
    """A short human summary of :func:`tune`'s result (what the command prints)."""
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(summary["counts"].items()))
    lines = [f"study {summary['study']!r} ({summary['storage']}): {len(summary['trials'])} trials ({counts}); "
             f"{summary['direction']} {summary['valid_metric']}"]
    best = summary["best"]
    if best is None:
        lines.append("no trial completed, so there is no best.yaml")
    else:
        lines.append(f"best: trial {best['number']} {summary['valid_metric']} {best['value']:.6g} with {best['params']} "
                     f"({best['folder']})")
        lines.append(f"repeat it with: cvkit train {best['file']}")
    lines.append(f"every trial: {Path(summary['logdir']) / SUMMARY_FILE}")
    return lines


__all__ = ["Param", "SpaceError", "check_space", "pruning_callback", "read_space", "require_optuna", "storage_for",
           "summary_lines", "trial_config", "tune"]
