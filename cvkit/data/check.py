"""Validate a dataset before training: every bad row, in one pass.

:func:`check_dataset` reads every image once (threads, since OpenCV decodes without the GIL)
and asks the dataset whether each row's targets fit that image. Problem codes:
``missing_file``, ``empty_file``, ``truncated``, ``unreadable``, ``corrupt_data``, ``too_large``,
``duplicate_path``, ``unknown_label``, ``bad_box``, ``keypoint_count``, ``bad_keypoints``,
``keypoint_outside``, ``mask_size``, ``bad_mask``, ``mask_missing_file``... and, for the dataset
as a whole (``index`` and ``row`` -1), ``no_rows`` and ``no_keypoints``.

``corrupt_data`` is libjpeg's own signal: a JPEG with damaged data but an intact end marker
decodes without an error, and libjpeg only writes "Corrupt JPEG data: ..." to stderr. The scan
captures stderr (:class:`~cvkit.data.io.NativeStderr`), and the rows whose decode coincided with
such a message are decoded again one at a time to find the culprit. Damage that leaves the
Huffman stream in step is invisible to the decoder, and so to this check.

:func:`prepare_for_training` is what a runner calls: it refuses a dataset with problems, or drops
those rows and lists them in the logdir (a dataset-level problem cannot be dropped).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pandas as pd

from cvkit.data.rows import TableRows
from cvkit.data.io import DatasetCheckError, ImageReadError, NativeStderr, decoder_warning, read_image
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

    @property
    def dataset_problems(self) -> List[Problem]:
        """Problems of the dataset as a whole (``index`` -1): dropping rows does not fix them."""
        return [p for p in self.problems if p.index < 0]

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
        if self.bad_indices:
            lines = [f"{self.name}: {len(self.bad_indices)} of {self.total} rows have problems ({counts})"]
        else:
            lines = [f"{self.name}: the dataset has problems ({counts})"]
        lines += [f"  [{p.code}] {p.message}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (write the full list with --report)")
        return "\n".join(lines)


def _check_row(dataset: TableRows, index: int, stderr: NativeStderr) -> Tuple[List[Problem], bool]:
    """Row ``index``'s problems, and whether stderr grew while its image decoded (libjpeg may have warned)."""
    row, path = int(dataset.rows[index]), str(dataset.frame.at[index, dataset.path_col])
    before = stderr.size()
    try:
        image = read_image(dataset.path(index))
    except ImageReadError as exc:
        return [Problem(index, row, path, exc.code, f"{dataset.where(index)}: {exc}")], False
    suspect = stderr.size() > before
    height, width = image.shape[:2]
    return [Problem(index, row, path, code, message)
            for code, message in dataset.target_problems(index, width, height)], suspect


def _corrupt(dataset: TableRows, indices: List[int]) -> List[Problem]:
    """Decode each suspect image alone and report those libjpeg calls corrupt."""
    out = []
    for index in indices:
        warning = decoder_warning(dataset.path(index))
        if warning:
            out.append(Problem(index, int(dataset.rows[index]), str(dataset.frame.at[index, dataset.path_col]),
                               "corrupt_data", f"{dataset.where(index)}: {dataset.path(index)}: libjpeg reports "
                               f"'{warning}'; the image decodes damaged (re-encode or replace the file)"))
    return out


def _duplicates(dataset: TableRows) -> List[Problem]:
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

    ``dataset`` is any :class:`~cvkit.data.rows.TableRows`: a torch table dataset, or the
    torch-free rows ``cvkit check`` builds (the same rows, so the same report). Non-table
    datasets (STL-10 arrays) were validated when loaded and give an empty report.
    """
    name = getattr(dataset, "name", type(dataset).__name__)
    if not isinstance(dataset, TableRows):
        return CheckReport(name, len(dataset))
    workers = workers or min(8, os.cpu_count() or 1)
    problems: List[Problem] = []
    suspects: List[int] = []
    stderr = NativeStderr()
    try:
        with stderr, ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(lambda i: _check_row(dataset, i, stderr), range(len(dataset)))
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(dataset), desc=f"check {name}", unit="img", file=stderr.terminal)
            for index, (found, suspect) in enumerate(results):
                problems += found
                if suspect:
                    suspects.append(index)
    finally:
        stderr.replay()
    problems += _corrupt(dataset, suspects)
    problems += _duplicates(dataset)
    problems += [Problem(-1, -1, "", code, message) for code, message in dataset.dataset_problems()]
    problems.sort(key=lambda p: (p.index, p.code))
    return CheckReport(name, len(dataset), problems)


def prepare_for_training(dataset: Any, logdir: Optional[PathLike] = None, skip_errors: bool = False,
                         report: Optional[CheckReport] = None) -> Any:
    """The dataset to train on: ``dataset`` itself when clean; otherwise raise, or with
    ``skip_errors`` a subset without the bad rows, listed in ``logdir/skipped_rows.csv``.

    Raises :class:`DatasetCheckError` (with ``.report``) whose message lists the problems; also
    with ``skip_errors`` when the dataset as a whole is wrong or no good row would be left.
    """
    report = report if report is not None else check_dataset(dataset)
    if report.ok:
        return dataset
    if report.dataset_problems:
        raise DatasetCheckError(f"{report.summary()}\nThis is a problem of the whole dataset; dropping rows "
                                "cannot fix it.", report)
    if not skip_errors:
        raise DatasetCheckError(f"{report.summary()}\nFix these rows, or pass skip_errors=True "
                                "(--skip-bad-rows) to train without them.", report)
    bad = set(report.bad_indices)
    if len(bad) >= report.total:
        raise DatasetCheckError(f"{report.summary()}\nEvery row has a problem, so skipping bad rows would "
                                "leave nothing to train on.", report)
    if logdir is not None:
        report.write_csv(Path(logdir) / SKIPPED_ROWS_FILE)
    return dataset.subset([i for i in range(len(dataset)) if i not in bad])
