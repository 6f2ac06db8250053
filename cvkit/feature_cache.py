"""Head stages on cached features: the frozen backbone runs once per image and copy, not every epoch.

A head stage (``Stage(trainable="head", cache_features=N)``) trains only what follows the
backbone's ``forward_features``; everything before it is frozen, its BatchNorm in eval mode. So
its output for an image never changes during the stage, and computing it every epoch is wasted
work (most of a head stage's time). :func:`cached_loaders` computes it once per loader, pooled
to one value per channel (or token), for ``N`` augmented copies of the train set, and
:func:`features_as_input` makes the model take those features in place of images for the stage.
The head, the metrics, checkpoints and resume see the same model and the same batches.

The split point is timm's ``forward_features`` / ``forward_head`` (on the model, or on
``model.backbone`` for cvkit's task wrappers). Pooling to 1x1 before ``forward_head`` is exact
for average and max pooling; other heads (a ViT's class token, attention pooling) are refused
after one check batch, as is a head stage whose trainable modules run inside ``forward_features``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, List, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cvkit.data.batch import as_batch
from cvkit.data.loaders import make_loader

Batch = Dict[str, Any]


def feature_network(model: nn.Module) -> nn.Module:
    """The timm network whose ``forward_features`` a cached head stage skips: ``model.backbone``
    for cvkit's task wrappers, else the model itself; ValueError when there is none."""
    backbone = getattr(model, "backbone", None)
    net = backbone if isinstance(backbone, nn.Module) else model
    if not (callable(getattr(net, "forward_features", None)) and callable(getattr(net, "forward_head", None))):
        raise ValueError(f"cache_features: {type(model).__name__} has no timm forward_features/forward_head "
                         "to split at (timm classifiers and cvkit's class_box/keypoints models have)")
    return net


def _pooled(features: Tensor) -> Tensor:
    """A feature map averaged to 1x1 (``B, C, 1, 1``) or tokens to one (``B, 1, C``)."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3), keepdim=True)
    if features.ndim == 3:
        return features.mean(dim=1, keepdim=True)
    raise ValueError(f"cache_features: forward_features gave shape {tuple(features.shape)}; "
                     "expected a (B, C, H, W) map or (B, N, C) tokens")


def _passthrough(features: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Stands in for ``forward_features`` (whatever options the family passes it): features are given."""
    return features


@contextlib.contextmanager
def features_as_input(model: nn.Module) -> Iterator[None]:
    """While inside, ``model`` takes cached features (from :func:`cached_loaders`) instead of images."""
    net = feature_network(model)
    net.forward_features = _passthrough
    try:
        yield
    finally:
        del net.forward_features


class CachedFeatures(Dataset):
    """A loader's items with ``features`` replaced by the backbone's pooled output.

    Holds one or more copies (augmented passes) of the whole set; :meth:`set_epoch` picks the copy
    (the runner calls it at each loader start), so epoch ``e`` of the stage reads copy ``e mod N``.
    """

    def __init__(self, copies: List[Dict[str, Any]]) -> None:
        self.copies = copies
        self.copy = 0

    def set_epoch(self, epoch: int) -> None:
        """Read copy ``epoch mod N`` from now on."""
        self.copy = epoch % len(self.copies)

    def __len__(self) -> int:
        return len(self.copies[0]["features"])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {key: values[index] for key, values in self.copies[self.copy].items()}


def _check_split(model: nn.Module, net: nn.Module, images: Tensor, where: str) -> None:
    """Refuse a model whose head is not exact on pooled features or whose trainable part runs in
    ``forward_features`` (one batch, eval mode)."""
    ran: set = set()
    hooks = [m.register_forward_hook(lambda module, *_: ran.add(module)) for m in net.modules()]
    try:
        features = net.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    trained = [name for name, module in model.named_modules() if module in ran
               and any(p.requires_grad for p in module.parameters(recurse=False))]
    if trained:
        raise ValueError(f"{where}: {trained[0]} trains but runs inside forward_features, whose output is cached")
    full = net.forward_head(features, pre_logits=True)  # the head's input: a new head's zero output would hide a misfit
    cached = net.forward_head(_pooled(features), pre_logits=True)
    if not torch.allclose(full, cached, rtol=1e-4, atol=1e-4 * float(full.abs().max().clamp(min=1.0))):
        raise ValueError(f"{where}: {type(net).__name__}'s head does not pool by average or max (e.g. a class "
                         "token or attention pooling), so pooled features cannot be cached; drop cache_features")


def _extract(model: nn.Module, net: nn.Module, loader: DataLoader, device: torch.device, input_key: str,
             target_key: str) -> Dict[str, Any]:
    """One pass over ``loader``'s dataset in index order: pooled features plus every other batch key."""
    from cvkit.inference.loop import outputs_over

    parts: Dict[str, List[Any]] = {}
    batches = (as_batch(batch, input_key, target_key) for batch in loader)
    for batch, pooled in outputs_over(model, batches, device, lambda x: _pooled(net.forward_features(x)), input_key):
        parts.setdefault(input_key, []).append(pooled.cpu())
        for key, value in batch.items():
            if key != input_key:
                parts.setdefault(key, []).append(value)
    out: Dict[str, Any] = {}
    for key, values in parts.items():
        if all(isinstance(v, Tensor) for v in values):
            out[key] = torch.cat(values)
        else:
            out[key] = [item for value in values for item in value]
    return out


def cached_loaders(model: nn.Module, loaders: Mapping[str, DataLoader], copies: int, seed: int,
                   device: torch.device, input_key: str = "features", target_key: str = "targets",
                   where: str = "cache_features", verbose: bool = True) -> Dict[str, DataLoader]:
    """Loaders over cached features: ``copies`` augmented passes of each train loader, one of the others.

    Each pass reads the loader's dataset in index order (its own workers and collate), with the
    global RNG seeded from ``seed`` and the copy, so a resumed stage rebuilds the same cache. The
    new loaders reuse the originals' batch samplers and generators: same batches, same order.
    """
    net = feature_network(model)
    was_training = model.training
    model.to(device).eval()
    started, counts = time.perf_counter(), {}
    try:
        out: Dict[str, DataLoader] = {}
        checked = False
        for key, loader in loaders.items():
            passes = copies if key.startswith("train") else 1
            sequential = make_loader(loader.dataset, loader.batch_size or 1, train=False, workers=loader.num_workers,
                                     collate_fn=loader.collate_fn)
            if not checked:
                first = as_batch(next(iter(sequential)), input_key, target_key)[input_key].to(device)
                with torch.no_grad():
                    _check_split(model, net, first, where)
                checked = True
            cache = []
            for copy in range(passes):
                torch.manual_seed(seed + copy)
                cache.append(_extract(model, net, sequential, device, input_key, target_key))
            counts[key] = (len(loader.dataset), passes)
            out[key] = DataLoader(CachedFeatures(cache), batch_sampler=loader.batch_sampler,
                                  generator=loader.generator)
    finally:
        model.train(was_training)
    if verbose:
        what = ", ".join(f"{key} {n} x {p}" if p > 1 else f"{key} {n}" for key, (n, p) in counts.items())
        print(f"[cvkit] {where}: backbone features of {what} images cached in {time.perf_counter() - started:.1f} s")
    return out


__all__ = ["CachedFeatures", "cached_loaders", "feature_network", "features_as_input"]
