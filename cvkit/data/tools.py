"""Dataset tools: train/valid split, smoke-run limits, k-fold column, inventory, exact mean/std,
train-vs-test EDA plots.

Each works on a table (CSV path or DataFrame) whose ``path_col`` is relative to ``root`` (the
CSV's folder by default), reads images with :func:`cvkit.data.io.read_image` in threads, and
returns data; the ``cvkit`` command writes the files.
"""
from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from cvkit.data.tables import Table, load_table, require_columns
from cvkit.data.io import DataError, read_image, read_image_info

PathLike = Union[str, os.PathLike]


def _thread_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: Optional[int], progress: bool,
                desc: str) -> Iterable[Any]:
    """``map(fn, items)`` in a thread pool (OpenCV decodes without the GIL), in order, with optional tqdm."""
    pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
    results = pool.map(fn, items)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(items), desc=desc, unit="img")
    try:
        yield from results
    finally:
        pool.shutdown(wait=True)


def _paths(table: Table, root: Optional[PathLike], path_col: str) -> Tuple[pd.DataFrame, List[Path]]:
    """The table and its image paths; a table without rows is a :class:`DataError` naming it."""
    frame, name, default_root = load_table(table)
    require_columns(frame, [path_col], name)
    if frame.empty:
        raise DataError(f"{name}: no rows; expected one image path per row in column {path_col!r}")
    base = Path(root) if root is not None else default_root
    return frame, [base / str(p) for p in frame[path_col]]


def split_train_valid(table: Table, valid_fraction: float = 0.2, label_col: Optional[str] = "label",
                      seed: int = 0) -> Tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows into (train, valid), stratified by ``label_col`` (None: not stratified), seeded.

    Each class gives ``round(n * valid_fraction)`` rows to valid but keeps at least one in train,
    so a class of one stays in train. A table too small to give any valid row is a
    :class:`DataError` saying how many rows it needs.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction}; expected a fraction between 0 and 1 (exclusive)")
    frame, name, _ = load_table(table)
    rng = np.random.default_rng(seed)
    if label_col is None:
        groups = [np.arange(len(frame))]
    else:
        require_columns(frame, [label_col], name)
        groups = [np.asarray(idx) for _, idx in sorted(frame.groupby(label_col, dropna=False).indices.items(),
                                                       key=lambda kv: str(kv[0]))]
    valid = np.zeros(len(frame), dtype=bool)
    for idx in groups:
        chosen = rng.permutation(idx)[: _valid_count(len(idx), valid_fraction)]
        valid[chosen] = True
    if not valid.any():
        need = next(n for n in range(2, 10**9) if _valid_count(n, valid_fraction))
        largest = f" (largest has {max(map(len, groups))})" if groups else ""
        per = f" per {label_col!r} value{largest}" if label_col else ""
        raise DataError(f"{name}: {len(frame)} rows give no valid row at valid_fraction={valid_fraction}; "
                        f"needs at least {need} rows{per}")
    return frame[~valid].reset_index(drop=True), frame[valid].reset_index(drop=True)


def _valid_count(n: int, valid_fraction: float) -> int:
    """Rows of a class of ``n`` that go to valid: ``round(n * fraction)``, leaving at least one in train."""
    return max(0, min(int(round(n * valid_fraction)), n - 1))


def take_items(items: Any, positions: Sequence[int]) -> Any:
    """The rows or items at ``positions`` of a table, a list, a table dataset (its ``subset``) or an
    image-array dataset (``images``/``labels``, e.g. STL-10's), as the same type."""
    index = np.asarray(list(positions), dtype=np.int64)
    if isinstance(items, pd.DataFrame):
        return items.iloc[index].reset_index(drop=True)
    if isinstance(items, list):
        return [items[i] for i in index]
    if hasattr(items, "subset"):
        return items.subset(index.tolist())
    out = copy.copy(items)
    out.images = items.images[index]
    out.labels = None if items.labels is None else items.labels[index]
    return out


