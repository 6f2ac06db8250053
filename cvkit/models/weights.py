"""The one way to load another run's weights into a model: a checkpoint file or a run folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from torch import nn

from cvkit.io import CheckpointError, load_checkpoint, state_dict_of


def load_weights(model: nn.Module, weights: Union[str, os.PathLike]) -> Path:
    """Load a cvkit checkpoint, a plain state_dict or a safetensors file (or a run folder's ``best.pth``).

    Raises :class:`~cvkit.io.CheckpointError` naming the file when it is missing, unreadable or does
    not fit ``model`` (another architecture, other sizes). Returns the file that was read.
    """
    path = Path(weights)
    if path.is_dir():
        path = path / "best.pth"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; expected a checkpoint file or a run folder with best.pth")
    state = state_dict_of(load_checkpoint(path), path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit model {type(model).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    return path


__all__ = ["load_weights"]
