"""Loss-range selection: learn each train batch from the samples whose loss falls inside a band.

Samples are ranked by their own loss, largest first. ``band=(0.01, 0.30)`` drops the top 1 %
(likely outliers or wrong labels) and the bottom 70 % (already learnt); the batch loss is the mean
over the rest. ``hardest_k=k`` keeps the k largest (OHEM-like), ``drop_top=x`` drops the top
``x`` only (loss truncation). With ``quantile_window=n`` the band's edges come from the quantiles
of the last ``n`` train losses instead of the current batch's ranks (steadier with small batches).
Validation and inference losses always cover every sample.

The callback replaces Catalyst's ``CriterionCallback``: it writes ``runner.batch_metrics[metric_key]``
(used by Backward/Optimizer callbacks) and ``runner.loader_metrics[metric_key]``; for train loaders
it also logs ``loss_range/kept_fraction``, ``loss_range/edge_low`` and ``loss_range/edge_high``
(the smallest and largest kept loss, batch mean), ``loss_range/dropped_top_mean`` (mean loss of
the dropped top, NaN when none was dropped) and ``loss_range/loss_all`` (mean over all samples).
At the end, the samples dropped as top-loss most often are written to ``dropped_top.csv``.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from catalyst.core.callback import CallbackOrder, ICriterionCallback
from catalyst.utils.misc import get_attr

from cvkit.losses import per_sample_loss

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner

PREFIX = "loss_range/"


def _round_count(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def rank_masks(losses: torch.Tensor, lo: float, hi: float, min_keep: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(keep, top)`` boolean masks for a band of within-batch ranks, largest loss first.

    Ranks ``round(lo*B) .. round(hi*B) - 1`` are kept, the ranks above them are the dropped top;
    the band widens downwards (then upwards) to at least ``min_keep`` samples. Ties keep batch order.
    """
    n = losses.shape[0]
    return _slice_masks(losses, _round_count(lo * n), _round_count(hi * n), min_keep)


def _slice_masks(losses: torch.Tensor, start: int, end: int, min_keep: int) -> Tuple[torch.Tensor, torch.Tensor]:
    n = losses.shape[0]
    end = min(end, n)
    need = min(min_keep, n)
    if end - start < need:
        end = min(n, start + need)
        start = max(0, end - need)
    order = torch.argsort(losses.detach(), descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=losses.device)
    keep[order[start:end]] = True
    top = torch.zeros_like(keep)
    if start:
        top[order[:start]] = True
    return keep, top


