"""Datasets, readers, augmentation presets, checks, splits and demo data.

Names are imported on first use, so ``from cvkit.data import stl10`` does not load albumentations.
"""
from __future__ import annotations

import importlib
from typing import Any, List

_EXPORTS = {
    "io": ("DataError", "ImageReadError", "ImageTooLargeError", "TableError", "LabelError", "DatasetCheckError",
           "read_image", "read_image_info", "read_mask", "class_map_from_labels", "save_class_map", "load_class_map",
           "check_class_map", "decoder_warning"),
    "boxes": ("BOX_FORMATS", "to_xyxy", "from_xyxy", "convert_boxes", "box_problem"),
    "rle": ("rle_encode", "rle_decode", "masks_from_rle", "masks_to_rle_frame", "parse_rle", "rle_table_problems"),
    "augment": ("IMAGENET_MEAN", "IMAGENET_STD", "FastAffine", "NormalizeToTensor", "register_preset", "list_presets", "create_preset", "compose",
                "default_transform", "with_targets", "transform_to_dict", "transform_from_dict", "save_transform",
                "load_transform"),
    "warp": ("OneWarp", "WarpSource", "WarpParams", "needed_source_size"),
    "rows": ("TableRows", "ClassificationRows", "BoxRows", "KeypointRows", "SegmentationRows", "KeypointCountError",
             "MaskSizeError"),
    "datasets": ("ImageDataset", "TableDataset", "ClassificationDataset", "BoxDataset", "KeypointDataset",
                 "SegmentationDataset", "STL10Dataset", "load_table", "list_image_files", "IMAGE_EXTENSIONS"),
    "check": ("Problem", "CheckReport", "check_dataset", "prepare_for_training"),
    "tools": ("split_train_valid", "limit_items", "take_items", "add_folds", "inventory", "mean_std", "eda"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(f"cvkit.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cvkit.data' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
