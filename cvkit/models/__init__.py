"""Task models and the group contract (head, blocks, parameter groups) stages work on."""
from cvkit.models import tasks as _tasks
from cvkit.models.factory import bn_dropout_head, create_model, find_weights, load_backbone_weights, start_small
from cvkit.models.groups import block_names, head_names, param_groups, trainable_param_names
from cvkit.models.tasks import *  # noqa: F401,F403  (ClassBoxModel, TASK_MODELS, create_task_model, ...)
from cvkit.models.weights import load_weights

__all__ = [
    "block_names",
    "bn_dropout_head",
    "create_model",
    "find_weights",
    "head_names",
    "load_backbone_weights",
    "load_weights",
    "param_groups",
    "start_small",
    "trainable_param_names",
    *_tasks.__all__,
]