def _quantiles(ordered: torch.Tensor, qs: Sequence[float], cache: Dict[Any, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Linear-interpolated quantiles of sorted values (as ``torch.quantile``, in fewer ops)."""
    n, key = ordered.shape[0], (ordered.shape[0], ordered.device, tuple(qs))
    if key not in cache:
        lower = [min(int(q * (n - 1)), n - 2) for q in qs]
        frac = torch.tensor([q * (n - 1) - i for q, i in zip(qs, lower)], dtype=ordered.dtype, device=ordered.device)
        cache[key] = (torch.tensor([[i, i + 1] for i in lower], device=ordered.device), frac)
    pairs, frac = cache[key]
    pairs = ordered[pairs]
    return torch.lerp(pairs[:, 0], pairs[:, 1], frac)


class LossRangeCallback(ICriterionCallback):
    """Criterion callback whose train loss is the mean over a band of per-sample losses.

    Args:
        band: ``(lo, hi)`` fractions of the batch counted from the largest loss, 0 <= lo < hi <= 1.
        hardest_k: keep only the k largest losses of each batch (instead of ``band``).
        drop_top: drop the top fraction and keep the rest, i.e. ``band=(drop_top, 1)``.
        warmup_epochs: the first epochs of the stage learn from every sample.
        quantile_window: take the band's edges from quantiles of the last n train losses
            (once n are seen) instead of the batch's ranks; not with ``hardest_k``.
        min_keep: keep at least this many samples per batch.
        input_key / target_key: batch keys of the model output and the target.
        metric_key: where the loss goes in ``batch_metrics`` and ``loader_metrics``.
        criterion_key: which criterion when ``runner.criterion`` is a dict.
        index_key: batch key with each sample's dataset row (the dropped-top report needs it).
        logdir: folder for ``dropped_top.csv`` (default: ``loss_range/`` in a StagedRunner's logdir;
            with another runner and no logdir, no file).
        report_top: rows in that file (the most often dropped samples).
    """

    def __init__(
        self,
        band: Optional[Sequence[float]] = None,
        hardest_k: Optional[int] = None,
        drop_top: Optional[float] = None,
        warmup_epochs: int = 0,
        quantile_window: Optional[int] = None,
        min_keep: int = 1,
        input_key: str = "logits",
        target_key: str = "targets",
        metric_key: str = "loss",
        criterion_key: Optional[str] = None,
        index_key: str = "index",
        logdir: Union[None, str, Path] = None,
        report_top: int = 200,
    ) -> None:
        super().__init__()
        self.order = CallbackOrder.Metric + 1  # where cvkit's criterion callback runs
        self.reads, self.writes = (input_key, target_key), (metric_key,)
        given = [name for name, v in (("band", band), ("hardest_k", hardest_k), ("drop_top", drop_top)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                "LossRangeCallback needs exactly one of band=(lo, hi), hardest_k=k or drop_top=x; "
                f"got {given or 'none'}"
            )
        if drop_top is not None:
            if not isinstance(drop_top, (int, float)) or not 0 <= drop_top < 1:
                raise ValueError(f"drop_top must be a fraction in [0, 1), got {drop_top!r}")
            band = (float(drop_top), 1.0)
        if band is not None:
            band = self._check_band(band)
        if hardest_k is not None and (not isinstance(hardest_k, int) or isinstance(hardest_k, bool) or hardest_k < 1):
            raise ValueError(f"hardest_k must be an int >= 1, got {hardest_k!r}")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an int >= 0, got {warmup_epochs!r}")
        if not isinstance(min_keep, int) or min_keep < 1:
            raise ValueError(f"min_keep must be an int >= 1, got {min_keep!r}")
        if quantile_window is not None:
            if hardest_k is not None:
                raise ValueError("quantile_window applies to band/drop_top, not to hardest_k (a count per batch)")
            if not isinstance(quantile_window, int) or quantile_window < 2:
                raise ValueError(f"quantile_window must be an int >= 2, got {quantile_window!r}")
        if not isinstance(report_top, int) or report_top < 1:
            raise ValueError(f"report_top must be an int >= 1, got {report_top!r}")
        self.band: Optional[Tuple[float, float]] = band
        self.hardest_k = hardest_k
        self.warmup_epochs, self.quantile_window, self.min_keep = warmup_epochs, quantile_window, min_keep
        self.input_key, self.target_key, self.metric_key = input_key, target_key, metric_key
        self.criterion_key, self.index_key = criterion_key, index_key
        self.logdir = Path(logdir) if logdir is not None else None
        self.report_top = report_top
        self.criterion: Any = None
        self._buffer: Optional[torch.Tensor] = None
        self._buffer_pos = 0
        self._buffer_filled = 0
        self._quantile_cache: Dict[Any, Tuple[torch.Tensor, torch.Tensor]] = {}
        # One record per batch, reduced once at loader end (no host sync, few ops per step).
        self._records: List[Tuple[torch.Tensor, ...]] = []
        self.dropped_counts = torch.zeros(0, dtype=torch.long)
        self.seen_counts = torch.zeros(0, dtype=torch.long)
        self.dropped_loss_sum = torch.zeros(0, dtype=torch.float64)

    @staticmethod
    def _check_band(band: Sequence[float]) -> Tuple[float, float]:
        try:
            lo, hi = (float(v) for v in band)
        except (TypeError, ValueError):
            raise ValueError(f"band must be two fractions (lo, hi), got {band!r}") from None
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"band needs 0 <= lo < hi <= 1 (fractions from the largest loss); got lo={lo!r}, hi={hi!r}")
        return lo, hi

    # Selection -------------------------------------------------------------------------------

    def in_warmup(self, runner: "IRunner") -> bool:
        """True during the stage's first ``warmup_epochs`` epochs (``epoch_step`` is 1-based)."""
        state = getattr(runner, "run_state", None)  # absent under a plain Catalyst runner
        start = state.stage_start_epoch if state is not None else 0
        return runner.epoch_step - start <= self.warmup_epochs

    def select(self, losses: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(keep, top)`` masks for one train batch's per-sample losses (no host sync)."""
        if self.hardest_k is not None:
            return _slice_masks(losses, 0, self.hardest_k, self.min_keep)
        lo, hi = self.band
        keep, top = rank_masks(losses, lo, hi, self.min_keep)
        if self.quantile_window is not None and self._buffer_filled >= self.quantile_window:
            values = losses.detach()
            low, high = _quantiles(torch.sort(self._buffer).values, (1 - hi, 1 - lo), self._quantile_cache)
            keep_q = values <= high if lo > 0 else torch.ones_like(keep)
            if hi < 1:
                keep_q &= values >= low
            top_q = values > high if lo > 0 else torch.zeros_like(top)
            use_q = keep_q.sum() >= min(self.min_keep, values.shape[0])
            keep, top = torch.where(use_q, keep_q, keep), torch.where(use_q, top_q, top)
        return keep, top

    def _remember(self, values: torch.Tensor) -> None:
        if self.quantile_window is None:
            return
        window = self.quantile_window
        values = values.float().flatten()[-window:]
        if self._buffer is None or self._buffer.device != values.device:
            self._buffer = torch.zeros(window, device=values.device)
        n, pos = values.shape[0], self._buffer_pos
        first = min(n, window - pos)
        self._buffer[pos:pos + first] = values[:first]
        self._buffer[: n - first] = values[first:]
        self._buffer_pos = (pos + n) % window
        self._buffer_filled = min(window, self._buffer_filled + n)

    # Catalyst events -------------------------------------------------------------------------

    def on_experiment_start(self, runner: "IRunner") -> None:
        self.criterion = get_attr(runner, key="criterion", inner_key=self.criterion_key)
        if self.criterion is None:
            raise ValueError("LossRangeCallback needs runner.criterion (pass criterion= to train)")
        if not hasattr(self.criterion, "reduction"):
            raise TypeError(
                f"LossRangeCallback needs per-sample losses, but {type(self.criterion).__name__} has no "
                "'reduction' attribute; use a criterion from cvkit.losses or a torch loss"
            )

    def on_loader_start(self, runner: "IRunner") -> None:
        self._records = []

    def on_batch_end(self, runner: "IRunner") -> None:
        if self.target_key not in runner.batch and runner.is_infer_loader:
            return
        outputs, targets = runner.batch[self.input_key], runner.batch[self.target_key]
        if not runner.is_train_loader:
            loss = self.criterion(outputs, targets)
            runner.batch_metrics[self.metric_key] = loss
            self._records.append((loss.detach() * runner.batch_size, runner.batch_size))
            return
        losses = per_sample_loss(self.criterion, outputs, targets)
        if losses.dim() != 1:
            raise ValueError(f"per-sample losses must have shape (B,), got {tuple(losses.shape)}")
        with torch.no_grad():
            values = losses.detach()
            if self.in_warmup(runner):
                keep, top = torch.ones_like(values, dtype=torch.bool), torch.zeros_like(values, dtype=torch.bool)
            else:
                keep, top = self.select(values)
            self._remember(values)
            weights = keep.to(values.dtype) / keep.sum()
        # Dropped samples weigh 0, so their gradient is exactly 0, yet a NaN/inf loss among them
        # still makes the batch loss NaN (0 * NaN), which NaN guards reading batch_metrics see.
        runner.batch_metrics[self.metric_key] = (losses * weights).sum()
        index = runner.batch.get(self.index_key) if isinstance(runner.batch, dict) else None
        if not (isinstance(index, torch.Tensor) and index.shape == values.shape):
            index = None
        self._records.append((values, keep, top, index))

    def on_loader_end(self, runner: "IRunner") -> None:
        if not self._records:
            return
        if not runner.is_train_loader:
            total = torch.stack([r[0] for r in self._records]).sum().item()
            metrics = {self.metric_key: total / sum(r[1] for r in self._records)}
        else:
            metrics = self._train_metrics()
        self._records = []
        runner.loader_metrics.update(runner.engine.mean_reduce_ddp_metrics(metrics))

    def _train_metrics(self) -> Dict[str, float]:
        values = torch.cat([r[0] for r in self._records]).cpu().double()
        keep = torch.cat([r[1] for r in self._records]).cpu()
        top = torch.cat([r[2] for r in self._records]).cpu()
        batch = torch.cat([torch.full((len(r[0]),), i) for i, r in enumerate(self._records)])
        kept_values = torch.where(keep, values, torch.zeros_like(values))
        sizes = torch.bincount(batch).double()
        batch_loss = torch.bincount(batch, weights=kept_values) / torch.bincount(batch, weights=keep.double())
        edge_high = torch.full_like(sizes, -math.inf).scatter_reduce(0, batch, torch.where(keep, values, -math.inf), "amax")
        edge_low = torch.full_like(sizes, math.inf).scatter_reduce(0, batch, torch.where(keep, values, math.inf), "amin")
        n, n_top = float(values.numel()), int(top.sum())
        if all(r[3] is not None for r in self._records):
            self._count_dropped(torch.cat([r[3] for r in self._records]).cpu().long(), top, values)
        return {
            self.metric_key: float((batch_loss * sizes).sum()) / n,
            PREFIX + "kept_fraction": float(keep.sum()) / n,
            PREFIX + "loss_all": float(values.sum()) / n,
            PREFIX + "edge_high": float(edge_high.mean()),
            PREFIX + "edge_low": float(edge_low.mean()),
            PREFIX + "dropped_top_mean": float(values[top].mean()) if n_top else math.nan,
        }

    def _count_dropped(self, index: torch.Tensor, top: torch.Tensor, values: torch.Tensor) -> None:
        size = max(int(index.max()) + 1, self.seen_counts.shape[0])

        def grow(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(size - t.shape[0])])

        self.seen_counts = grow(self.seen_counts) + torch.bincount(index, minlength=size)
        self.dropped_counts = grow(self.dropped_counts) + torch.bincount(index[top], minlength=size)
        self.dropped_loss_sum = grow(self.dropped_loss_sum) + torch.bincount(index[top], weights=values[top], minlength=size)

    def most_dropped(self, n: Optional[int] = None) -> List[Tuple[int, int, int, float]]:
        """``(index, times dropped as top, times seen, mean loss when dropped)``, most dropped first."""
        index = torch.nonzero(self.dropped_counts).flatten()
        counts = self.dropped_counts[index]
        order = torch.argsort(-counts, stable=True)[:n]  # ties: smaller index first
        index, counts = index[order], counts[order]
        means = self.dropped_loss_sum[index] / counts
        return list(zip(index.tolist(), counts.tolist(), self.seen_counts[index].tolist(), means.tolist()))

    def on_experiment_end(self, runner: "IRunner") -> None:
        folder = self.logdir
        state = getattr(runner, "run_state", None)  # absent under a plain Catalyst runner
        if folder is None and state is not None and state.logdir is not None:
            folder = Path(state.logdir) / "loss_range"
        if folder is None or not self.seen_counts.numel():
            return
        suffix = ""
        if getattr(runner.engine, "num_processes", 1) > 1:
            suffix = f".rank{runner.engine.process_index}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"dropped_top{suffix}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "times_dropped_top", "times_seen", "drop_rate", "mean_loss_when_dropped"])
            for index, dropped, seen, mean_loss in self.most_dropped(self.report_top):
                writer.writerow([index, dropped, seen, f"{dropped / max(seen, 1):.3f}", f"{mean_loss:.5g}"])


__all__ = ["LossRangeCallback", "rank_masks"]
