"""Speed switches users expect on a GPU, and a step profiler; each one recorded in config.json.

- mixed precision: ``engine="amp"`` (Catalyst's GPUEngine with fp16 autocast and grad scaling);
- ``channels_last``: model and input batches in NHWC, faster convolutions on tensor cores;
- ``compile``: ``nn.Module.compile()`` in place, so parameter names (and checkpoints) stay the same;
- ``cudnn_benchmark``: let cuDNN pick the fastest kernels for fixed input sizes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch
from catalyst.core.callback import Callback, CallbackOrder
from torch import nn

from cvkit.io import atomic_write_bytes

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


@dataclass
class FastPaths:
    """Which speed switches a run uses (all off by default: they only pay off on a GPU)."""

    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def apply(self, model: nn.Module) -> nn.Module:
        """Switch the model (in place) and the backend; returns the same model object."""
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile()
        return model

    def callbacks(self, input_key: str = "features") -> Dict[str, Callback]:
        """Callbacks the runner adds for these switches (inputs converted to channels_last)."""
        return {"channels_last": ChannelsLastCallback(input_key)} if self.channels_last else {}


class ChannelsLastCallback(Callback):
    """Convert each 4-d input batch to channels_last memory format before the forward pass."""

    def __init__(self, input_key: str = "features") -> None:
        super().__init__(order=CallbackOrder.Internal + 3)
        self.input_key = input_key

    def on_batch_start(self, runner: "IRunner") -> None:
        x = runner.batch.get(self.input_key) if isinstance(runner.batch, dict) else None
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            runner.batch[self.input_key] = x.contiguous(memory_format=torch.channels_last)


class ProfileCallback(Callback):
    """Profile a few train batches of the first epoch with torch.profiler.

    Writes ``profile.txt`` (operators by total time) and ``profile_trace.json`` (open it in
    chrome://tracing or Perfetto) into ``logdir``: where a step's time goes.
    """

    def __init__(self, logdir: Path, skip: int = 2, batches: int = 10) -> None:
        super().__init__(order=CallbackOrder.Internal + 4)
        self.logdir, self.skip, self.batches = Path(logdir), skip, batches
        self.profiler: Optional[torch.profiler.profile] = None
        self.seen = 0
        self.done = False

    def on_batch_start(self, runner: "IRunner") -> None:
        if self.done or not runner.is_train_loader:
            return
        self.seen += 1
        if self.seen == self.skip + 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self.profiler.__enter__()

    def on_batch_end(self, runner: "IRunner") -> None:
        if self.profiler is not None and self.seen >= self.skip + self.batches:
            self._finish()

    def on_loader_end(self, runner: "IRunner") -> None:
        if self.profiler is not None:
            self._finish()

    def _finish(self) -> None:
        profiler, self.profiler, self.done = self.profiler, None, True
        profiler.__exit__(None, None, None)
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=30)
        atomic_write_bytes(self.logdir / "profile.txt", (table + "\n").encode())
        profiler.export_chrome_trace(str(self.logdir / "profile_trace.json"))
