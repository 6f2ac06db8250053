"""The run's ``log.csv``: one row per epoch, over every stage."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

from catalyst.core.callback import Callback, CallbackOrder

from cvkit.io import atomic_write_bytes

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class HistoryCallback(Callback):
    """Append a row (stage, global epoch, every loader metric, every group's LR) to ``run_state.history``
    and rewrite ``log.csv`` from it.

    The whole file is rewritten atomically each epoch: a crash never leaves half a row.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(order=CallbackOrder.External + 10)
        self.path = Path(path)

    def on_epoch_end(self, runner: "IRunner") -> None:
        state = runner.run_state
        row: Dict[str, object] = {
            "stage": state.stage_name,
            "stage_index": state.stage_index,
            "epoch": int(runner.epoch_step),
            "epoch_in_stage": int(runner.epoch_step - state.stage_start_epoch),
        }
        for loader, values in runner.epoch_metrics.items():
            for key, value in values.items():
                row[key if loader == "_epoch_" else f"{loader}/{key}"] = float(value)
        state.history.append(row)
        if runner.engine.is_main_process:
            write_csv(self.path, state.history)


def write_csv(path: Path, rows: List[Dict[str, object]]) -> None:
    """Write dict rows (columns = union of keys, first-seen order) to CSV atomically."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())


__all__ = ["HistoryCallback", "write_csv"]
