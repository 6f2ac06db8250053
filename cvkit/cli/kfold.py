"""The ``cvkit kfold`` command: actions on a k-fold folder (``cvkit train --folds K`` trains one).

``cvkit kfold collect DIR`` writes ``oof.csv``, ``cv.json`` and the tuned post-processing once every
fold has finished, e.g. after a Slurm array trained one fold per job (``--folds K --fold $SLURM_ARRAY_TASK_ID``)
whose last job could not (:func:`cvkit.kfold.collect`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cvkit.cli.base import loading, register_command


def _kfold_args(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    collect = actions.add_parser("collect", help="write oof.csv and cv.json from a k-fold folder's finished folds",
                                 description="Write oof.csv, cv.json and the tuned post-processing of a k-fold "
                                             "folder whose folds have all finished (each holds metrics.json).",
                                 formatter_class=p.formatter_class)
    collect.add_argument("logdir", metavar="DIR", help="the k-fold folder (the experiment's logdir; holds kfold.json)")
    collect.add_argument("--quiet", action="store_true", help="no [cvkit] progress lines")


@register_command("kfold", "K-fold folders: 'collect DIR' writes oof.csv and cv.json from the finished folds.",
                  _kfold_args)
def _kfold(args: argparse.Namespace) -> int:
    loading("torch, timm")
    from cvkit.kfold import collect

    summary = collect(args.logdir, verbose=not args.quiet)
    print(json.dumps(summary, indent=2, default=str))
    print(f"out-of-fold predictions in {Path(args.logdir) / 'oof.csv'}, summary in {Path(args.logdir) / 'cv.json'}")
    return 0
