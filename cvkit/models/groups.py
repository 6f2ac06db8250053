"""The one model contract: name the head, the blocks and the parameter groups of any model.

Stages, freezing, the BatchNorm policy, per-group learning rates, layer-wise decay and LR
logging all go through these functions, so no other module needs per-architecture code.

A model's head is found, in this order, from
1. an attribute ``head_names`` (a tuple of dotted module names) the model sets itself;
2. timm's ``pretrained_cfg["classifier"]`` (``fc``, ``head.fc``, ``classifier``...);
3. segmentation-models-pytorch's ``decoder`` + ``segmentation_head`` (+ ``classification_head``);
4. a sub-module called ``head``.
Everything else is the backbone.
"""
from __future__ import annotations

import difflib
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from torch import nn

LR = Union[float, Mapping[str, float]]


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """Return the module at a dotted name, with an error that lists close names."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise KeyError(_unknown(name, "module", list(modules)))
    return modules[name]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at a dotted name (e.g. ``head.fc``) by ``module``."""
    parent_name, _, attr = name.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    setattr(parent, attr, module)


def head_names(model: nn.Module) -> Tuple[str, ...]:
    """Dotted names of the modules that form the model's head (see module docstring)."""
    names = getattr(model, "head_names", None)
    if names:
        return _checked(model, (names,) if isinstance(names, str) else tuple(names))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("classifier"):
        classifier = cfg["classifier"]
        found = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        found = tuple(n for n in found if _has_module(model, n))
        if found:
            return found
    if hasattr(model, "segmentation_head") and hasattr(model, "decoder"):
        names = ["decoder", "segmentation_head"]
        if getattr(model, "classification_head", None) is not None:
            names.append("classification_head")
        return tuple(names)
    if isinstance(getattr(model, "head", None), nn.Module):
        return ("head",)
    top = [n for n, _ in model.named_children()]
    raise ValueError(
        f"cannot tell the head of {type(model).__name__}: set `model.head_names = ('<module>',)` "
        f"or name the head sub-module `head`; its top-level modules are {top}"
    )


def _has_module(model: nn.Module, name: str) -> bool:
    return name in dict(model.named_modules())


def _checked(model: nn.Module, names: Tuple[str, ...]) -> Tuple[str, ...]:
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise KeyError(_unknown(name, "head module in `head_names`", list(modules)))
    return names


def _in(param_name: str, prefixes: Iterable[str]) -> bool:
    return any(param_name == p or param_name.startswith(p + ".") for p in prefixes)


def head_param_names(model: nn.Module) -> Set[str]:
    """Names of every parameter that belongs to the head."""
    heads = head_names(model)
    return {n for n, _ in model.named_parameters() if _in(n, heads)}


WRAPPER_ROOTS = ("backbone", "encoder", "encoder.model")


def block_names(model: nn.Module) -> List[str]:
    """Module names a stage can unfreeze from: modules up to two levels below the model or below
    a wrapped backbone (``backbone``, ``encoder``, ``encoder.model``) that own parameters.

    Any dotted module name is accepted by :func:`params_from`; this list is what error
    messages and documentation show (``layer3``, ``blocks.5``, ``encoder.layer4``...).
    """
    modules = dict(model.named_modules())
    roots = [""] + [r for r in WRAPPER_ROOTS if r in modules]
    names = []
    for name, module in modules.items():
        if not name or not any(True for _ in module.parameters()):
            continue
        for root in roots:
            if root and not name.startswith(root + "."):
                continue
            rest = name[len(root) + 1 :] if root else name
            if rest.count(".") <= 1:
                names.append(name)
                break
    return names


def params_from(model: nn.Module, block: str) -> Set[str]:
    """Names of the parameters registered at or after module ``block`` (the head included)."""
    modules = dict(model.named_modules())
    if block not in modules or block == "":
        raise KeyError(_unknown(block, "block", block_names(model)))
    own = [n for n, _ in modules[block].named_parameters(prefix=block)]
    if not own:
        raise KeyError(f"block {block!r} has no parameters; valid blocks: {block_names(model)}")
    order = [n for n, _ in model.named_parameters()]
    start = order.index(own[0])
    return set(order[start:]) | head_param_names(model)


