"""The rows of a table dataset without torch: the table, its paths and targets, and what is wrong with them.

Each class here reads and validates one task's table (paths, labels, boxes, keypoints, masks)
and answers :func:`cvkit.data.check.check_dataset`'s questions (:meth:`TableRows.target_problems`,
:meth:`TableRows.dataset_problems`), importing neither torch nor albumentations, so that
``cvkit check`` starts at once. The torch datasets of :mod:`cvkit.data.datasets` inherit them
and add only the augmentation and ``__getitem__``: one copy of the row logic.

Rows are not validated one by one when built, so that the check can list all bad rows at once;
reading a bad row raises a :class:`~cvkit.data.io.DataError` naming the CSV row and the file.
Extra keyword arguments of the constructors go to the next class in the method resolution order
(the torch datasets pass ``transform`` and ``normalize`` that way).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from cvkit.data.boxes import BOX_FORMATS, box_problem, to_xyxy
from cvkit.data.io import (
    DataError,
    ImageReadError,
    LabelError,
    TableError,
    check_class_map,
    class_map_from_labels,
    load_class_map,
    read_mask,
)
from cvkit.data.rle import masks_from_rle, rle_table_problems
from cvkit.data.tables import IMAGE_EXTENSIONS, PathLike, Table, list_image_files, load_table, require_columns

_MAX_LISTED = 20
ClassMap = Union[None, PathLike, Mapping[str, int]]


def _some(paths: Sequence[Path], base: Path) -> str:
    names = [str(p.relative_to(base)) for p in paths[:3]]
    return ", ".join(names) + (", ..." if len(paths) > 3 else "")


def _resolve_class_map(class_map: ClassMap, labels: pd.Series, name: str) -> Dict[str, int]:
    if class_map is None:
        return class_map_from_labels(labels.dropna().map(_label_key))
    if isinstance(class_map, Mapping):
        return check_class_map(class_map, f"class_map given for {name}")
    return load_class_map(class_map)


def _label_key(value: Any) -> str:
    """The class-map key of a CSV cell: ``3`` and ``3.0`` (pandas with NaNs) both give ``"3"``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class KeypointCountError(TableError):
    """A row holds the wrong number of keypoint coordinates, or half a point."""


class MaskSizeError(DataError):
    """A mask's size differs from its image's."""


class TableRows:
    """Images listed in a table: one row per image, ``path_col`` relative to ``root``.

    Image paths may leave ``root``: an absolute path is used as it is and ``..`` is followed,
    as real CSVs (one table for several image folders) need. cvkit only reads these paths;
    names that become files it writes go through :func:`cvkit.io.safe_child`.
    """

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frame, self.name, default_root = load_table(table)
        self.root = Path(root) if root is not None else default_root
        self.path_col = path_col
        require_columns(self.frame, [path_col], self.name)
        self.rows = np.arange(len(self.frame))
        self.skipped_files: List[Path] = []
        self._cache()

    def _cache(self) -> None:
        """Per-row values looked up on every item, kept as lists (pandas lookups cost ~10 us each)."""
        self._paths = [self.root / str(p) for p in self.frame[self.path_col]]

    def __len__(self) -> int:
        return len(self.frame)

    def path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self._paths[index]

    def where(self, index: int) -> str:
        """``"train.csv row 12 (img/a.jpg)"``: where item ``index`` comes from, for messages."""
        return f"{self.name} row {int(self.rows[index])} ({self.frame.at[index, self.path_col]})"

    def subset(self, indices: Sequence[int]) -> "TableRows":
        """A copy holding only ``indices``; :meth:`where` still names the original CSV rows."""
        out = copy.copy(self)
        indices = np.asarray(indices, dtype=np.int64)
        out.frame = self.frame.iloc[indices].reset_index(drop=True)
        out.rows = self.rows[indices]
        out._cache()
        return out

    def target_problems(self, index: int, width: int, height: int) -> List[Tuple[str, str]]:
        """``(code, message)`` for every way row ``index``'s targets are wrong for a ``width`` x ``height`` image."""
        return []

    def dataset_problems(self) -> List[Tuple[str, str]]:
        """``(code, message)`` for what is wrong with the dataset as a whole (no row to drop fixes it)."""
        if len(self) == 0:
            return [("no_rows", f"{self.name}: no rows; expected at least one image to train on")]
        return []


