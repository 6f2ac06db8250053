"""The LR range test: train for a few batches while the LR grows exponentially, and watch the loss.

It runs over a stage's trainable set (``trainable="head"``, ``"all"`` or a block name) and can
sweep one parameter group alone (``group="head"``) while the others keep fixed LRs, which is how
the head LR of a fine-tuning stage is chosen. Weights, buffers, ``requires_grad`` flags, gradients,
train/eval modes and the global RNGs (torch, numpy, random) are put back exactly afterwards, so
the test can run right before training without changing what training does.
"""
from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cvkit.data.batch import INPUT_KEY, TARGET_KEY, as_batch
from cvkit.io import atomic_write_bytes
from cvkit.models.groups import LR, apply_trainable, param_groups, set_bn_eval, trainable_param_names

OptimizerSpec = Union[str, Callable[[List[dict]], torch.optim.Optimizer]]


@dataclass
class LRFindResult:
    """What the sweep saw: one entry per batch in ``lrs``/``losses``/``smoothed``.

    ``suggested_lr`` is where the smoothed loss falls fastest (per log-LR); ``valley_lr`` is two
    thirds of the way down the longest falling stretch before the minimum, a more cautious pick.
    ``diverged_lr`` is the LR at which the sweep stopped because the loss blew up (None if it
    ran to the end). ``group_lrs`` holds every parameter group's LR at every step.
    """

    lrs: List[float]
    losses: List[float]
    smoothed: List[float]
    suggested_lr: Optional[float]
    valley_lr: Optional[float]
    diverged_lr: Optional[float] = None
    group: Optional[str] = None
    group_lrs: Dict[str, List[float]] = field(default_factory=dict)

    def plot(self, path: Union[str, os.PathLike]) -> None:
        """Write the smoothed loss against the LR (log axis) with both suggestions marked, as PNG."""
        if not self.lrs:
            raise ValueError("nothing to plot: the LR range test recorded no step (the first loss was not finite)")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", label="smoothed loss")
        ax.set_xscale("log")
        for lr, name, colour in ((self.suggested_lr, "steepest", "C3"), (self.valley_lr, "valley", "C2")):
            if lr is not None:
                y = float(np.interp(np.log(lr), np.log(self.lrs), self.smoothed))
                ax.axvline(lr, color=colour, linestyle="--", linewidth=0.8)
                ax.plot([lr], [y], "o", color=colour, label=f"{name} {lr:.2e}")
        low, first = min(min(self.smoothed), float(np.percentile(self.losses, 5))), self.smoothed[0]
        span = max(first - low, 1e-3 * max(abs(first), 1.0))
        ax.set_ylim(low - 0.1 * span, min(max(self.smoothed), first + span) + 0.1 * span)
        ax.set_xlabel("learning rate" + (f" of group {self.group!r}" if self.group else ""))
        ax.set_ylabel("loss")
        ax.set_title("LR range test" + (" (stopped: loss diverged)" if self.diverged_lr is not None else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        atomic_write_bytes(path, buffer.getvalue())


def lr_find(
    model: nn.Module,
    loader: Any,
    criterion: Callable[..., torch.Tensor],
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    trainable: str = "all",
    optimizer: OptimizerSpec = "sgd",
    group: Optional[str] = None,
    lr: Optional[LR] = None,
    weight_decay: float = 0.0,
    train_bn: bool = True,
    smooth: float = 0.05,
    diverge_factor: Optional[float] = 4.0,
    device: Union[str, torch.device] = "cpu",
    out_png: Union[str, os.PathLike, None] = None,
    progress: bool = True,
    optimizer_kwargs: Optional[Dict[str, Any]] = None,
) -> LRFindResult:
    """Sweep the LR exponentially from ``start_lr`` to ``end_lr`` over up to ``num_steps`` batches.

    Args:
        model: any model the group contract understands (see :mod:`cvkit.models.groups`).
        loader: yields ``{"features", "targets"}`` dicts or ``(x, y)`` pairs; cycled if shorter.
        criterion: ``criterion(logits, targets)``; a per-sample loss is averaged.
        trainable: the stage's trainable set, ``"head"``, ``"all"`` or a block name.
        optimizer: a registered optimizer name (``sgd``, ``adam``, ``adamw``...) or
            ``fn(param_groups) -> Optimizer``; ``optimizer_kwargs`` go to it.
        group: sweep only this parameter group (``"head"``, ``"backbone"`` or an ``lr`` key);
            the others stay at the fixed LRs given by ``lr`` (a float or a dict as in stages).
        smooth: weight of the newest loss in the (bias-corrected) moving average.
        diverge_factor: stop once the smoothed loss exceeds this times its best; None never stops.
        out_png: also write the plot there.
        progress: show a tqdm progress bar.
    """
    _check_args(start_lr, end_lr, num_steps, smooth, diverge_factor)
    if group is None and lr is not None:
        raise ValueError("lr= fixes the LRs of the groups that are not swept; it needs group= (e.g. group='head')")
    saved = _Snapshot.take(model)
    try:
        model.to(device)
        frozen_bn = apply_trainable(model, trainable_param_names(model, trainable), train_bn)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if not names:
            raise ValueError(f"trainable={trainable!r} leaves no parameter to train in {type(model).__name__}")
        model.train()
        set_bn_eval(model, frozen_bn)
        groups = _groups(model, names, group, lr, weight_decay, start_lr)
        opt = _make_optimizer(optimizer, groups, optimizer_kwargs or {})
        result = _sweep(model, loader, criterion, opt, group, start_lr, end_lr, num_steps, smooth, diverge_factor,
                        device, progress)
    finally:
        saved.restore(model)
    if out_png is not None:
        result.plot(out_png)
    return result


def _check_args(start_lr: float, end_lr: float, num_steps: int, smooth: float, diverge_factor: Optional[float]) -> None:
    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise ValueError(f"need 0 < start_lr < end_lr (finite), got start_lr={start_lr!r}, end_lr={end_lr!r}")
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not 0 < smooth <= 1:
        raise ValueError(f"smooth is the weight of the newest loss, in (0, 1]; got {smooth!r}")
    if diverge_factor is not None and not diverge_factor > 1:
        raise ValueError(f"diverge_factor must be > 1 (or None to never stop early), got {diverge_factor!r}")


def _groups(
    model: nn.Module, names: set, group: Optional[str], lr: Optional[LR], weight_decay: float, start_lr: float
) -> List[dict]:
    groups = param_groups(model, names, lr if lr is not None else start_lr, weight_decay=weight_decay)
    if group is None:
        return groups
    available = sorted({g["name"] for g in groups})
    if group not in available:
        raise KeyError(f"group {group!r} is not among the parameter groups of this sweep: {available} "
                       "(a block name needs an lr= key of that name; a frozen group has no parameters)")
    if lr is None and len(available) > 1:
        others = [n for n in available if n != group]
        raise ValueError(f"group={group!r} sweeps that group alone: give the other groups {others} fixed LRs "
                         f"with lr= (a float or a dict such as {{'backbone': 1e-4}})")
    return groups


def _make_optimizer(optimizer: OptimizerSpec, groups: List[dict], kwargs: Dict[str, Any]) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(groups, **kwargs)
    from cvkit.stages import create_optimizer

    return create_optimizer(optimizer, groups, **kwargs)


def _sweep(
    model: nn.Module,
    loader: Any,
    criterion: Callable[..., torch.Tensor],
    opt: torch.optim.Optimizer,
    group: Optional[str],
    start_lr: float,
    end_lr: float,
    num_steps: int,
    smooth: float,
    diverge_factor: Optional[float],
    device: Union[str, torch.device],
    progress: bool,
) -> LRFindResult:
    plan = start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))
    swept = [g for g in opt.param_groups if group is None or g.get("name") == group]
    group_lrs: Dict[str, List[float]] = {}
    lrs: List[float] = []
    losses: List[float] = []
    smoothed: List[float] = []
    average, best, diverged_lr = 0.0, math.inf, None
    batches = _cycle(loader)
    with tqdm(total=num_steps, desc="lr_find", disable=not progress, leave=False) as bar:
        for step, step_lr in enumerate(plan.tolist()):
            for g in swept:
                g["lr"] = step_lr
            batch = as_batch(next(batches))
            x, y = _to(batch[INPUT_KEY], device), _to(batch[TARGET_KEY], device)
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss = loss.mean() if loss.ndim else loss
            value = float(loss.detach())
            if not math.isfinite(value):
                diverged_lr = step_lr
                break
            loss.backward()
            opt.step()
            average = smooth * value + (1 - smooth) * average
            current = average / (1 - (1 - smooth) ** (step + 1))
            for name, group_lr in _lrs_by_name(opt).items():
                group_lrs.setdefault(name, []).append(group_lr)
            lrs.append(step_lr)
            losses.append(value)
            smoothed.append(current)
            best = min(best, current)
            bar.update(1)
            bar.set_postfix(lr=f"{step_lr:.2e}", loss=f"{current:.4f}")
            if diverge_factor is not None and current > diverge_factor * best:
                diverged_lr = step_lr
                break
    return LRFindResult(lrs, losses, smoothed, _steepest(lrs, smoothed), _valley(lrs, smoothed), diverged_lr, group, group_lrs)


