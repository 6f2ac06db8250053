"""Datasets for classification, class + box, keypoints, segmentation and STL-10.

Every item is a dict with ``"features"`` (float32 C x H x W after the albumentations pipeline),
``"targets"`` and ``"index"`` (position in the dataset; :meth:`TableDataset.where` turns it back
into the CSV row). Image, mask, box and keypoints go through one albumentations call, so a flip
or crop moves all of them together. ``transform=None`` only normalises (ImageNet) and converts.

The table datasets add the augmentation and ``__getitem__`` to the torch-free rows of
:mod:`cvkit.data.rows`, which read and validate the table (what ``cvkit check`` uses without
torch). :data:`IMAGE_EXTENSIONS` is the one list of file types cvkit reads from a folder, and
:func:`list_image_files` the one way to list a folder's images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from cvkit.data.augment import Normalize, default_transform, with_targets
from cvkit.data.boxes import box_problem
from cvkit.data.io import DataError, check_pixels, image_header, read_image
from cvkit.data.resize_plan import decode_scale, decoded_shape
# KeypointCountError, MaskSizeError, list_image_files, load_table and require_columns are re-exported.
from cvkit.data.rows import (  # noqa: F401
    BoxRows,
    ClassificationRows,
    KeypointCountError,
    KeypointRows,
    MaskSizeError,
    SegmentationRows,
    TableRows,
)
from cvkit.data.tables import IMAGE_EXTENSIONS, PathLike, Table, list_image_files, load_table, require_columns  # noqa: F401,E501
from cvkit.data.seeding import reseed_transform
from cvkit.data.warp import SOURCE_KEY, WarpSource, leading_warp, needed_source_size

Targets = Callable[[int, int], Dict[str, Any]]


def pipeline_input(path: PathLike, transform: Any, targets: Optional[Targets] = None
                   ) -> Tuple[Dict[str, Any], Tuple[int, int]]:
    """What ``transform`` is called with for the image file ``path``, and the image's full (height, width).

    ``targets(height, width)`` adds the other inputs (``bboxes``, ``keypoints``, ``mask``, given for
    the full-size image). When ``transform`` starts with a :class:`~cvkit.data.warp.OneWarp` and the
    file's header gives the size, the warp's parameters are drawn first (from a copy of its random
    state, so the call draws the same) and the image is decoded at the largest reduction (1/2, 1/4,
    1/8) from which no output pixel is upsampled; in full when there is a mask (read full size).
    Otherwise, or when the header disagrees with the decoder, the image is decoded in full.
    """
    header = image_header(path) if leading_warp(transform) is not None else None
    if header is not None:
        size = (header.height, header.width)
        check_pixels(*size, str(path))  # before the targets are drawn at that size
        data = targets(*size) if targets else {}
        needed = needed_source_size(transform, *size) if "mask" not in data else None
        reduce = decode_scale(size, needed) if needed is not None else 1
        image = read_image(path, reduce=reduce, header=header)
        if image.shape[:2] == decoded_shape(size, reduce):
            return {**data, "image": image, SOURCE_KEY: WarpSource(*size, reduce)}, size
        if reduce > 1:
            image = read_image(path)
    else:
        image = read_image(path)
    size = (image.shape[0], image.shape[1])
    return {**(targets(*size) if targets else {}), "image": image}, size


class ImageDataset(Dataset):
    """Base: runs the albumentations pipeline (reseeded per item from torch's RNG) and builds the dict."""

    def __init__(self, transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> None:
        self.transform = with_targets(transform) if transform is not None else default_transform(normalize)

    def _augment(self, **targets: Any) -> Dict[str, Any]:
        reseed_transform(self.transform)
        return self._run(targets)

    def _run(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """The (already reseeded) pipeline on ``data``; its image must come out as a tensor."""
        out = self.transform(**data)
        image = out["image"]
        if isinstance(image, np.ndarray):
            raise DataError("the transform must end with NormalizeToTensor or ToTensorV2 "
                            "(cvkit.data.augment.compose adds NormalizeToTensor)")
        out["image"] = image.float() if image.dtype != torch.float32 else image
        return out


class TableDataset(TableRows, ImageDataset):
    """Images listed in a table (:class:`~cvkit.data.rows.TableRows`: one row per image, ``path_col``
    relative to ``root``, paths may leave ``root``), read and augmented."""

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> None:
        super().__init__(table, root=root, path_col=path_col, transform=transform, normalize=normalize)

    def _augment_row(self, index: int, targets: Optional[Targets] = None) -> Dict[str, Any]:
        """Row ``index``'s image through the pipeline with ``targets(height, width)`` (``bboxes``,
        ``keypoints``, ``mask``, given for the full-size image), reseeded as :meth:`_augment` is,
        the image decoded at a reduced scale where :func:`pipeline_input` says."""
        reseed_transform(self.transform)
        return self._run(pipeline_input(self.path(index), self.transform, targets)[0])


class ClassificationDataset(ClassificationRows, TableDataset):
    """``path,label`` rows (column names configurable); labels encoded by a class map (name -> index).

    ``class_map`` is a dict, a JSON file (:func:`~cvkit.data.io.save_class_map`), or None to build
    one from the sorted labels; its indices must be 0..N-1 without gaps or repeats. Save
    ``dataset.class_map`` with the run to decode predictions later. Image paths may leave
    ``root`` (absolute, ``..``), as :class:`TableDataset` says.
    """

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 label_col: str = "label", class_map: Union[None, PathLike, Mapping[str, int]] = None,
                 transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> None:
        super().__init__(table, root=root, path_col=path_col, label_col=label_col, class_map=class_map,
                         transform=transform, normalize=normalize)

    @classmethod
    def from_folders(cls, root: PathLike, class_map: Union[None, PathLike, Mapping[str, int]] = None,
                     transform: Optional[Any] = None, normalize: Normalize = "imagenet",
                     extensions: Sequence[str] = IMAGE_EXTENSIONS) -> "ClassificationDataset":
        """Images in class sub-folders ``root/<label>/*.jpg`` (:meth:`ClassificationRows.from_folders
        <cvkit.data.rows.ClassificationRows.from_folders>`; ``dataset.skipped_files`` lists the files left out)."""
        return super().from_folders(root, class_map, extensions, transform=transform, normalize=normalize)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        label = self.label(index)
        out = self._augment_row(index)
        return {"features": out["image"], "targets": torch.tensor(label, dtype=torch.int64), "index": index}


class BoxDataset(BoxRows, ClassificationDataset):
    """Classification plus one box per image, declared as ``box_cols`` in ``box_format`` (see boxes.py).

    ``"boxes"`` is float32[4] xyxy in [0, 1] of the augmented image; when augmentation crops the
    box away entirely, ``"box_visible"`` is 0 and ``"boxes"`` is zeros (mask the box loss with it).
    """

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 label_col: str = "label", box_cols: Sequence[str] = ("x1", "y1", "x2", "y2"),
                 box_format: str = "xyxy", class_map: Union[None, PathLike, Mapping[str, int]] = None,
                 transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> None:
        super().__init__(table, root=root, path_col=path_col, label_col=label_col, box_cols=box_cols,
                         box_format=box_format, class_map=class_map, transform=transform, normalize=normalize)

    def _box_target(self, index: int, height: int, width: int) -> np.ndarray:
        """Row ``index``'s box as one normalised xyxy row for a ``width`` x ``height`` image (refused when bad)."""
        box = self.box_xyxy(index, width, height)
        problem = box_problem(box, width, height)
        if problem:
            raise DataError(f"{self.where(index)}: {problem}")
        box = np.clip(box, 0, [width, height, width, height]) / [width, height, width, height]
        return box[None].astype(np.float32)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        label = self.label(index)
        out = self._augment_row(index, lambda height, width: {"bboxes": self._box_target(index, height, width)})
        visible = len(out["bboxes"]) > 0
        boxes = np.asarray(out["bboxes"][0], np.float32) if visible else np.zeros(4, np.float32)
        return {"features": out["image"], "targets": torch.tensor(label, dtype=torch.int64),
                "boxes": torch.from_numpy(boxes), "box_visible": torch.tensor(float(visible)), "index": index}


class KeypointDataset(KeypointRows, TableDataset):
    """N (x, y) pixel keypoints per image; empty/NaN cells mark a missing point.

    ``keypoint_cols`` is either a flat list of columns ``[x1, y1, x2, y2, ...]`` or one column
    name whose cells hold ``2 * num_keypoints`` numbers separated by spaces (``nan`` allowed).
    ``"targets"`` is float32[N*2] in [0, 1] of the augmented image, NaN for points missing or
    moved outside the image by augmentation, and ``"keypoints_mask"`` is 1 where a target exists.
    """

    def __init__(self, table: Table, keypoint_cols: Union[str, Sequence[str]], root: Optional[PathLike] = None,
                 path_col: str = "path", num_keypoints: Optional[int] = None,
                 transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> None:
        super().__init__(table, keypoint_cols, root=root, path_col=path_col, num_keypoints=num_keypoints,
                         transform=transform, normalize=normalize)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        points = self.keypoints(index)
        missing = np.isnan(points).any(axis=1)
        moving = np.nan_to_num(points).astype(np.float32)
        out = self._augment_row(index, lambda height, width: {"keypoints": moving})
        height, width = out["image"].shape[-2:]
        moved = np.asarray(out["keypoints"], np.float64).reshape(-1, 2)[:, :2]
        outside = (moved[:, 0] < 0) | (moved[:, 0] > width) | (moved[:, 1] < 0) | (moved[:, 1] > height)
        moved = moved / [width, height]
        moved[missing | outside] = np.nan
        mask = np.repeat(~(missing | outside), 2).astype(np.float32)
        return {"features": out["image"], "targets": torch.from_numpy(moved.reshape(-1).astype(np.float32)),
                "keypoints_mask": torch.from_numpy(mask), "index": index}


class SegmentationDataset(SegmentationRows, TableDataset):
    """Images with masks, as ``num_classes`` channels of {0, 1}.

    Masks come from PNG files (``mask_col``, relative to ``mask_root``) holding class ids, where
    pixel value k in 1..num_classes sets channel k-1 (with ``num_classes=1`` any non-zero pixel
    counts, so 0/255 masks work), or from a Severstal-style RLE table via :meth:`from_rle`.
    """

    def __init__(self, table: Table, root: Optional[PathLike] = None, path_col: str = "path",
                 mask_col: Optional[str] = "mask", mask_root: Optional[PathLike] = None, num_classes: int = 1,
                 transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> None:
        super().__init__(table, root=root, path_col=path_col, mask_col=mask_col, mask_root=mask_root,
                         num_classes=num_classes, transform=transform, normalize=normalize)

    @classmethod
    def from_rle(cls, table: Table, image_root: PathLike, num_classes: int, image_col: str = "ImageId",
                 class_col: str = "ClassId", rle_col: str = "EncodedPixels", include_unlisted: bool = False,
                 transform: Optional[Any] = None, normalize: Normalize = "imagenet") -> "SegmentationDataset":
        """Severstal layout (:meth:`SegmentationRows.from_rle <cvkit.data.rows.SegmentationRows.from_rle>`):
        one row per (image, defect class) with 1-based ``ClassId``; a malformed table is one
        :class:`DataError` listing all bad rows."""
        return super().from_rle(table, image_root, num_classes, image_col, class_col, rle_col, include_unlisted,
                                transform=transform, normalize=normalize)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        out = self._augment_row(index, lambda height, width: {"mask": self.mask(index, height, width)})
        return {"features": out["image"], "targets": out["mask"].float(), "index": index}


class STL10Dataset(ImageDataset):
    """A split of an STL-10 binary folder (``train``, ``test`` or ``unlabeled`` with ``targets = -1``).

    The images stay in the file (:class:`cvkit.data.stl10.ImageFile`): each item reads its one
    image, so memory stays flat however large the split; pickled (DataLoader workers) it carries
    the path, not the images.
    """

    def __init__(self, root: PathLike, split: str = "train", transform: Optional[Any] = None,
                 normalize: Normalize = "imagenet") -> None:
        from cvkit.data import stl10

        super().__init__(transform, normalize)
        self.root, self.split = Path(root), split
        self.images = stl10.ImageFile(stl10.split_file(root, split))
        self.labels = stl10.load_split(root, split)[1]
        self.class_names = stl10.class_names(root)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        out = self._augment(image=self.images[index])
        label = -1 if self.labels is None else int(self.labels[index])
        return {"features": out["image"], "targets": torch.tensor(label, dtype=torch.int64), "index": index}
