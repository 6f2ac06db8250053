"""Validate a dataset before training: every bad row, in one pass.

:func:`check_dataset` reads every image once (threads, since OpenCV decodes without the GIL)
and asks the dataset whether each row's targets fit that image. Problem codes:
``missing_file``, ``empty_file``, ``truncated``, ``unreadable``, ``duplicate_path``,
``unknown_label``, ``bad_box``, ``keypoint_count``, ``bad_keypoints``, ``keypoint_outside``,
``mask_size``, ``bad_mask``, ``mask_missing_file``... :func:`prepare_for_training` is what a
runner calls: it refuses a dataset with problems, or drops those rows and lists them in the logdir.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import pandas as pd

from cvkit.data.datasets import TableDataset
from cvkit.data.io import DatasetCheckError, ImageReadError, read_image
from cvkit.io import atomic_write_bytes

PathLike = Union[str, os.PathLike]
SKIPPED_ROWS_FILE = "skipped_rows.csv"


@dataclass(frozen=True)
class Problem:
    """One bad row: dataset position, CSV row, image path, problem code and a message saying what was expected."""

    index: int
    row: int
    path: str
    code: str
    message: str


@dataclass
class CheckReport:
    """Everything :func:`check_dataset` found in ``name`` (``total`` rows)."""

    name: str
    total: int
    problems: List[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_indices(self) -> List[int]:
        """Dataset positions with at least one problem, sorted."""
        return sorted({p.index for p in self.problems if p.index >= 0})

    def counts(self) -> Dict[str, int]:
        """Number of problems per code."""
        out: Dict[str, int] = {}
        for p in self.problems:
            out[p.code] = out.get(p.code, 0) + 1
        return out

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(p) for p in self.problems], columns=["index", "row", "path", "code", "message"])

    def write_csv(self, path: PathLike) -> None:
        """Write the problems as CSV (atomically)."""
        atomic_write_bytes(path, self.to_frame().to_csv(index=False).encode())

    def summary(self, limit: int = 20) -> str:
        """A human-readable report: counts per code, then up to ``limit`` messages."""
        if self.ok:
            return f"{self.name}: {self.total} rows, no problems"
        counts = ", ".join(f"{code}: {n}" for code, n in sorted(self.counts().items()))
        lines = [f"{self.name}: {len(self.bad_indices)} of {self.total} rows have problems ({counts})"]
        lines += [f"  [{p.code}] {p.message}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (write the full list with --report)")
        return "\n".join(lines)


def _check_row(dataset: TableDataset, index: int) -> List[Problem]:
    row, path = int(dataset.rows[index]), str(dataset.frame.at[index, dataset.path_col])
    try:
        image = read_image(dataset.path(index))
    except ImageReadError as exc:
        return [Problem(index, row, path, exc.code, f"{dataset.where(index)}: {exc}")]
    height, width = image.shape[:2]
    return [Problem(index, row, path, code, message)
            for code, message in dataset.target_problems(index, width, height)]


def _duplicates(dataset: TableDataset) -> List[Problem]:
    paths = dataset.frame[dataset.path_col].astype(str).map(lambda p: os.path.normpath(p))
    first: Dict[str, int] = {}
    out = []
    for index, path in enumerate(paths):
        if path in first:
            out.append(Problem(index, int(dataset.rows[index]), path, "duplicate_path",
                               f"{dataset.where(index)}: path repeats row {int(dataset.rows[first[path]])}; "
                               "expected each image once"))
        else:
            first[path] = index
    return out


def check_dataset(dataset: Any, workers: Optional[int] = None, progress: bool = False) -> CheckReport:
    """Scan every row of a table dataset and report every problem (see the module for the codes).

    Non-table datasets (STL-10 arrays) were validated when loaded and give an empty report.
    """
    name = getattr(dataset, "name", type(dataset).__name__)
    if not isinstance(dataset, TableDataset):
        return CheckReport(name, len(dataset))
    workers = workers or min(8, os.cpu_count() or 1)
    indices = range(len(dataset))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda i: _check_row(dataset, i), indices)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(dataset), desc=f"check {name}", unit="img")
        problems = [p for rows in results for p in rows]
    problems += _duplicates(dataset)
    problems.sort(key=lambda p: (p.index, p.code))
    return CheckReport(name, len(dataset), problems)


def prepare_for_training(dataset: Any, logdir: Optional[PathLike] = None, skip_errors: bool = False,
                         report: Optional[CheckReport] = None) -> Any:
    """The dataset to train on: ``dataset`` itself when clean; otherwise raise, or with
    ``skip_errors`` a subset without the bad rows, listed in ``logdir/skipped_rows.csv``.

    Raises :class:`DatasetCheckError` (with ``.report``) whose message lists the problems.
    """
    report = report if report is not None else check_dataset(dataset)
    if report.ok:
        return dataset
    if not skip_errors:
        raise DatasetCheckError(f"{report.summary()}\nFix these rows, or pass skip_errors=True "
                                "(--skip-bad-rows) to train without them.", report)
    if logdir is not None:
        report.write_csv(Path(logdir) / SKIPPED_ROWS_FILE)
    bad = set(report.bad_indices)
    return dataset.subset([i for i in range(len(dataset)) if i not in bad])