def trainable_param_names(model: nn.Module, trainable: str) -> Set[str]:
    """Resolve a stage's ``trainable`` ("head", "all" or a block name) to parameter names."""
    if trainable == "all":
        return {n for n, _ in model.named_parameters()}
    if trainable == "head":
        names = head_param_names(model)
        if not names:
            raise ValueError(f"the head {head_names(model)} of {type(model).__name__} has no parameters")
        return names
    return params_from(model, trainable)


def layer_ids(model: nn.Module) -> Dict[str, int]:
    """Depth level of every parameter for layer-wise LR decay: 0 is the input, the head is last.

    timm models answer with their own ``group_matcher``; any other model counts its top-level
    children, opening ``nn.Sequential``/``nn.ModuleList`` containers one level.
    """
    heads = head_param_names(model)
    ids: Dict[str, int] = {}
    matcher = getattr(model, "group_matcher", None)
    if callable(matcher):
        from timm.models import group_parameters

        grouped = group_parameters(model, matcher(coarse=False))
        for level, key in enumerate(sorted(grouped)):
            ids.update({name: level for name in grouped[key]})
    else:
        level = 0
        for child_name, child in model.named_children():
            parts = (
                [(f"{child_name}.{n}", m) for n, m in child.named_children()]
                if isinstance(child, (nn.Sequential, nn.ModuleList))
                else [(child_name, child)]
            )
            for prefix, part in parts:
                names = [n for n, _ in part.named_parameters(prefix=prefix)]
                if names:
                    ids.update({n: level for n in names})
                    level += 1
        for name, _ in model.named_parameters():
            ids.setdefault(name, level)
    levels = sorted({ids[n] for n in ids if n not in heads})
    dense = {level: i for i, level in enumerate(levels)}
    return {n: len(levels) if n in heads else dense[level] for n, level in ids.items()}


def resolve_lr(model: nn.Module, names: Iterable[str], lr: LR, layer_decay: Optional[float] = None) -> Dict[str, Tuple[str, float]]:
    """Map each parameter name to ``(group name, learning rate)``.

    ``lr`` is one float for all, or a dict with keys ``head``, ``backbone`` and/or any module name
    (the longest matching module name wins). With ``layer_decay`` the backbone is split by depth:
    a parameter ``k`` levels below the head gets ``lr_backbone * layer_decay ** (k - 1)``.
    """
    heads = head_param_names(model)
    spec = {"head": lr, "backbone": lr} if isinstance(lr, (int, float)) else dict(lr)
    modules = set(dict(model.named_modules()))
    valid = ["head", "backbone"] + block_names(model)
    for key in spec:
        if key not in ("head", "backbone") and key not in modules:
            raise KeyError(_unknown(key, "learning-rate group", valid))
    if "backbone" not in spec and "head" in spec and not isinstance(lr, (int, float)):
        spec.setdefault("backbone", spec["head"])
    if "head" not in spec:
        spec["head"] = spec["backbone"]
    blocks = sorted((k for k in spec if k not in ("head", "backbone")), key=len, reverse=True)
    ids = layer_ids(model) if layer_decay else {}
    top = max(ids.values(), default=0)
    out: Dict[str, Tuple[str, float]] = {}
    for name in names:
        block = next((b for b in blocks if _in(name, [b])), None)
        if block is not None:
            out[name] = (block, float(spec[block]))
        elif name in heads:
            out[name] = ("head", float(spec["head"]))
        elif layer_decay:
            depth = top - ids[name]
            out[name] = (f"backbone.{ids[name]:02d}", float(spec["backbone"]) * layer_decay ** (depth - 1))
        else:
            out[name] = ("backbone", float(spec["backbone"]))
    return out


