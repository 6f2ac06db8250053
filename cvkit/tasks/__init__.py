"""Tasks: each one registered object owns what is specific to it (see :mod:`cvkit.tasks.base`).

Importing this package registers the built-in tasks: ``classification``, ``class_box``,
``keypoints`` and ``segmentation``, and their output layouts (:mod:`cvkit.layouts`).
"""
from cvkit.tasks.base import (
    CLASS_OPTIONS,
    COMMON_OPTIONS,
    TASKS,
    DataOption,
    Task,
    get_task,
    list_tasks,
    register_task,
)
from cvkit.tasks import class_box, classification, keypoints, segmentation  # noqa: F401,E402  (registration)
from cvkit.tasks.class_box import ClassBoxTargets, split_class_box  # noqa: E402
from cvkit.layouts import LAYOUTS, OutputLayout, get_layout, list_layouts, register_layout  # noqa: E402
from cvkit.tasks.segmentation import mask_overlay, read_rle_table  # noqa: E402

__all__ = ["CLASS_OPTIONS", "COMMON_OPTIONS", "ClassBoxTargets", "DataOption", "LAYOUTS", "OutputLayout", "TASKS", "Task",
           "get_layout", "get_task", "list_layouts", "list_tasks", "mask_overlay", "read_rle_table", "register_layout",
           "register_task", "split_class_box"]
