"""``cvkit tune``: hyperparameter search over an experiment's keys, a thin layer over :func:`cvkit.tune.tune`."""
from __future__ import annotations

import argparse

from cvkit.cli.base import UsageError, loading, register_command
from cvkit.cli.experiment import _experiment_args


def _tune_args(p: argparse.ArgumentParser) -> None:
    _experiment_args(p)
    p.add_argument("--space", required=True,
                   help="search space YAML: dotted experiment key -> {low, high[, log, step, int]} or {choices: [...]}, "
                        "e.g. 'stages.1.lr: {low: 1e-4, high: 1e-2, log: true}'")
    p.add_argument("--trials", type=int, help="trials this process runs (several processes on one --storage each run theirs)")
    p.add_argument("--timeout", type=float, help="start no trial after this many seconds (a running trial finishes)")
    p.add_argument("--storage", help="Optuna storage URL shared by every process of the study "
                                     "(default: sqlite:///LOGDIR/study.db; postgresql://... for many machines)")
    p.add_argument("--study", help="study name (default: the experiment's name); one study per logdir")
    p.add_argument("--logdir", help="folder of the study: trial_<n>/ runs, best.yaml, tune.json "
                                    "(default: the experiment's logdir, else runs/<name>/tune)")
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end (default: Optuna's "
                                                          "median pruner on the per-epoch valid metric)")
    p.add_argument("--sampler-seed", type=int, help="seed of the TPE sampler (one process)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch tables, only a line per trial")


@register_command("tune", "Search hyperparameters (any experiment key) with Optuna; each trial is a run folder.",
                  _tune_args)
def _tune(args: argparse.Namespace) -> int:
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {args.trials}")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    if args.trials is None and args.timeout is None:
        raise UsageError("give --trials N or --timeout SECONDS (or both); without either the search never ends")
    from cvkit.tune import read_space, require_optuna, summary_lines

    read_space(args.space)  # a bad space file is refused before torch loads
    require_optuna()
    loading("torch, timm, catalyst, optuna")
    from cvkit.config import saved_run_folder
    from cvkit.experiment import load_experiment
    from cvkit.tune import tune

    config = load_experiment(args.config, args.overrides)
    if saved_run_folder(args.config) is not None and not any(o.startswith("logdir=") for o in args.overrides):
        config.pop("logdir")  # a run's config.json: the study goes beside, never into, that run
    summary = tune(config, args.space, trials=args.trials, storage=args.storage, timeout=args.timeout,
                   study_name=args.study, logdir=args.logdir, pruner=None if args.no_prune else "median",
                   sampler_seed=args.sampler_seed, verbose=not args.quiet)
    for line in summary_lines(summary):
        print(line)
    return 0