def param_groups(
    model: nn.Module,
    names: Iterable[str],
    lr: LR,
    weight_decay: float = 0.0,
    layer_decay: Optional[float] = None,
) -> List[dict]:
    """Optimizer parameter groups, one per (group name, decay/no-decay), each with a ``name``.

    Biases and 1-d parameters (norm weights) get no weight decay, as usual for fine-tuning.
    """
    wanted = set(names)
    params = dict(model.named_parameters())
    names = [n for n in params if n in wanted]
    resolved = resolve_lr(model, names, lr, layer_decay)
    groups: Dict[Tuple[str, bool], dict] = {}
    for name in names:
        group, group_lr = resolved[name]
        decay = weight_decay > 0 and params[name].ndim > 1
        key = (group, decay)
        if key not in groups:
            groups[key] = {"name": group, "lr": group_lr, "weight_decay": weight_decay if decay else 0.0, "params": []}
        groups[key]["params"].append(params[name])
    return list(groups.values())


def _unknown(name: str, what: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f"; did you mean {close}?" if close else ""
    shown = list(valid) if len(valid) <= 40 else list(valid[:40]) + ["..."]
    return f"unknown {what} {name!r}{hint} valid: {shown}"


def bn_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Every BatchNorm-like module (anything with running statistics) by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }


def apply_trainable(model: nn.Module, trainable: Set[str], train_bn: bool) -> List[str]:
    """Set ``requires_grad`` by name; return the BatchNorm modules that must stay in eval mode.

    A BatchNorm module is frozen when its parameters are outside ``trainable`` or when
    ``train_bn`` is False; a frozen BN gets no gradients and keeps its running statistics.
    """
    frozen_bn = []
    bn_params = set()
    for bn_name, bn in bn_modules(model).items():
        names = [n for n, _ in bn.named_parameters(prefix=bn_name)]
        if names:
            inside = all(n in trainable for n in names)
        else:  # BN without affine parameters follows the module that holds it
            inside = _in_any_prefix(bn_name.rpartition(".")[0], trainable)
        if not inside or not train_bn:
            frozen_bn.append(bn_name)
            bn_params.update(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable and name not in bn_params)
    return frozen_bn


def apply_stage_trainable(model: nn.Module, trainable: Set[str], train_bn: bool, frozen_bn: str) -> List[str]:
    """:func:`apply_trainable` for a stage; return the BatchNorm modules to keep in eval mode.

    With ``frozen_bn="train"`` the BatchNorm layers of frozen blocks train (statistics and affine
    parameters, fastai's default); ``"eval"`` keeps them frozen.
    """
    outside = set(apply_trainable(model, trainable, True)) if frozen_bn == "train" else set()
    frozen = apply_trainable(model, trainable, train_bn)
    if not outside:
        return frozen
    modules = dict(model.named_modules())
    for name in outside:
        for p in modules[name].parameters(recurse=False):
            p.requires_grad_(True)
    return [n for n in frozen if n not in outside]


def _in_any_prefix(module_name: str, names: Set[str]) -> bool:
    return any(not module_name or n.startswith(module_name + ".") for n in names)


def set_bn_eval(model: nn.Module, names: Iterable[str]) -> None:
    """Put the named BatchNorm modules in eval mode (their running stats stop updating)."""
    modules = dict(model.named_modules())
    for name in names:
        modules[name].eval()


def count_params(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


MAIN_BLOCK = re.compile(r"^(?:.*\.)?(?:layer\d+|blocks\.\d+|stages\.\d+)$")


def main_blocks(model: nn.Module) -> List[str]:
    """The model's stages in order (``layer1``..``layer4``, ``blocks.0``.., ``stages.0``..), as
    ``trainable`` block names: ``main_blocks(m)[-2]`` unfreezes the last two, ``[len // 2]`` the top half."""
    names = [n for n in block_names(model) if MAIN_BLOCK.match(n)]
    if not names:
        raise ValueError(f"{type(model).__name__}: no layerN / blocks.N / stages.N blocks among {block_names(model)}")
    return names


__all__ = [
    "apply_stage_trainable",
    "apply_trainable",
    "block_names",
    "bn_modules",
    "count_params",
    "get_submodule",
    "head_names",
    "head_param_names",
    "layer_ids",
    "main_blocks",
    "param_groups",
    "params_from",
    "resolve_lr",
    "set_bn_eval",
    "set_submodule",
    "trainable_param_names",
]
