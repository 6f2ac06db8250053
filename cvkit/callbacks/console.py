"""The console: one fixed-column line per epoch, as fastai's table reads, with stage boundaries marked.

Replaces Catalyst's ``loss/mean | loss/std | momentum/... | stage_index`` dumps. Columns: stage,
global epoch, train loss, valid loss, the valid metric, every parameter group's LR (one ``lr min..max``
column beyond :data:`LR_COLUMNS` groups), seconds. An EMA stage that validates both weights adds the raw
weights' score (``valid_raw``) and which weights the epoch kept (``kept``: ``ema`` or ``raw``, as the
checkpoint callback chose). A column is as wide as its name: names are never cut.
Progress bars are for terminals only (:func:`progress_bars_wanted`): a CI log or a redirected file
gets the table, not thousands of carriage-return updates.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional

from catalyst.core.callback import Callback, CallbackOrder

from cvkit.status import progress_bars_wanted

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner

WIDTH = 11  # the narrowest column
LR_COLUMNS = 3  # more parameter groups than this share one "lr min..max" column
LR_RANGE, LR_RANGE_WIDTH = "lr min..max", len("1.0e-04..1.0e-02")
KEPT = "kept"  # the column naming the weights an epoch kept when an EMA stage validates both


def _cell(value: object, width: int) -> str:
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else (f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}")
    else:
        text = str(value)
    return text[:width].rjust(width)


def _lr_range(row: Mapping[str, object]) -> str:
    """``1.0e-04..1.0e-02``: the smallest and largest LR of the row's parameter groups."""
    lrs = [float(v) for k, v in row.items() if k.startswith("lr/") and isinstance(v, (int, float))]
    return f"{min(lrs):.1e}..{max(lrs):.1e}" if lrs else "nan"


class ConsoleTableCallback(Callback):
    """Print the epoch's row of the run's history, after the history and checkpoint callbacks wrote it and
    chose the epoch's weights (``run_state.kept_weights``)."""

    reads: tuple = ()
    writes: tuple = ()

    def __init__(self, valid_loader: str, valid_metric: str, write: Callable[[str], None] = print) -> None:
        super().__init__(order=CallbackOrder.External + 21)
        self.valid_loader, self.valid_metric, self.write = valid_loader, valid_metric, write
        self.columns: Optional[List[str]] = None
        self.widths: List[int] = []
        self.started = 0.0

    def on_experiment_start(self, runner: "IRunner") -> None:
        self.columns = None

    def on_epoch_start(self, runner: "IRunner") -> None:
        self.started = time.perf_counter()

    def _header(self, row: Mapping[str, object]) -> List[str]:
        lrs = [k for k in row if k.startswith("lr/")]
        metric = [] if self.valid_metric == "loss" else [f"{self.valid_loader}/{self.valid_metric}"]
        raw = f"{self.valid_loader}_raw/{self.valid_metric}"
        both = [raw, KEPT] if raw in row else []
        return ["train/loss", f"{self.valid_loader}/loss", *metric, *both,
                *(lrs if len(lrs) <= LR_COLUMNS else [LR_RANGE])]

    def _value(self, row: Mapping[str, object], column: str) -> object:
        return _lr_range(row) if column == LR_RANGE else row.get(column, float("nan"))

    def on_epoch_end(self, runner: "IRunner") -> None:
        if not runner.engine.is_main_process or not runner.run_state.history:
            return
        row = runner.run_state.history[-1]
        if self.columns is None:
            self.columns = self._header(row)
            names = ["stage", "epoch", *[c.replace("/", " ") for c in self.columns], "seconds"]
            self.widths = [max(WIDTH, len(n), LR_RANGE_WIDTH if n == LR_RANGE else 0) for n in names]
            self.widths[0] = max(self.widths[0], len(str(row["stage"])))
            both = f"({self.valid_loader}: EMA weights, {self.valid_loader}_raw: raw weights, {KEPT}: the better) "
            self.write(f"-- stage {row['stage']!s} " + (both if KEPT in self.columns else "") + "-" * 20)
            self.write(" ".join(n.rjust(w) for n, w in zip(names, self.widths)))
        if KEPT in self.columns:
            row = {**row, KEPT: runner.run_state.kept_weights}
        cells = [row["stage"], row["epoch"], *[self._value(row, c) for c in self.columns],
                 f"{time.perf_counter() - self.started:.1f}"]
        self.write(" ".join(_cell(c, w) for c, w in zip(cells, self.widths)))


__all__ = ["ConsoleTableCallback", "progress_bars_wanted"]
