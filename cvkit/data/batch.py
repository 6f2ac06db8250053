"""The one batch convention: a mapping of named tensors (``features``, ``targets``, ``index``...).

Every loop over a loader takes its batch through :func:`as_batch`, so a dataset may also yield
``(images, targets)`` pairs (torchvision style) and every loop reads them the same way.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

INPUT_KEY = "features"
TARGET_KEY = "targets"


def as_batch(batch: Any, input_key: str = INPUT_KEY, target_key: str = TARGET_KEY, need_target: bool = True) -> Dict[str, Any]:
    """``batch`` as a dict: a mapping as it is, an ``(images, targets, ...)`` sequence as
    ``{input_key: images, target_key: targets}``; a ValueError naming the missing key or the wrong type."""
    if isinstance(batch, Mapping):
        out = dict(batch)
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        out = {input_key: batch[0], target_key: batch[1]}
    else:
        raise ValueError(f"a batch must be a dict with {input_key!r}/{target_key!r} or an (images, targets) pair, "
                         f"got {type(batch).__name__}")
    missing = [k for k in (input_key, target_key)[: 2 if need_target else 1] if k not in out]
    if missing:
        raise ValueError(f"a batch lacks {missing}; it has keys {sorted(out)}")
    return out


__all__ = ["INPUT_KEY", "TARGET_KEY", "as_batch"]