def _lrs_by_name(opt: torch.optim.Optimizer) -> Dict[str, float]:
    """Each named group's LR once (decay and no-decay halves of a group share their name and LR)."""
    out: Dict[str, float] = {}
    for i, g in enumerate(opt.param_groups):
        out.setdefault(str(g.get("name", f"group{i}")), float(g["lr"]))
    return out


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batches")


def _to(value: Any, device: Union[str, torch.device]) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _steepest(lrs: Sequence[float], smoothed: Sequence[float]) -> Optional[float]:
    """LR where the smoothed loss falls fastest per unit of log-LR, at or before its minimum (a fall
    after a spike past the minimum is the run recovering from a too-high LR, not a usable one)."""
    if len(lrs) < 3:
        return None
    slope = np.gradient(np.asarray(smoothed), np.log10(np.asarray(lrs)))
    return float(lrs[int(np.argmin(slope[: int(np.argmin(smoothed)) + 1]))])


def _valley(lrs: Sequence[float], smoothed: Sequence[float]) -> Optional[float]:
    """Two thirds of the way down the longest run of falling smoothed loss before its minimum."""
    if len(lrs) < 3:
        return None
    bottom = int(np.argmin(smoothed))
    run_start, best = 0, (0, 0)
    for i in range(1, bottom + 1):
        if smoothed[i] >= smoothed[i - 1]:
            run_start = i
        if i - run_start > best[1] - best[0]:
            best = (run_start, i)
    start, end = best
    return float(lrs[start + (2 * (end - start)) // 3])


@dataclass
class _Snapshot:
    """Everything the sweep changes, copied so it can be written back bit for bit."""

    tensors: Dict[str, torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]
    requires_grad: Dict[str, bool]
    training: List[bool]
    device: Optional[torch.device]
    rng: Tuple[Any, ...]

    @classmethod
    def take(cls, model: nn.Module) -> "_Snapshot":
        params = dict(model.named_parameters())
        tensors = {f"p:{n}": p.detach().clone() for n, p in params.items()}
        tensors.update({f"b:{n}": b.detach().clone() for n, b in model.named_buffers()})
        first = next(iter(tensors.values()), None)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(
            tensors=tensors,
            grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
            requires_grad={n: p.requires_grad for n, p in params.items()},
            training=[m.training for m in model.modules()],
            device=None if first is None else first.device,
            rng=(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()),
        )

    def restore(self, model: nn.Module) -> None:
        if self.device is not None:
            model.to(self.device)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        with torch.no_grad():
            for key, value in self.tensors.items():
                kind, name = key.split(":", 1)
                (params if kind == "p" else buffers)[name].copy_(value)
        for name, p in params.items():
            p.requires_grad_(self.requires_grad[name])
            p.grad = self.grads[name]
        for module, flag in zip(model.modules(), self.training):
            module.training = flag
        torch_state, cuda_state, np_state, py_state = self.rng
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


__all__ = ["LRFindResult", "lr_find"]