def limit_items(items: Any, limit: Optional[int], label_col: Optional[str] = None) -> Any:
    """What a smoke run's ``--limit`` / ``data.limit`` keeps of a table, list or dataset, as the same type: its
    first ``limit`` rows (all of it when ``limit`` is None or 0). With ``label_col`` (a table, or a
    dataset's ``frame``) the first ``max(1, limit // classes)`` rows of every class instead, in table
    order, so a stratified split of the kept rows still sees each class."""
    if not limit:
        return items
    if label_col is None:
        return items if len(items) <= limit else take_items(items, range(limit))
    frame = items if isinstance(items, pd.DataFrame) else getattr(items, "frame", None)
    if frame is None:
        raise ValueError(f"limit_items: label_col={label_col!r} needs a table or a table dataset")
    require_columns(frame, [label_col], "the table")
    per_class = max(1, limit // max(1, frame[label_col].nunique()))
    keep = np.flatnonzero(frame.groupby(label_col, sort=False).cumcount().to_numpy() < per_class)
    return items if len(keep) == len(items) else take_items(items, keep)


def add_folds(table: Table, n_folds: int = 5, label_col: Optional[str] = None, group_col: Optional[str] = None,
              seed: int = 0, fold_col: str = "fold") -> pd.DataFrame:
    """A copy of the table with a ``fold`` column 0..n_folds-1: stratified by ``label_col``, kept
    together by ``group_col`` (same patient/video in one fold), both, or neither; seeded.

    Too few rows, groups or rows per label for ``n_folds`` is a one-line :class:`DataError`.
    """
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds={n_folds!r}; expected an integer of at least 2 (each row is valid in one fold)")
    frame, name, _ = load_table(table)
    require_columns(frame, [c for c in (label_col, group_col) if c], name)
    y = frame[label_col].astype(str).to_numpy() if label_col else np.zeros(len(frame))
    groups = frame[group_col].astype(str).to_numpy() if group_col else None
    if len(frame) < n_folds:
        raise DataError(f"{name}: {len(frame)} rows; {n_folds} folds need at least {n_folds} rows (one per fold)")
    if groups is not None and len(set(groups)) < n_folds:
        raise DataError(f"{name}: {len(set(groups))} distinct {group_col!r} values; {n_folds} folds need at least "
                        f"{n_folds} groups (a group stays in one fold)")
    if label_col and not group_col and pd.Series(y).value_counts().max() < n_folds:
        raise DataError(f"{name}: stratified {n_folds} folds need at least {n_folds} rows per {label_col!r} value "
                        f"for some value; the largest has {pd.Series(y).value_counts().max()}")
    if label_col and group_col:
        splitter: Any = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    elif group_col:
        splitter = GroupKFold(n_folds, shuffle=True, random_state=seed)
    elif label_col:
        splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_folds, shuffle=True, random_state=seed)
    out = frame.copy()
    out[fold_col] = -1
    try:
        for fold, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(frame)), y, groups)):
            out.loc[valid_idx, fold_col] = fold
    except ValueError as exc:
        raise DataError(f"{name}: cannot make {n_folds} folds ({' '.join(str(exc).split())})") from exc
    return out


def inventory(table: Table, root: Optional[PathLike] = None, path_col: str = "path",
              workers: Optional[int] = None, progress: bool = False) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """One row per image: path, width, height, channels, mode, file_size, ``error`` (empty when
    readable) and the table's other columns (labels/targets); plus a summary dict."""
    frame, paths = _paths(table, root, path_col)

    def info(path: Path) -> Dict[str, Any]:
        try:
            return {**read_image_info(path), "error": ""}
        except DataError as exc:
            return {"width": np.nan, "height": np.nan, "channels": np.nan, "mode": "", "file_size":
                    path.stat().st_size if path.is_file() else np.nan, "error": str(exc)}

    rows = list(_thread_map(info, paths, workers, progress, "inventory"))
    info_frame = pd.DataFrame(rows, columns=["width", "height", "channels", "mode", "file_size", "error"])
    others = frame.drop(columns=[path_col]).reset_index(drop=True)
    out = pd.concat([frame[[path_col]].reset_index(drop=True), info_frame, others], axis=1)
    good = out[out["error"] == ""]
    summary: Dict[str, Any] = {
        "images": len(out),
        "unreadable": int((out["error"] != "").sum()),
        "total_bytes": int(out["file_size"].fillna(0).sum()),
        "modes": good["mode"].value_counts().to_dict(),
    }
    for col in ("width", "height"):
        if len(good):
            summary[col] = {"min": int(good[col].min()), "median": float(good[col].median()), "max": int(good[col].max())}
    for col in others.columns:
        if others[col].dtype == object or others[col].nunique() <= 50:
            summary[f"counts_{col}"] = {str(k): int(v) for k, v in others[col].value_counts(dropna=False).items()}
    return out, summary


