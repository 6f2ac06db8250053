"""Files that must survive a crash, and checkpoints that are data, not code.

Every file cvkit writes that a later step reads (checkpoints, ``metrics.json``,
``config.json``) goes through a temporary file in the same folder and an atomic rename, so a
kill leaves either the old file or the new one, never a truncated one. Checkpoints are read
with ``torch.load(weights_only=True)`` or safetensors: a file that would run code is refused.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Mapping, Union

import torch

PathLike = Union[str, os.PathLike]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, cut off, tampered with, or not what was expected."""


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic: a killed process leaves the old file or the new one, never a part.
    (No fsync: it would cost ~0.3 s per 100 MB checkpoint and only matters on power loss, where
    ext4/xfs already flush data written before a rename-over.)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected bytes for {path}, got {type(data).__name__}")
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


def save_checkpoint(path: PathLike, payload: Mapping[str, Any]) -> None:
    """Save a checkpoint (tensors, numbers, strings, lists, dicts only) atomically."""
    atomic_write(path, lambda f: torch.save(dict(payload), f))


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint saved by cvkit, torch or safetensors without running any code in it.

    Raises :class:`CheckpointError` naming the file for a missing, truncated or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was cut off")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device=str(map_location)))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain "
            f"containers, and loading those could run code ({str(exc).splitlines()[0]}). "
            "Re-save the state_dict alone, or convert it to safetensors."
        ) from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {exc}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def state_dict_of(checkpoint: Mapping[str, Any], path: PathLike = "<memory>") -> Dict[str, torch.Tensor]:
    """The model weights inside a checkpoint: cvkit's ``{"model": ...}``, common wrappers, or a bare state_dict."""
    for key in ("model", "model_state_dict", "state_dict"):
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors (keys: {list(checkpoint)[:10]})")
    return tensors
