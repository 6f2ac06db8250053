"""Gradient accumulation: one optimizer step per window of ``accumulate`` train batches.

The backward callback divides each batch's loss by the size of its window (the last window of an
epoch may be shorter), so a window of equal-size batches yields the gradient of their union; the
optimizer callback steps at the end of each window; the scheduler callback steps per-batch
schedules only then, so they count optimizer steps. With ``accumulate=1`` all three behave like
cvkit's guarded backward/optimizer callbacks and Catalyst's scheduler callback.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from catalyst import dl

from cvkit.callbacks.guards import GuardedBackwardCallback, GuardedOptimizerCallback

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class AccumulationWindow:
    """Position of the current train batch in its accumulation window (counted per epoch, per rank)."""

    def __init__(self, accumulate: int = 1) -> None:
        if not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
        self.accumulate = accumulate
        self.seen = 0
        self.total: Optional[int] = None

    def reset(self, loader: Any) -> None:
        """Start an epoch over ``loader`` (its length tells where the last, shorter window ends)."""
        self.seen = 0
        try:
            self.total = len(loader)
        except TypeError:
            self.total = None

    def advance(self) -> None:
        """Count one more train batch."""
        self.seen += 1

    @property
    def size(self) -> int:
        """Batches in the current batch's window."""
        start = (self.seen - 1) // self.accumulate * self.accumulate
        return self.accumulate if self.total is None else max(1, min(self.accumulate, self.total - start))

    @property
    def boundary(self) -> bool:
        """True when the current batch ends its window (the optimizer steps after it)."""
        return self.seen % self.accumulate == 0 or (self.total is not None and self.seen >= self.total)


class AccumulatingBackwardCallback(GuardedBackwardCallback):
    """Backward of ``loss / window size``; skipped for a batch the NaN guard marked."""

    def __init__(self, metric_key: str, window: AccumulationWindow) -> None:
        super().__init__(metric_key=metric_key)
        self.window = window

    def on_loader_start(self, runner: "IRunner") -> None:
        if runner.is_train_loader:
            self.window.reset(runner.loader)

    def on_batch_end(self, runner: "IRunner") -> None:
        if not runner.is_train_loader:
            return
        self.window.advance()
        if not runner.run_state.skip_step:
            runner.engine.backward(runner.batch_metrics[self.metric_key] / self.window.size)


class AccumulatingOptimizerCallback(GuardedOptimizerCallback):
    """Optimizer step at the end of each window; ``run_state.stepped`` tells later callbacks (EMA) it happened.

    A batch the NaN guard marked drops the gradients accumulated so far in its window.
    """

    def __init__(self, metric_key: str, window: AccumulationWindow) -> None:
        super().__init__(metric_key=metric_key)
        self.window = window

    def on_batch_end(self, runner: "IRunner") -> None:
        runner.run_state.stepped = False
        if not runner.is_train_loader:
            runner.batch_metrics.update(self._get_lr_momentum_stats())
            return
        if runner.run_state.skip_step:
            self.optimizer.zero_grad()
            return
        if self.window.boundary:
            self.optimizer.step()
            self.optimizer.zero_grad()
            runner.run_state.stepped = True
        runner.batch_metrics.update(self._get_lr_momentum_stats())


class WindowSchedulerCallback(dl.SchedulerCallback):
    """Catalyst's scheduler callback; per batch it steps at window ends only (once per optimizer step)."""

    def __init__(self, window: AccumulationWindow, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window = window

    def on_batch_end(self, runner: "IRunner") -> None:
        if self.window.boundary:
            super().on_batch_end(runner)


__all__ = [
    "AccumulatingBackwardCallback",
    "AccumulatingOptimizerCallback",
    "AccumulationWindow",
    "WindowSchedulerCallback",
]