class ClassificationRows(TableRows):
    """``path,label`` rows (column names configurable); labels encoded by a class map (name -> index).

    ``class_map`` is a dict, a JSON file (:func:`~cvkit.data.io.save_class_map`), or None to build
    one from the sorted labels; its indices must be 0..N-1 without gaps or repeats.
    """

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 label_col: str = "label", class_map: ClassMap = None, **kwargs: Any) -> None:
        super().__init__(table, root=root, path_col=path_col, **kwargs)
        require_columns(self.frame, [label_col], self.name)
        self.label_col = label_col
        self.class_map = _resolve_class_map(class_map, self.frame[label_col], self.name)
        self._cache()

    def _cache(self) -> None:
        super()._cache()
        if hasattr(self, "class_map"):
            self._labels = self.labels()

    @classmethod
    def from_folders(cls, root: PathLike, class_map: ClassMap = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                     **kwargs: Any) -> Any:
        """Images in class sub-folders ``root/<label>/*.jpg`` (sorted, so the order is stable).

        Hidden folders (``.ipynb_checkpoints``) are no class. ``skipped_files`` lists the files
        left out: other types, hidden files, and files directly in ``root``. ``kwargs`` go to the
        constructor.
        """
        root = Path(root)
        files, skipped = list_image_files(root, extensions)
        skipped += files
        rows = []
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            images, others = list_image_files(folder, extensions)
            rows += [{"path": str(p.relative_to(root)), "label": folder.name} for p in images]
            skipped += others
        if not rows:
            left = f" (left out {len(skipped)} other files: {_some(skipped, root)})" if skipped else ""
            raise DataError(f"{root}: no images with {', '.join(extensions)} in class sub-folders{left}")
        out = cls(pd.DataFrame(rows), root=root, class_map=class_map, **kwargs)
        out.name = str(root)
        out.skipped_files = sorted(skipped)
        return out

    @property
    def num_classes(self) -> int:
        return len(self.class_map)

    def label(self, index: int) -> int:
        """The encoded label of item ``index``; :class:`LabelError` when it is not in the class map."""
        if self._labels[index] >= 0:
            return int(self._labels[index])
        raw = self.frame.at[index, self.label_col]
        if _label_key(raw) not in self.class_map:
            raise LabelError(f"{self.where(index)}: label {raw!r} is not in the class map "
                             f"(expected one of {sorted(self.class_map)[:20]})")
        return self.class_map[_label_key(raw)]

    def labels(self) -> np.ndarray:
        """Encoded labels of all rows (-1 where the label is unknown), e.g. for stratified splits."""
        keys = self.frame[self.label_col].map(_label_key)
        return keys.map(self.class_map).fillna(-1).astype(np.int64).to_numpy()

    def target_problems(self, index: int, width: int, height: int) -> List[Tuple[str, str]]:
        try:
            self.label(index)
        except LabelError as exc:
            return [("unknown_label", str(exc))]
        return []


class BoxRows(ClassificationRows):
    """Classification plus one box per image, declared as ``box_cols`` in ``box_format`` (see boxes.py)."""

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 label_col: str = "label", box_cols: Sequence[str] = ("x1", "y1", "x2", "y2"),
                 box_format: str = "xyxy", class_map: ClassMap = None, **kwargs: Any) -> None:
        super().__init__(table, root=root, path_col=path_col, label_col=label_col, class_map=class_map, **kwargs)
        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format={box_format!r}; expected one of {', '.join(BOX_FORMATS)}")
        if len(box_cols) != 4:
            raise ValueError(f"box_cols must name 4 columns, got {list(box_cols)}")
        require_columns(self.frame, box_cols, self.name)
        self.box_cols, self.box_format = list(box_cols), box_format

    def box_xyxy(self, index: int, width: int, height: int) -> np.ndarray:
        """Row ``index``'s box in pixel xyxy for a ``width`` x ``height`` image."""
        raw = pd.to_numeric(self.frame.loc[index, self.box_cols], errors="coerce").to_numpy(np.float64)
        return to_xyxy(raw, self.box_format, width, height)

    def target_problems(self, index: int, width: int, height: int) -> List[Tuple[str, str]]:
        problems = super().target_problems(index, width, height)
        problem = box_problem(self.box_xyxy(index, width, height), width, height)
        if problem:
            values = self.frame.loc[index, self.box_cols].tolist()
            problems.append(("bad_box", f"{self.where(index)}: {problem}; {self.box_format} columns "
                                        f"{self.box_cols} = {values}"))
        return problems