def mean_std(images: Union[Table, Sequence[PathLike]], root: Optional[PathLike] = None, path_col: str = "path",
             workers: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Exact per-channel RGB mean and std (population, in [0, 1] like albumentations' Normalize) over every pixel.

    Streams a 256-bin histogram per channel, so memory is constant and the sums are exact integers.
    ``images`` is a table (CSV path/DataFrame with ``path_col``) or a list of image paths.
    """
    if isinstance(images, (list, tuple)):
        paths = [Path(p) for p in images]
    else:
        _, paths = _paths(images, root, path_col)
    if not paths:
        raise DataError("mean_std: no images given")

    def hist(path: Path) -> np.ndarray:
        image = read_image(path)
        return np.stack([np.bincount(image[..., c].ravel(), minlength=256) for c in range(3)])

    counts = np.zeros((3, 256), dtype=np.int64)
    for h in _thread_map(hist, paths, workers, progress, "mean/std"):
        counts += h
    values = np.arange(256, dtype=np.int64)
    n = int(counts[0].sum())
    mean, std = [], []
    for c in range(3):
        s1 = int((counts[c] * values).sum())
        s2 = int((counts[c] * values * values).sum())
        var = (s2 * n - s1 * s1) / (n * n)
        mean.append(s1 / n / 255.0)
        std.append(float(np.sqrt(max(var, 0.0))) / 255.0)
    return {"mean": mean, "std": std, "pixels": n, "images": len(paths)}


def _image_stats(path: Path) -> Dict[str, Any]:
    """Size, brightness, contrast and colour means of one image, or ``{"error": ...}`` when unreadable."""
    try:
        image = read_image(path)
    except DataError as exc:
        return {"error": str(exc)}
    gray = image.mean(axis=2)
    means = image.reshape(-1, 3).mean(axis=0)
    return {"width": image.shape[1], "height": image.shape[0], "brightness": float(gray.mean()),
            "contrast": float(gray.std()), "r": means[0], "g": means[1], "b": means[2]}


def eda(train: Table, test: Table, out_dir: PathLike, root: Optional[PathLike] = None,
        test_root: Optional[PathLike] = None, path_col: str = "path", label_col: Optional[str] = "label",
        max_images: Optional[int] = 2000, seed: int = 0, workers: Optional[int] = None,
        progress: bool = False) -> List[Path]:
    """Compare train and test: image sizes, brightness/contrast, colour means and label balance, as PNGs.

    At most ``max_images`` (>= 1; None: all) per split are read (a seeded sample). Unreadable images are
    left out with a warning naming them; a split without rows or readable images is a :class:`DataError`.
    Returns the PNG paths written.
    """
    if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
        raise ValueError(f"eda: max_images={max_images!r}; expected at least 1 (None reads every image)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, frames = {}, {}
    for split, table, split_root in (("train", train, root), ("test", test, test_root)):
        frame, paths = _paths(table, split_root, path_col)
        if max_images and len(paths) > max_images:
            pick = np.sort(np.random.default_rng(seed).choice(len(paths), max_images, replace=False))
            paths = [paths[i] for i in pick]
        results = list(_thread_map(_image_stats, paths, workers, progress, f"eda {split}"))
        errors = [r["error"] for r in results if "error" in r]
        if len(errors) == len(results):
            raise DataError(f"eda: no readable image in the {split} table ({len(errors)} tried), e.g. {errors[0]}")
        if errors:
            import warnings

            warnings.warn(f"eda: {len(errors)} of {len(results)} {split} images unreadable and left out, "
                          f"e.g. {errors[0]}", stacklevel=2)
        stats[split] = pd.DataFrame([r for r in results if "error" not in r])
        frames[split] = frame
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(6, 5))
    for split, s in stats.items():
        if len(s):
            ax.scatter(s["width"], s["height"], s=8, alpha=0.5, label=f"{split} ({len(s)})")
    ax.set(xlabel="width (px)", ylabel="height (px)", title="Image size")
    ax.legend()
    save(fig, "image_size.png")

    def bins(col: str) -> np.ndarray:
        return np.histogram_bin_edges(np.concatenate([s[col].to_numpy() for s in stats.values() if len(s)]), 30)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col in zip(axes, ("brightness", "contrast")):
        for split, s in stats.items():
            if len(s):
                ax.hist(s[col], bins=bins(col), alpha=0.5, density=True, label=split)
        ax.set(xlabel=f"per-image {col} (grey mean)" if col == "brightness" else "per-image contrast (grey std)",
               title=col.capitalize())
        ax.legend()
    save(fig, "brightness_contrast.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, col, colour in zip(axes, ("r", "g", "b"), ("red", "green", "blue")):
        for split, s in stats.items():
            if len(s):
                ax.hist(s[col], bins=bins(col), alpha=0.4 if split == "train" else 0.7, density=True,
                        color=colour if split == "train" else "grey", label=split)
        ax.set(xlabel=f"per-image mean {colour}", title=f"{colour.capitalize()} channel")
        ax.legend()
    save(fig, "colour.png")

    if label_col and all(label_col in f.columns for f in frames.values()):
        shares = pd.DataFrame({split: f[label_col].astype(str).value_counts(normalize=True)
                               for split, f in frames.items()}).fillna(0).sort_index()
        fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(shares)), 4))
        shares.plot.bar(ax=ax)
        ax.set(ylabel="share of rows", title="Label balance")
        save(fig, "labels.png")
    return written
