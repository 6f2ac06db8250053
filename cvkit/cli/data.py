"""Data commands: check, split, inventory, stats, eda (no model, no training)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

from cvkit.cli.base import UsageError, refuse_overwriting_inputs, register_command


def _columns(text: Optional[str]) -> Optional[List[str]]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """``DATA``, ``--task`` and every registered task's dataset options (:attr:`cvkit.tasks.Task.options`)."""
    from cvkit.tasks import TASKS, list_tasks
    from cvkit.tasks.base import ALIASES

    parser.add_argument("data", help="CSV with one row per image, or a folder of class sub-folders "
                                     "(classification), or a Severstal RLE CSV with --rle")
    parser.add_argument("--task", choices=[*list_tasks(), *ALIASES], default="classification",
                        help="what the targets are")
    seen = set()
    for _, task in TASKS.items():
        for option in task.options:
            if option.key not in seen:
                seen.add(option.key)
                option.add_to(parser)


def _through_task(build: Callable[[Any], Any], args: argparse.Namespace) -> Any:
    """``build(task)`` for ``--task``; a task's :class:`~cvkit.config.ConfigError` (a missing or
    contradictory flag) becomes a :class:`UsageError`."""
    from cvkit.tasks import get_task

    try:
        return build(get_task(args.task))
    except ValueError as exc:
        # cvkit.config loads torch, so it is not imported up front; a ConfigError means it is loaded.
        config = sys.modules.get("cvkit.config")
        if config is not None and isinstance(exc, config.ConfigError):
            raise UsageError(str(exc)) from None
        raise


def dataset_from_args(args: argparse.Namespace, transform: Any = None) -> Any:
    """Build the dataset described by :func:`add_dataset_arguments`' options, through the task."""
    return _through_task(lambda task: task.dataset_from_args(args, transform), args)


def table_rows_from_args(args: argparse.Namespace) -> Any:
    """The torch-free rows of that dataset (:meth:`cvkit.tasks.Task.table_rows`): what ``check`` scans."""
    return _through_task(lambda task: task.table_rows_from_args(args), args)


def _check_args(p: argparse.ArgumentParser) -> None:
    add_dataset_arguments(p)
    p.add_argument("--report", help="also write every problem to this CSV (index,row,path,code,message)")
    p.add_argument("--limit", type=int, default=50, help="problems printed to the terminal")
    p.add_argument("--workers", type=int, help="reader threads (default: up to 8, one per core)")


@register_command("check", "Validate a dataset before training and list every bad row (exit 1 if any).", _check_args)
def _check(args: argparse.Namespace) -> int:
    from cvkit.data.check import check_dataset

    report = check_dataset(table_rows_from_args(args), workers=args.workers, progress=sys.stderr.isatty())
    print(report.summary(limit=args.limit))
    if args.report:
        report.write_csv(args.report)
    return 0 if report.ok else 1


def _table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="CSV with one row per image")
    p.add_argument("--root", help="folder the image paths are relative to (default: the CSV's folder)")
    p.add_argument("--path-col", default="path", help="column holding the image path")
    p.add_argument("--workers", type=int, help="reader threads (default: up to 8, one per core)")


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csv", help="CSV with one row per image")
    p.add_argument("--out-dir", help="where to write train.csv/valid.csv or folds.csv (default: the CSV's folder, "
                                     "so relative image paths stay valid); never over the input CSV")
    p.add_argument("--valid-fraction", type=float, default=0.2, help="share of each class that goes to valid.csv")
    p.add_argument("--label-col", default="label", help="stratify by this column")
    p.add_argument("--no-stratify", action="store_true", help="ignore --label-col and split at random")
    p.add_argument("--folds", type=int, help="write folds.csv with a 'fold' column 0..K-1 (K >= 2) instead of "
                                            "train/valid")
    p.add_argument("--group-col", help="with --folds: keep rows sharing this column's value in one fold")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same split")