class KeypointRows(TableRows):
    """N (x, y) pixel keypoints per image; empty/NaN cells mark a missing point.

    ``keypoint_cols`` is either a flat list of columns ``[x1, y1, x2, y2, ...]`` or one column
    name whose cells hold ``2 * num_keypoints`` numbers separated by spaces (``nan`` allowed).
    """

    def __init__(self, table: Table, keypoint_cols: Union[str, Sequence[str]], root: Optional[PathLike] = None,
                 path_col: str = "path", num_keypoints: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(table, root=root, path_col=path_col, **kwargs)
        if isinstance(keypoint_cols, str):
            if num_keypoints is None:
                raise ValueError("num_keypoints is required when all keypoints are in one column")
            require_columns(self.frame, [keypoint_cols], self.name)
        else:
            keypoint_cols = list(keypoint_cols)
            if len(keypoint_cols) % 2:
                raise ValueError(f"keypoint_cols must alternate x and y columns, got {len(keypoint_cols)} names")
            require_columns(self.frame, keypoint_cols, self.name)
            num_keypoints = len(keypoint_cols) // 2
        self.keypoint_cols, self.num_keypoints = keypoint_cols, int(num_keypoints)

    def keypoints(self, index: int) -> np.ndarray:
        """Row ``index``'s keypoints as float64 (N, 2) pixels with NaN for missing points."""
        if isinstance(self.keypoint_cols, str):
            cell = self.frame.at[index, self.keypoint_cols]
            text = "" if isinstance(cell, float) and np.isnan(cell) else str(cell)
            try:
                values = np.asarray(text.replace(",", " ").split(), dtype=np.float64)
            except ValueError:
                raise TableError(f"{self.where(index)}: column {self.keypoint_cols!r} = {text[:40]!r} "
                                 "is not space-separated numbers") from None
        else:
            cells = self.frame.loc[index, self.keypoint_cols]
            values = pd.to_numeric(cells, errors="coerce").to_numpy(np.float64)
            for column, cell, value in zip(self.keypoint_cols, cells, values):
                if np.isnan(value) and not pd.isna(cell) and str(cell).strip().lower() not in ("", "nan"):
                    raise TableError(f"{self.where(index)}: column {column!r} = {str(cell)[:40]!r} is not a number; "
                                     "expected a pixel coordinate or an empty cell for a missing point")
        if values.size != 2 * self.num_keypoints:
            raise KeypointCountError(f"{self.where(index)}: {values.size} keypoint coordinates, expected "
                                     f"{2 * self.num_keypoints} ({self.num_keypoints} x, y pairs)")
        points = values.reshape(-1, 2)
        half = np.isnan(points).any(axis=1) & ~np.isnan(points).all(axis=1)
        if half.any():
            raise KeypointCountError(f"{self.where(index)}: keypoint {int(np.flatnonzero(half)[0])} has only one of "
                                     "x, y; expected both or neither")
        return points

    def target_problems(self, index: int, width: int, height: int) -> List[Tuple[str, str]]:
        try:
            points = self.keypoints(index)
        except KeypointCountError as exc:
            return [("keypoint_count", str(exc))]
        except TableError as exc:
            return [("bad_keypoints", str(exc))]
        known = points[~np.isnan(points).any(axis=1)]
        outside = (known[:, 0] < 0) | (known[:, 0] > width) | (known[:, 1] < 0) | (known[:, 1] > height)
        if outside.any():
            return [("keypoint_outside", f"{self.where(index)}: keypoint(s) {known[outside].tolist()} outside the "
                                         f"{width}x{height} image (expected 0 <= x <= {width}, 0 <= y <= {height})")]
        return []

    def dataset_problems(self) -> List[Tuple[str, str]]:
        """Also refuses a table where every keypoint of every row is missing: it would train on a loss of 0."""
        problems = super().dataset_problems()
        if problems:
            return problems
        for index in range(len(self)):
            try:
                if not np.isnan(self.keypoints(index)).all():
                    return []
            except TableError:  # reported for its row
                continue
        columns = self.keypoint_cols if isinstance(self.keypoint_cols, str) else ", ".join(self.keypoint_cols)
        return [("no_keypoints", f"{self.name}: all {self.num_keypoints} keypoints are missing (empty/NaN) in every "
                                 f"one of the {len(self)} rows; expected labelled points in columns {columns}")]


class SegmentationRows(TableRows):
    """Images with masks, as ``num_classes`` channels of {0, 1}.

    Masks come from PNG files (``mask_col``, relative to ``mask_root``) holding class ids, where
    pixel value k in 1..num_classes sets channel k-1 (with ``num_classes=1`` any non-zero pixel
    counts, so 0/255 masks work), or from a Severstal-style RLE table via :meth:`from_rle`.
    """

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 mask_col: Optional[str] = "mask", mask_root: Optional[PathLike] = None, num_classes: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(table, root=root, path_col=path_col, **kwargs)
        self.num_classes, self.mask_col = int(num_classes), mask_col
        self.mask_root = Path(mask_root) if mask_root is not None else self.root
        self.rle: Optional[Dict[str, List[Tuple[Any, Any, int]]]] = None
        if mask_col is not None:
            require_columns(self.frame, [mask_col], self.name)

    @classmethod
    def from_rle(cls, table: Table, image_root: PathLike, num_classes: int, image_col: str = "ImageId",
                 class_col: str = "ClassId", rle_col: str = "EncodedPixels", include_unlisted: bool = False,
                 **kwargs: Any) -> Any:
        """Severstal layout: one row per (image, defect class) with 1-based ``ClassId``.

        Severstal's train.csv lists defects only: with ``include_unlisted`` every image in
        ``image_root`` without a row joins with an empty mask (keep other splits out of that folder).
        Every row's ``ClassId`` and ``EncodedPixels`` are parsed here: a malformed table is one
        :class:`DataError` listing all bad rows (runs past the image are found per image by the check).
        ``kwargs`` go to the constructor.
        """
        frame, name, _ = load_table(table)
        require_columns(frame, [image_col, class_col, rle_col], name)
        problems = rle_table_problems(frame[class_col], frame[rle_col], int(num_classes))
        if problems:
            more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
            raise DataError(f"{name}: {len(problems)} bad RLE row(s): {'; '.join(problems[:_MAX_LISTED])}{more}")
        image_root = Path(image_root)
        ids = list(dict.fromkeys(frame[image_col].astype(str)))
        if include_unlisted and image_root.is_dir():
            listed = set(ids)
            ids += [p.name for p in list_image_files(image_root)[0] if p.name not in listed]
        out = cls(pd.DataFrame({"path": ids}), root=image_root, mask_col=None, num_classes=num_classes, **kwargs)
        out.name = name
        out.rle = {}
        for row, (image_id, class_id, rle) in enumerate(zip(frame[image_col].astype(str), frame[class_col],
                                                            frame[rle_col])):
            out.rle.setdefault(image_id, []).append((class_id, rle, row))
        return out

    def mask(self, index: int, height: int, width: int) -> np.ndarray:
        """Item ``index``'s mask as uint8 (H, W, num_classes) of {0, 1}; the size must match the image."""
        if self.rle is not None:
            rows = self.rle.get(str(self.frame.at[index, self.path_col]), [])
            out = np.zeros((height, width, self.num_classes), np.uint8)
            problems = []
            for class_id, rle, row in rows:
                try:
                    out |= masks_from_rle([(class_id, rle)], (height, width), self.num_classes,
                                          where=f"{self.name} row {row}")
                except DataError as exc:
                    problems.append(str(exc))
            if problems:
                raise DataError("; ".join(problems))
            return out
        path = self.mask_root / str(self.frame.at[index, self.mask_col])
        ids = read_mask(path)
        if ids.shape != (height, width):
            raise MaskSizeError(f"{self.where(index)}: mask {path} is {ids.shape[1]}x{ids.shape[0]}, "
                                f"expected the image size {width}x{height}")
        if self.num_classes == 1:
            return (ids > 0).astype(np.uint8)[..., None]
        if ids.max(initial=0) > self.num_classes:
            raise DataError(f"{self.where(index)}: mask {path} has class id {int(ids.max())}, "
                            f"expected 0..{self.num_classes}")
        return (ids[..., None] == np.arange(1, self.num_classes + 1, dtype=np.uint8)).astype(np.uint8)

    def target_problems(self, index: int, width: int, height: int) -> List[Tuple[str, str]]:
        try:
            self.mask(index, height, width)
        except MaskSizeError as exc:
            return [("mask_size", str(exc))]
        except ImageReadError as exc:
            return [(f"mask_{exc.code}" if exc.code != "bad_mask" else exc.code, f"{self.where(index)}: {exc}")]
        except DataError as exc:
            return [("bad_mask", str(exc))]
        return []


__all__ = ["BoxRows", "ClassificationRows", "KeypointCountError", "KeypointRows", "MaskSizeError",
           "SegmentationRows", "TableRows"]
