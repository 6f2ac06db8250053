"""Experiment commands: train, predict, lr-find, outliers, report.

Each one is a thin layer over the library (:mod:`cvkit.experiment`, :mod:`cvkit.inference.predict`,
:mod:`cvkit.tools`); errors come back as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from cvkit.cli.base import UsageError, loading, refuse_overwriting_inputs, register_command
from cvkit.engines import ENGINES
from cvkit.status import progress_bars_wanted, say


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, or a run's config.json to repeat that run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key before validation, e.g. --set stages.0.epochs=1 --set data.limit=64 "
                        "(value parsed as YAML; repeatable)")


def _load(args: argparse.Namespace) -> Dict[str, Any]:
    from cvkit.experiment import load_experiment

    return load_experiment(args.config, args.overrides)


# --- train -------------------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    _experiment_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the experiment's logdir from its last completed epoch")
    p.add_argument("--resume-changed", action="store_true",
                   help="with --resume: continue although the experiment changed since the run started "
                        "(the new values are recorded in config.json)")
    p.add_argument("--folds", type=int, help="k-fold: train fold k of K into LOGDIR/fold_k/ (the table's 'fold' column, "
                                            "else a seeded stratified split) and write oof.csv and cv.json")
    p.add_argument("--fold", type=int, metavar="K",
                   help="with --folds: train only fold K (0-based) into LOGDIR/fold_K/, as one job of a Slurm array; "
                        "the job that finishes the last fold writes oof.csv and cv.json (needs a named logdir)")
    p.add_argument("--group-col", help="with --folds: rows sharing this column's value stay in one fold")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


@register_command("train", "Train a YAML experiment (all its stages); writes the run to its logdir.", _train_args)
def _train(args: argparse.Namespace) -> int:
    if args.resume_changed and not args.resume:
        raise UsageError("--resume-changed only applies with --resume")
    if args.group_col and not args.folds:
        raise UsageError("--group-col only applies with --folds")
    if args.folds is not None and args.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {args.folds}")
    if args.fold is not None and args.folds is None:
        raise UsageError("--fold only applies with --folds (the number of folds every fold's job shares)")
    if args.fold is not None and not 0 <= args.fold < args.folds:
        raise UsageError(f"--fold must be a fold of --folds {args.folds}: 0 to {args.folds - 1}, got {args.fold}")
    loading("torch, timm, catalyst")
    from cvkit.training import run

    config = _load(args)
    if args.fold is not None:
        return _train_fold(args, config)
    claimed = _new_logdir(args, config)
    try:
        if args.folds is not None:
            from cvkit.kfold import kfold

            summary = kfold(config, args.folds, args.group_col, resume=args.resume, verbose=not args.quiet,
                            allow_changes=args.resume_changed)
            print(json.dumps(summary, indent=2, default=str))
            print(f"folds written to {config['logdir']}/fold_*; out-of-fold predictions in "
                  f"{Path(config['logdir']) / 'oof.csv'}")
            return 0
        result = run(config, resume=args.resume, verbose=not args.quiet, allow_changes=args.resume_changed)
    except BaseException:
        if claimed:
            with contextlib.suppress(OSError):
                Path(claimed).rmdir()  # only while the failed run left it empty
        raise
    summary = {"best": result["best"], "valid": result.get("valid"), "test": result.get("test")}
    print(json.dumps(summary, indent=2, default=str))
    print(f"run written to {config['logdir']} (repeat it with: cvkit train {Path(config['logdir']) / 'config.json'})")
    return 0


def _train_fold(args: argparse.Namespace, config: Dict[str, Any]) -> int:
    """``--folds K --fold k``: one fold's job of a k-fold whose folder every job names (the experiment's logdir)."""
    from cvkit.config import saved_run_folder
    from cvkit.kfold import kfold

    own_logdir = any(o.partition("=")[0].strip() == "logdir" for o in args.overrides)
    if not config.get("logdir") or (saved_run_folder(args.config) is not None and not own_logdir):
        raise UsageError("--fold trains into the k-fold folder every fold's job shares: name it in the experiment "
                         "(logdir: runs/x) or with --set logdir=runs/x")
    summary = kfold(config, args.folds, args.group_col, resume=args.resume, verbose=not args.quiet,
                    allow_changes=args.resume_changed, fold=args.fold)
    base = Path(config["logdir"])
    print(f"fold {args.fold} of {args.folds} written to {base / f'fold_{args.fold}'}")
    if summary is None:
        print(f"other folds are unfinished; the job that finishes the last one writes {base / 'oof.csv'} and "
              f"cv.json (or, once all are finished: cvkit kfold collect {base})")
    else:
        print(json.dumps(summary, indent=2, default=str))
        print(f"all {args.folds} folds finished: out-of-fold predictions in {base / 'oof.csv'}, summary in "
              f"{base / 'cv.json'}")
    return 0


def _new_logdir(args: argparse.Namespace, config: Dict[str, Any]) -> Optional[str]:
    """Set ``config["logdir"]``: with --resume the run to continue; for a saved run's config.json a new
    time-stamped folder beside it (never over the run it repeats); without a logdir a new time-stamped
    folder. Returns the folder claimed for this run, if any (:func:`cvkit.config.claim_logdir`)."""
    from cvkit.config import claim_logdir, latest_logdir, saved_run_folder

    if args.resume:
        config["logdir"] = config.get("logdir") or latest_logdir(config)
        return None
    repeated = saved_run_folder(args.config)
    if repeated is not None and not any(o.partition("=")[0].strip() == "logdir" for o in args.overrides):
        config["logdir"] = claim_logdir(config, parent=repeated.parent)
        print(f"repeating the run in {repeated} as a new run in {config['logdir']} (--resume continues it instead)")
        return config["logdir"]
    if not config.get("logdir"):
        config["logdir"] = claim_logdir(config)
        return config["logdir"]
    return None


# --- predict -----------------------------------------------------------------------------------

def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", action="append",
                   help="weights to predict with: a best.pth, a run folder, or a k-fold run folder (its folds are "
                        "averaged); repeat it to average several models")
    p.add_argument("--allow-missing-folds", action="store_true",
                   help="average a k-fold run folder's remaining folds when some fold (or its best.pth) is gone")
    p.add_argument("--config", help="the run's config.json (or the experiment YAML it came from); default: the "
                                    "first --checkpoint's run folder (the folder itself, or a best.pth's folder)")
    p.add_argument("--model", help="an exported model (cvkit export: model.onnx or model.pt, its contract JSON "
                                   "beside it) to predict with instead of --checkpoint/--config")
    p.add_argument("--images", required=True,
                   help="a folder of images (searched recursively) or a CSV with a --path-col column")
    p.add_argument("--out", default="submission.csv", help="CSV to write, one row per image (per class for masks)")
    p.add_argument("--tta", help="comma-separated test-time transforms averaged with the plain "
                                            "prediction, e.g. hflip,vflip or 'shift(4, 0)'")
    p.add_argument("--flip-pairs", type=_flip_pairs, metavar="I-J,...",
                   help="keypoint index pairs that swap under a mirror TTA, e.g. 0-1,2-3 ('none' if no pair does)")
    p.add_argument("--probs", action="store_true", help="add one prob_<class> column per class")
    p.add_argument("--root", help="folder the CSV's image paths are relative to (default: the CSV's folder)")
    p.add_argument("--path-col", default="path", help="image path column of an --images CSV")
    p.add_argument("--image-size", type=int, help="network input size (default: the run's last stage size)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--threshold", type=float,
                   help="mask probability that sets a pixel (segmentation); default: the run's tuned "
                        "postprocess.json when it has one, else 0.5")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--tile", type=int, help="segmentation: predict at full resolution in TILE x TILE windows, blended")
    p.add_argument("--overlap", type=int, default=64, help="with --tile: pixels neighbouring windows share")
    p.add_argument("--export-dir", help="also copy each image into EXPORT_DIR/<predicted class>/ (tasks with labels)")


@register_command("predict", "Predict a folder or CSV of images with a run's checkpoint into a submission CSV.",
                  _predict_args)
def _predict(args: argparse.Namespace) -> int:
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    inputs = [args.images, *(args.checkpoint or []), *(p for p in (args.config, args.model) if p)]
    refuse_overwriting_inputs([args.out], inputs, "choose another --out")
    tta = [t.strip() for t in _split_specs(args.tta or "") if t.strip()]
    if args.model:
        given = [f for f, v in (("--checkpoint", args.checkpoint), ("--config", args.config),
                                ("--image-size", args.image_size), ("--tile", args.tile),
                                ("--allow-missing-folds", args.allow_missing_folds or None)) if v is not None]
        if given:
            raise UsageError(f"--model predicts with the exported model and its contract; drop {', '.join(given)}")
        loading("torch")
        from cvkit.inference.runtime import predict_exported

        frame = predict_exported(args.model, args.images, args.out, tta=tta, probs=args.probs,
                                 batch_size=args.batch_size, threshold=args.threshold, root=args.root,
                                 path_col=args.path_col, flip_pairs=args.flip_pairs)
    else:
        if not args.checkpoint:
            raise UsageError("give --checkpoint (a run folder or its best.pth), or --model (an exported model)")
        loading("torch, timm")
        from cvkit.inference.runs import predict_run

        frame = predict_run(args.checkpoint, args.config or _run_folder(args.checkpoint[0]), args.images, args.out,
                            tta=tta, probs=args.probs, batch_size=args.batch_size, device=args.device,
                            image_size=args.image_size, root=args.root, path_col=args.path_col,
                            threshold=args.threshold, workers=args.workers, progress=sys.stderr.isatty(),
                            flip_pairs=args.flip_pairs, tile=args.tile, overlap=args.overlap,
                            allow_missing_folds=args.allow_missing_folds)
    left_out = _without_folds(args.checkpoint) if args.allow_missing_folds and args.checkpoint else ""
    print(f"wrote {args.out} ({len(frame)} rows{left_out})")
    if args.export_dir:
        print(f"copied {_export_by_class(args, frame)} images into {args.export_dir}/<class>/")
    return 0


def _run_folder(checkpoint: str) -> str:
    """The run folder ``--checkpoint`` names (itself, or a checkpoint file's folder) when it holds the
    run's config.json (a k-fold run folder: its folds' own), for a prediction without --config."""
    from cvkit.run_folder import kfold_members

    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    folds, missing = kfold_members(folder)
    if (folder / "config.json").is_file() or folds or missing:
        return str(folder)
    raise UsageError(f"--checkpoint {checkpoint}: {folder / 'config.json'} not found; give --config (the run's "
                     "config.json or experiment YAML)")


def _without_folds(checkpoints: List[str]) -> str:
    """``; without ...`` naming the folds a k-fold ensemble left out (--allow-missing-folds), else ``''``."""
    from cvkit.run_folder import kfold_members

    missing = [f"{c}/{m}" for c in checkpoints for m in kfold_members(c)[1]]
    return f"; the folds' ensemble without {', '.join(missing)}, as --allow-missing-folds allows" if missing else ""


def _export_by_class(args: argparse.Namespace, frame: Any) -> int:
    """Copy each predicted image into ``--export-dir/<label>/`` (the submission's ``label`` column)."""
    from cvkit.inference.export import export_by_class
    from cvkit.inference.predict import list_images

    if "label" not in frame.columns:
        raise UsageError(f"--export-dir sorts images by predicted class; this task's rows have no label column "
                         f"({', '.join(map(str, frame.columns))})")
    files, names = list_images(args.images, args.root, args.path_col)
    by_name = dict(zip(names, files))
    return export_by_class([by_name[str(n)] for n in frame["path"]], frame["label"], args.export_dir)


def _flip_pairs(text: str) -> List[Tuple[int, int]]:
    """``0-1,2-3`` -> ``[(0, 1), (2, 3)]``; ``none`` -> ``[]``."""
    if text.strip().lower() == "none":
        return []
    try:
        return [(int(a), int(b)) for a, b in (part.split("-") for part in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected index pairs like 0-1,2-3 (or 'none'), got {text!r}") from None


def _split_specs(text: str) -> List[str]:
    """Split ``hflip,shift(4, 0)`` on the commas outside parentheses."""
    out, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += char
    return out + [current] if current else out


# --- lr-find -----------------------------------------------------------------------------------

def _lr_find_args(p: argparse.ArgumentParser) -> None:
    _experiment_args(p)
    p.add_argument("--stage", help="stage whose trainable set, optimizer, batch and image size are used "
                                   "(default: the first)")
    p.add_argument("--group", help="sweep only this parameter group (head, backbone or an lr key); the others "
                                   "keep the stage's LRs")
    p.add_argument("--out", default="lr.png", help="plot of the loss against the LR")
    p.add_argument("--steps", type=int, default=100, help="batches in the sweep")
    p.add_argument("--start-lr", type=float, default=1e-7, help="first LR of the sweep")
    p.add_argument("--end-lr", type=float, default=10.0, help="last LR of the sweep")


@register_command("lr-find", "LR range test on an experiment's stage; prints the suggested LR, plots the curve.",
                  _lr_find_args)
def _lr_find(args: argparse.Namespace) -> int:
    loading("torch, timm")
    from cvkit.experiment import build
    from cvkit.tools.lr_find import lr_find

    experiment = build(_load(args))
    names = [s.name for s in experiment.stages]
    if args.stage is not None and args.stage not in names:
        raise UsageError(f"--stage {args.stage!r} is not a stage of {args.config}; stages: {names}")
    stage = experiment.stages[names.index(args.stage) if args.stage else 0]
    experiment.prepare()
    loader = experiment.loaders(stage)["train"]
    engine = experiment.config["engine"]
    device = "cuda" if engine is not None and ENGINES.meta(engine).get("cuda") else "cpu"
    which = f" for group {args.group!r}" if args.group else ""
    swept = f"group {args.group!r} (the others at the stage's LRs)" if args.group else "every group"
    say(f"lr-find: sweeping stage {stage.name!r} (trainable: {stage.trainable}), {swept}, over {args.steps} batches "
        f"from lr {_fmt(args.start_lr)} to {_fmt(args.end_lr)} on {device}; the plot goes to {args.out}")
    started = time.perf_counter()
    result = lr_find(experiment.model, loader, experiment.criterion, start_lr=args.start_lr, end_lr=args.end_lr,
                     num_steps=args.steps, trainable=stage.trainable, optimizer=stage.optimizer, group=args.group,
                     lr=stage.lr if args.group else None, weight_decay=stage.weight_decay, train_bn=stage.train_bn,
                     device=device, out_png=args.out, progress=progress_bars_wanted(),
                     optimizer_kwargs=stage.optimizer_kwargs)
    stopped = f" (stopped at lr {_fmt(result.diverged_lr)}: the loss diverged)" if result.diverged_lr is not None else ""
    say(f"lr-find: {len(result.lrs)} of {args.steps} batches swept in {time.perf_counter() - started:.1f} s{stopped}")
    print(f"suggested lr{which}: {_fmt(result.suggested_lr)} (steepest), {_fmt(result.valley_lr)} (valley); "
          f"plot: {args.out}")
    return 0


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.3g}"


# --- outliers ----------------------------------------------------------------------------------

def _outliers_args(p: argparse.ArgumentParser) -> None:
    _experiment_args(p)
    p.add_argument("--checkpoint", help="weights to embed with (default: best.pth next to a run's config.json, "
                                        "else the experiment's weights)")
    p.add_argument("--method", choices=("isolation_forest", "dbscan", "centroid"), default="isolation_forest",
                   help="how unusual each image's features are scored")
    p.add_argument("--split", choices=("train", "valid", "test"), default="train", help="which images to rank")
    p.add_argument("--global", dest="per_class", action="store_false",
                   help="score all images together instead of within each class")
    p.add_argument("--top", type=int, default=50, help="suspects written to the CSV and the sheet (0: all to the CSV)")
    p.add_argument("--out", default="outliers.csv", help="CSV of suspects, most suspicious first")
    p.add_argument("--sheet", help="also write a contact sheet PNG of the top suspects")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")


@register_command("outliers", "Rank a split's images by how unusual their features are (mislabelled/broken).",
                  _outliers_args)
def _outliers(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise UsageError(f"--top must be >= 0 (0 writes every image to the CSV), got {args.top}")
    loading("torch, timm")
    from cvkit.data.loaders import make_loader
    from cvkit.experiment import build, image_size, load_weights
    from cvkit.tools.outliers import contact_sheet, extract_features, rank_outliers

    config = _load(args)
    checkpoint = args.checkpoint
    beside = Path(args.config).parent / "best.pth"
    if checkpoint is None and Path(args.config).name == "config.json" and beside.is_file():
        checkpoint = beside
    experiment = build(config)
    if checkpoint is not None:
        load_weights(experiment.model, checkpoint)
    if args.split not in experiment.datasets:
        raise UsageError(f"--split {args.split}: the data has no {args.split} split; it has {sorted(experiment.datasets)}")
    base = experiment.datasets[args.split]
    dataset = experiment.dataset(args.split, image_size(experiment.config, experiment.config["stages"][-1]))
    loader = make_loader(dataset, args.batch_size, train=False, workers=0)
    features, labels, indices = extract_features(experiment.model, loader,
                                                 feature_fn=experiment.task.features(experiment.model))
    if not experiment.task.label_targets:
        labels = None
    elif experiment.classes:
        labels = [experiment.classes[int(v)] for v in labels]
    frame = rank_outliers(features, labels, indices, method=args.method, per_class=args.per_class and labels is not None)
    if args.top:
        frame = frame.head(args.top)
    paths = [str(base.path(i)) if hasattr(base, "path") else "" for i in frame["index"]]
    frame.insert(1, "path", paths)
    frame.insert(2, "where", [base.where(i) if hasattr(base, "where") else f"{args.split} item {i}" for i in frame["index"]])
    from cvkit.io import atomic_write_bytes

    atomic_write_bytes(args.out, frame.to_csv(index=False).encode())
    if args.sheet:
        images = [base.path(i) for i in range(len(base))] if hasattr(base, "path") else base.images
        contact_sheet(images, frame["index"].tolist(), frame["score"].tolist(), args.sheet,
                      labels=frame["label"].tolist() if labels is not None else None)
    for _, row in frame.head(10).iterrows():
        print(f"{int(row['rank']):4d}  score {row['score']:.4g}  {row['where']}")
    print(f"wrote {args.out} ({len(frame)} rows)" + (f" and {args.sheet}" if args.sheet else ""))
    return 0


# --- report ------------------------------------------------------------------------------------

def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.json and config.json")
    p.add_argument("--out", default="results.md", help="Markdown file to write (also printed)")


def _read_json(path: Path) -> Dict[str, Any]:
    from cvkit.config import read_mapping

    return read_mapping(path, f"{path.name} of a finished run folder")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value).replace("|", "\\|")


def report_table(runs: List[Path]) -> str:
    """A Markdown table, one row per run: model, epochs, image size, best stage/epoch, valid and test metrics."""
    rows: List[Dict[str, Any]] = []
    metric_keys: Dict[str, List[str]] = {"valid": [], "test": []}
    for run in runs:
        metrics, config = _read_json(run / "metrics.json"), _read_json(run / "config.json")
        model = config.get("model")
        if isinstance(model, dict):
            model = model.get("arch") or model.get("encoder") or model.get("name")
        stages = config.get("stages") or []
        sizes = [s.get("image_size") for s in stages if isinstance(s, dict) and s.get("image_size")]
        augmentation = config.get("augmentation") if isinstance(config.get("augmentation"), dict) else {}
        size = sizes[-1] if sizes else augmentation.get("size")
        best = metrics.get("best", {})
        row = {"run": run.name, "model": model, "epochs": metrics.get("epochs"), "image size": size,
               "best": f"{best.get('stage')}/{best.get('epoch')}" if best else None}
        for split in ("valid", "test"):
            for key, value in (metrics.get(split) or {}).items():
                if key.startswith("loss/"):
                    continue
                if key not in metric_keys[split]:
                    metric_keys[split].append(key)
                row[f"{split} {key}"] = value
        rows.append(row)
    columns = ["run", "model", "epochs", "image size", "best"]
    columns += [f"{split} {key}" for split in ("valid", "test") for key in metric_keys[split]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@register_command("report", "A Markdown table comparing runs (model, epochs, size, valid/test metrics).",
                  _report_args)
def _report(args: argparse.Namespace) -> int:
    from cvkit.io import atomic_write_bytes

    table = report_table([Path(r) for r in args.runs])
    atomic_write_bytes(args.out, table.encode())
    print(table, end="")
    return 0