@register_command("split", "Split a CSV into train/valid (stratified, seeded), or add a k-fold column.", _split_args)
def _split(args: argparse.Namespace) -> int:
    from cvkit.data.tools import add_folds, split_train_valid

    out_dir = Path(args.out_dir) if args.out_dir else Path(args.csv).parent
    label = None if args.no_stratify else args.label_col
    if args.folds is not None and args.folds < 2:
        raise UsageError(f"--folds must be at least 2 (each row is valid in one fold), got {args.folds}")
    outputs = ["folds.csv"] if args.folds else ["train.csv", "valid.csv"]
    refuse_overwriting_inputs([out_dir / name for name in outputs], [args.csv],
                              f"give --out-dir, then train with data.root: {Path(args.csv).parent}, the folder "
                              "its image paths are relative to")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.folds:
        frame = add_folds(args.csv, args.folds, label_col=label, group_col=args.group_col, seed=args.seed)
        frame.to_csv(out_dir / "folds.csv", index=False)
        print(f"wrote {out_dir / 'folds.csv'}: {frame['fold'].value_counts().sort_index().to_dict()} rows per fold")
        return 0
    if args.group_col:
        raise UsageError("--group-col only applies with --folds")
    train, valid = split_train_valid(args.csv, args.valid_fraction, label_col=label, seed=args.seed)
    train.to_csv(out_dir / "train.csv", index=False)
    valid.to_csv(out_dir / "valid.csv", index=False)
    print(f"wrote {out_dir / 'train.csv'} ({len(train)} rows) and {out_dir / 'valid.csv'} ({len(valid)} rows)")
    return 0


def _inventory_args(p: argparse.ArgumentParser) -> None:
    _table_args(p)
    p.add_argument("--out", default="inventory.csv",
                   help="inventory CSV to write; the summary goes next to it as <name>.summary.json")


@register_command("inventory", "List every image's size, channels, mode and file size, plus a summary.",
                  _inventory_args)
def _inventory(args: argparse.Namespace) -> int:
    from cvkit.data.tools import inventory
    from cvkit.io import atomic_write_json

    out = Path(args.out)
    refuse_overwriting_inputs([out, out.with_suffix(".summary.json")], [args.csv], "choose another --out")
    frame, summary = inventory(args.csv, args.root, args.path_col, args.workers, progress=sys.stderr.isatty())
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    atomic_write_json(out.with_suffix(".summary.json"), summary)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _stats_args(p: argparse.ArgumentParser) -> None:
    _table_args(p)
    p.add_argument("--out", help="also write the result as JSON here")


@register_command("stats", "Exact per-channel RGB mean/std in [0, 1] over every pixel (for Normalize).", _stats_args)
def _stats(args: argparse.Namespace) -> int:
    from cvkit.data.tools import mean_std
    from cvkit.io import atomic_write_json

    refuse_overwriting_inputs([args.out] if args.out else [], [args.csv], "choose another --out")
    result = mean_std(args.csv, args.root, args.path_col, args.workers, progress=sys.stderr.isatty())
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def _eda_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", help="train CSV")
    p.add_argument("test", help="test CSV (the label column may be absent)")
    p.add_argument("--out-dir", default="eda", help="folder for the PNG plots")
    p.add_argument("--root", help="folder of the train image paths (default: the train CSV's folder)")
    p.add_argument("--test-root", help="folder of the test image paths (default: the test CSV's folder)")
    p.add_argument("--path-col", default="path", help="column holding the image path")
    p.add_argument("--label-col", default="label", help="label column for the balance plot")
    p.add_argument("--max-images", type=int, default=2000, help="images read per split (a seeded sample; >= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample")
    p.add_argument("--workers", type=int, help="reader threads (default: up to 8, one per core)")


@register_command("eda", "Compare train and test (size, brightness/contrast, colour, labels) as PNG plots.", _eda_args)
def _eda(args: argparse.Namespace) -> int:
    from cvkit.data.tools import eda

    if args.max_images < 1:
        raise UsageError(f"--max-images must be at least 1 (images read per split), got {args.max_images}")
    written = eda(args.train, args.test, args.out_dir, root=args.root, test_root=args.test_root,
                  path_col=args.path_col, label_col=args.label_col, max_images=args.max_images, seed=args.seed,
                  workers=args.workers, progress=sys.stderr.isatty())
    for path in written:
        print(path)
    return 0
