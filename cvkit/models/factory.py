"""timm classifiers by name, with an optional custom head and pretrained weights from local files only.

Nothing here touches the network: ``pretrained=True`` looks in the weights folder
(``$CVKIT_WEIGHTS`` or ``./weights``), then in installed weight packages
(:func:`cvkit.models.pretrained.resolve_pretrained`), and fails with a message naming both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Set, Union

import timm
from torch import nn

from cvkit.io import load_checkpoint, state_dict_of
from cvkit.models.groups import get_submodule, head_names, set_submodule
from cvkit.models.pretrained import WEIGHT_SUFFIXES, find_weights, weights_dir  # noqa: F401  (public here too)
from cvkit.models.pretrained import resolve_pretrained, weights_record


def start_small(head: nn.Module) -> nn.Module:
    """Zero the weights and bias of ``head``'s output layer (its last Linear or convolution); return ``head``.

    A new head then puts out zero logits (a loss of log C) whatever its family's init scale:
    timm initialises EfficientNet's classifier uniformly in +-1/sqrt(outputs), +-0.71 for two
    classes, and on 1280 non-negative pretrained features such a head starts with huge logits
    that a short head stage never unlearns (measured in bench/RESULTS.md). The layer still gets
    gradients (features times the output error), so it learns from the first step.
    """
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if layers:
        nn.init.zeros_(layers[-1].weight)
        if layers[-1].bias is not None:
            nn.init.zeros_(layers[-1].bias)
    return head


def bn_dropout_head(in_features: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """BatchNorm1d + Dropout + Linear on pooled features (the Ford-vs-Ferrari project's head), starting small."""
    return start_small(nn.Sequential(nn.BatchNorm1d(in_features), nn.Dropout(dropout), nn.Linear(in_features, num_classes)))


def create_model(
    arch: str,
    num_classes: int,
    pretrained: Union[bool, str, os.PathLike, None] = None,
    head: Optional[str] = None,
    head_dropout: float = 0.5,
    **kwargs,
) -> nn.Module:
    """A timm model with a ``num_classes`` classifier, optionally a custom head, weights from disk.

    Args:
        arch: any timm architecture name (``resnet50``, ``efficientnet_b0``, ``test_resnet``...).
        num_classes: outputs of the classifier.
        pretrained: None/False for random init, True for ``weights/<arch>.*`` or packaged weights
            (:func:`~cvkit.models.pretrained.resolve_pretrained`), or a file path. The model then
            carries ``cvkit_weights`` (:func:`~cvkit.models.pretrained.weights_record`).
        head: None keeps timm's classifier; ``"bn_dropout"`` puts BatchNorm+Dropout+Linear there.
            A head not loaded from ``pretrained`` starts at zero outputs (:func:`start_small`).
        head_dropout: dropout of the ``bn_dropout`` head.
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``in_chans``...); None values dropped.
    """
    if arch not in timm.list_models() and arch not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        raise KeyError(f"unknown timm architecture {arch!r}; similar names: {close}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (outputs of the classifier), got {num_classes!r}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    loaded: set = set()
    if pretrained:
        path = resolve_pretrained(arch) if pretrained is True else Path(pretrained)
        loaded = load_backbone_weights(model, path)
        model.cvkit_weights = weights_record(path)
    for name in head_names(model):
        keys = get_submodule(model, name).state_dict(prefix=name + ".")
        if not keys.keys() <= loaded:  # a new or resized classifier; one loaded from the file is kept
            start_small(get_submodule(model, name))
    if head == "bn_dropout":
        (name,) = head_names(model)[-1:]
        old = get_submodule(model, name)
        in_features = getattr(old, "in_features", None) or model.num_features
        set_submodule(model, name, bn_dropout_head(in_features, num_classes, head_dropout))
    elif head not in (None, "linear"):
        raise ValueError(f"unknown head {head!r}; valid: None/'linear' (timm's), 'bn_dropout'")
    return model


def load_backbone_weights(model: nn.Module, path: Union[str, os.PathLike]) -> Set[str]:
    """Load pretrained weights into everything but a classifier whose shape differs; return the keys loaded.

    Raises a ValueError naming the file and the first mismatching keys when the file does not
    fit the architecture (missing or unexpected keys outside the head).
    """
    state = state_dict_of(load_checkpoint(path), path)
    own = model.state_dict()
    heads = head_names(model)
    in_head = lambda k: any(k == h or k.startswith(h + ".") for h in heads)  # noqa: E731
    skipped = [k for k, v in state.items() if in_head(k) and (k not in own or own[k].shape != v.shape)]
    for key in skipped:
        state.pop(key)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not in_head(k)]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__}: "
            f"shape mismatch {mismatched[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}; another "
            f"repository's checkpoint converts with `cvkit weights import {path} --arch ARCH`"
        )
    model.load_state_dict(state, strict=False)
    return set(state)
