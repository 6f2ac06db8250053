"""The ``cvkit`` command: one subcommand per registered function.

A subcommand is a function ``run(args) -> exit code`` registered with its options::

    def _my_args(parser): parser.add_argument("--steps", type=int, default=100, help="...")

    @register_command("lr-find", "Find a learning rate range.", _my_args)
    def _lr_find(args): ...

Exit codes: 0 success, 1 the command ran and found problems (``check``), 2 bad usage or bad
data, reported as one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from cvkit.data.io import DataError

Run = Callable[[argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]
TASKS = ("classification", "boxes", "keypoints", "segmentation")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: AddArguments
    run: Run


_COMMANDS: Dict[str, Command] = {}


class UsageError(Exception):
    """Options that do not fit together; reported like an argparse error (exit 2)."""


def register_command(name: str, help: str, add_arguments: AddArguments) -> Callable[[Run], Run]:
    """Register ``run(args) -> int`` as ``cvkit <name>``; ``add_arguments(parser)`` declares its options."""

    def decorator(run: Run) -> Run:
        if name in _COMMANDS:
            raise ValueError(f"cvkit command {name!r} is already registered")
        _COMMANDS[name] = Command(name, help, add_arguments, run)
        return run

    return decorator


def list_commands() -> List[str]:
    return sorted(_COMMANDS)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` when there is a default worth showing and the help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = _Parser(prog="cvkit", description="cvkit: datasets, checks and training for image competitions.",
                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in list_commands():
        command = _COMMANDS[name]
        p = sub.add_parser(name, help=command.help, description=command.help,
                           formatter_class=_HelpFormatter)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``cvkit`` console script."""
    import cvkit.commands  # noqa: F401  (registers train, predict, lr-find, outliers, report)
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"cvkit {args.command}"
    try:
        return int(args._run(args))
    except UsageError as exc:
        print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
    except (DataError, ValueError, KeyError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _columns(text: Optional[str]) -> Optional[List[str]]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that describe a dataset on disk (shared by ``check`` and, later, ``train``/``predict``)."""
    from cvkit.data.boxes import BOX_FORMATS

    parser.add_argument("data", help="CSV with one row per image, or a folder of class sub-folders "
                                     "(classification), or a Severstal RLE CSV with --rle")
    parser.add_argument("--task", choices=TASKS, default="classification", help="what the targets are")
    parser.add_argument("--root", help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    parser.add_argument("--path-col", default="path", help="column holding the image path")
    parser.add_argument("--label-col", default="label", help="column holding the class label (classification, boxes)")
    parser.add_argument("--class-map", help="JSON {label name: index}; default: the sorted labels of the CSV")
    parser.add_argument("--box-cols", default="x1,y1,x2,y2", help="the 4 box columns, comma-separated (boxes)")
    parser.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy",
                        help="how the box columns are written; *_norm = fractions of width/height")
    parser.add_argument("--keypoint-cols", help="x,y columns alternating, comma-separated, e.g. x0,y0,x1,y1 "
                                                "(keypoints); or one column of space-separated numbers")
    parser.add_argument("--num-keypoints", type=int, help="points per image when --keypoint-cols is one column")
    parser.add_argument("--mask-col", default="mask", help="column holding the PNG mask path (segmentation)")
    parser.add_argument("--mask-root", help="folder the mask paths are relative to (default: --root)")
    parser.add_argument("--num-classes", type=int, default=1,
                        help="mask channels (segmentation); PNG value k sets channel k-1, RLE ClassId is 1-based")
    parser.add_argument("--rle", action="store_true",
                        help="DATA is a Severstal CSV (ImageId, ClassId, EncodedPixels); --root is the image folder")


def dataset_from_args(args: argparse.Namespace, transform: Any = None) -> Any:
    """Build the dataset described by :func:`add_dataset_arguments`' options."""
    from cvkit.data import datasets as D

    data = Path(args.data)
    if args.task == "classification" and data.is_dir():
        return D.ClassificationDataset.from_folders(data, class_map=args.class_map, transform=transform)
    if args.task == "segmentation" and args.rle:
        if not args.root:
            raise UsageError("--rle needs --root, the folder of the images named in ImageId")
        return D.SegmentationDataset.from_rle(data, args.root, num_classes=args.num_classes, transform=transform)
    common = dict(root=args.root, path_col=args.path_col, transform=transform)
    if args.task == "classification":
        return D.ClassificationDataset(data, label_col=args.label_col, class_map=args.class_map, **common)
    if args.task == "boxes":
        return D.BoxDataset(data, label_col=args.label_col, class_map=args.class_map, box_cols=_columns(args.box_cols),
                            box_format=args.box_format, **common)
    if args.task == "keypoints":
        cols = _columns(args.keypoint_cols)
        if not cols:
            raise UsageError("--task keypoints needs --keypoint-cols")
        return D.KeypointDataset(data, keypoint_cols=cols[0] if len(cols) == 1 else cols,
                                 num_keypoints=args.num_keypoints, **common)
    return D.SegmentationDataset(data, mask_col=args.mask_col, mask_root=args.mask_root,
                                 num_classes=args.num_classes, **common)


def _check_args(p: argparse.ArgumentParser) -> None:
    add_dataset_arguments(p)
    p.add_argument("--report", help="also write every problem to this CSV (index,row,path,code,message)")
    p.add_argument("--limit", type=int, default=50, help="problems printed to the terminal")
    p.add_argument("--workers", type=int, help="reader threads (default: up to 8, one per core)")


@register_command("check", "Validate a dataset before training and list every bad row (exit 1 if any).", _check_args)
def _check(args: argparse.Namespace) -> int:
    from cvkit.data.check import check_dataset

    report = check_dataset(dataset_from_args(args), workers=args.workers, progress=sys.stderr.isatty())
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
                                     "so relative image paths stay valid)")
    p.add_argument("--valid-fraction", type=float, default=0.2, help="share of each class that goes to valid.csv")
    p.add_argument("--label-col", default="label", help="stratify by this column")
    p.add_argument("--no-stratify", action="store_true", help="ignore --label-col and split at random")
    p.add_argument("--folds", type=int, help="write folds.csv with a 'fold' column 0..K-1 instead of train/valid")
    p.add_argument("--group-col", help="with --folds: keep rows sharing this column's value in one fold")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same split")


@register_command("split", "Split a CSV into train/valid (stratified, seeded), or add a k-fold column.", _split_args)
def _split(args: argparse.Namespace) -> int:
    from cvkit.data.tools import add_folds, split_train_valid

    out_dir = Path(args.out_dir) if args.out_dir else Path(args.csv).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    label = None if args.no_stratify else args.label_col
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

    frame, summary = inventory(args.csv, args.root, args.path_col, args.workers, progress=sys.stderr.isatty())
    out = Path(args.out)
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
    p.add_argument("--max-images", type=int, default=2000, help="images read per split (a seeded sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample")
    p.add_argument("--workers", type=int, help="reader threads (default: up to 8, one per core)")


@register_command("eda", "Compare train and test (size, brightness/contrast, colour, labels) as PNG plots.", _eda_args)
def _eda(args: argparse.Namespace) -> int:
    from cvkit.data.tools import eda

    written = eda(args.train, args.test, args.out_dir, root=args.root, test_root=args.test_root,
                  path_col=args.path_col, label_col=args.label_col, max_images=args.max_images, seed=args.seed,
                  workers=args.workers, progress=sys.stderr.isatty())
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    from cvkit.cli import main as _main  # the imported module, where the subcommands register

    sys.exit(_main())
