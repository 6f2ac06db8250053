"""Copy predicted images into one folder per predicted class, for a quick look at what a model confuses."""
from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable, Union

from cvkit.io import safe_child

PathLike = Union[str, os.PathLike]


def export_by_class(paths: Iterable[PathLike], labels: Iterable[str], out_dir: PathLike) -> int:
    """Copy each image into ``out_dir/<predicted label>/``; returns how many were copied.

    A file name that occurs more than once among ``paths`` gets its source folder as a prefix. Class
    names come from data, so one that would lead outside ``out_dir`` (``../x``, ``/abs``, empty) is
    refused with a ValueError before anything is copied.
    """
    paths, labels = [Path(p) for p in paths], [str(label) for label in labels]
    if len(paths) != len(labels):
        raise ValueError(f"export_by_class: {len(paths)} images but {len(labels)} labels; expected one label per image")
    folders = {}
    for label in dict.fromkeys(labels):
        try:
            folders[label] = safe_child(out_dir, label)
        except ValueError as exc:
            raise ValueError(f"export_by_class: class name {label!r} is not a folder name under {out_dir}: {exc}") from None
    repeated = Counter(p.name for p in paths)
    for path, label in zip(paths, labels):
        folders[label].mkdir(parents=True, exist_ok=True)
        name = path.name if repeated[path.name] == 1 else f"{path.parent.name}_{path.name}"
        shutil.copy2(path, folders[label] / name)
    return len(paths)


__all__ = ["export_by_class"]
