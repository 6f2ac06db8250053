"""Tables and image folders without torch: what the data commands (split, inventory, stats, eda) need.

:data:`IMAGE_EXTENSIONS` is the one list of file types cvkit reads from a folder, and
:func:`list_image_files` the one way to list a folder's images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import pandas as pd

from cvkit.data.io import DataError, TableError

PathLike = Union[str, os.PathLike]
Table = Union[PathLike, pd.DataFrame]
# Every type read_image reads; GIF gives its first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def list_image_files(folder: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                     recursive: bool = False) -> Tuple[List[Path], List[Path]]:
    """``(images, skipped)`` in ``folder`` (and below with ``recursive``), each sorted.

    Images are the files whose extension (any case) is in ``extensions``; skipped are all other
    files, hidden ones (``.DS_Store``, ``._x.jpg``, cvkit's temporaries) included, so a caller can
    say what it left out. Hidden folders (``.ipynb_checkpoints``) are not entered.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    wanted = {e.lower() for e in extensions}
    images, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            path = Path(dirpath) / name
            if not name.startswith(".") and path.suffix.lower() in wanted and path.is_file():
                images.append(path)
            else:
                skipped.append(path)
    return sorted(images), sorted(skipped)


def load_table(table: Table) -> Tuple[pd.DataFrame, str, Path]:
    """A CSV path or DataFrame -> (frame with a 0..n-1 index, name for messages, default image root)."""
    if isinstance(table, pd.DataFrame):
        return table.reset_index(drop=True), "table", Path(".")
    path = Path(table)
    if not path.is_file():
        raise TableError(f"CSV not found: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TableError(f"{path}: not a readable CSV ({exc})") from exc
    return frame, str(path), path.parent


def require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise :class:`TableError` listing the declared columns ``frame`` lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TableError(f"{name}: missing column(s) {missing}; the table has {list(frame.columns)}")


__all__ = ["IMAGE_EXTENSIONS", "PathLike", "Table", "list_image_files", "load_table", "require_columns"]
