"""Task models and the group contract (head, blocks, parameter groups) stages work on."""
from cvkit.models.factory import bn_dropout_head, create_model, find_weights, load_backbone_weights
from cvkit.models.groups import block_names, head_names, param_groups, trainable_param_names

__all__ = [
    "block_names",
    "bn_dropout_head",
    "create_model",
    "find_weights",
    "head_names",
    "load_backbone_weights",
    "param_groups",
    "trainable_param_names",
]
from cvkit.models.tasks import (  # noqa: E402
    ClassBoxModel,
    KeypointModel,
    create_segmentation_model,
    create_task_model,
    list_task_models,
    register_task_model,
    split_output,
)

__all__ += [
    "ClassBoxModel",
    "KeypointModel",
    "create_segmentation_model",
    "create_task_model",
    "list_task_models",
    "register_task_model",
    "split_output",
]
