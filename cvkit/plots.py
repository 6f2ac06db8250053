"""progress.png (loss, the valid metric and every group's LR over all stages, boundaries marked) and PNG writing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cvkit.io import atomic_write_bytes  # noqa: E402


def _series(history: Sequence[Dict[str, Any]], key: str) -> List[float]:
    return [float(row.get(key, float("nan"))) for row in history]


def plot_progress(history: Sequence[Dict[str, Any]], path: Path, metric: str = "loss") -> None:
    """Write a three-panel figure from ``StagedRunner.history`` rows to ``path`` (PNG)."""
    if not history:
        return
    import io

    epochs = [int(row["epoch"]) for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("loss", "loss"), (metric, metric if metric != "loss" else "accuracy"), ("lr", None)]
    for ax, (title, key) in zip(axes, panels):
        if title == "lr":
            for column in sorted({k for row in history for k in row if k.startswith("lr/")}):
                ax.plot(epochs, _series(history, column), marker=".", label=column[3:])
            ax.set_yscale("log")
        else:
            for loader in sorted({k.split("/")[0] for row in history for k in row if k.endswith(f"/{key}")}):
                ax.plot(epochs, _series(history, f"{loader}/{key}"), marker=".", label=loader)
        ax.set_title(title if title != metric or key == metric else key)
        ax.set_xlabel("epoch")
        _mark_stages(ax, history)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _mark_stages(ax: Any, history: Sequence[Dict[str, Any]]) -> None:
    previous = None
    for row in history:
        if row["stage"] != previous:
            x = int(row["epoch"]) - 0.5
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
            ax.text(x, 1.0, f" {row['stage']}", transform=ax.get_xaxis_transform(), fontsize=8, va="top", color="grey")
            previous = row["stage"]


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (e.g. a mask overlay) as a lossless PNG, atomically."""
    import cv2

    ok, png = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path} as PNG; expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    atomic_write_bytes(Path(path), png.tobytes())
