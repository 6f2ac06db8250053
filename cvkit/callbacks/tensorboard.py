"""TensorBoard logging for staged runs: every stage's events kept, on one global-epoch timeline."""
from __future__ import annotations

import os

from catalyst.loggers.tensorboard import TensorboardLogger
from tensorboardX import SummaryWriter


class StageTensorboardLogger(TensorboardLogger):
    """Catalyst's TensorBoard logger with a suffix on every event file it opens.

    tensorboardX names an event file by the second it was opened and the host, and opens it for
    writing: a stage that starts within the same second as the previous one (short stages, tiny
    data) would truncate that stage's file. A suffix unique to the stage and process keeps every
    file; TensorBoard merges the files of a folder by step, and steps are global epochs.
    """

    def __init__(self, logdir: str, filename_suffix: str, **kwargs: object) -> None:
        super().__init__(logdir=logdir, **kwargs)
        self.filename_suffix = filename_suffix

    def _check_loader_key(self, loader_key: str) -> None:
        if loader_key not in self.loggers:
            path = os.path.join(self.logdir, loader_key)
            self.loggers[loader_key] = SummaryWriter(path, filename_suffix=self.filename_suffix)


def stage_suffix(stage_index: int) -> str:
    """Event-file suffix for a stage: its index and this process, so neither a later stage nor a
    resumed run in the same second reuses a name."""
    return f".{os.getpid()}.stage{stage_index:03d}"


__all__ = ["StageTensorboardLogger", "stage_suffix"]
