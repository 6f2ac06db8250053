"""Tasks: each one registered object owns what is specific to it (see :mod:`cvkit.tasks.base`).

Importing this package registers the built-in tasks: ``classification``, ``class_box``,
``keypoints`` and ``segmentation``.
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
from cvkit.tasks.segmentation import mask_overlay, read_rle_table  # noqa: E402

__all__ = ["CLASS_OPTIONS", "COMMON_OPTIONS", "ClassBoxTargets", "DataOption", "TASKS", "Task", "get_task",
           "list_tasks", "mask_overlay", "read_rle_table", "register_task", "split_class_box"]
