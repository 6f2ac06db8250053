"""Files that must survive a crash, and checkpoints that are data, not code.

Every file cvkit writes that a later step reads (checkpoints, ``metrics.json``,
``config.json``) goes through a temporary file in the same folder and an atomic rename, so a
kill leaves either the old file or the new one, never a truncated one. The file gets the mode
``open()`` would give it (``0666 & ~umask``), a full disk is one :class:`DiskFullError`, and the
temporary files of killed writers are recognisable by name, so :func:`clean_stale_temporaries`
can remove them. Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors: a
file that would run code is refused.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import time
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union

from cvkit.errors import CheckpointError

if TYPE_CHECKING:
    import torch


PathLike = Union[str, os.PathLike]

TEMP_SUFFIX = ".cvkit-tmp"
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
# ".<target name>.<host crc32>-<pid>-<random>.cvkit-tmp"; the pid and host say whose it is.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
# mkstemp names written before the pattern above existed: ".<target name>.<8 random chars>.tmp"
_OLD_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing ``filename``; the previous file is unchanged."""

    def __init__(self, path: PathLike, detail: str = "") -> None:
        path = Path(path)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free now"
        except OSError:
            free = "free space unknown"
        detail = f": {detail}" if detail else ""
        super().__init__(errno.ENOSPC, f"no space left on {path} ({free}{detail}); "
                                       f"the previous {path.name}, if any, is unchanged", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def _is_disk_full(exc: BaseException) -> bool:
    """OSError ENOSPC/EDQUOT, or torch's own zip writer running out of room (``unexpected pos``)."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    return isinstance(exc, RuntimeError) and "unexpected pos" in str(exc)


def _open_temporary(path: Path) -> Tuple[int, Path]:
    """Create a new temporary file beside ``path``, mode ``0666 & ~umask`` (the kernel applies the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic: a killed process leaves the old file or the new one, never a part.
    (No fsync: it would cost ~0.3 s per 100 MB checkpoint and only matters on power loss, where
    ext4/xfs already flush data written before a rename-over.) A new file gets ``0666 & ~umask``
    like ``open()``; a replaced file keeps its permission bits. A full disk raises
    :class:`DiskFullError` after removing the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = _open_temporary(path)
    except OSError as exc:
        if _is_disk_full(exc):
            raise DiskFullError(path, " ".join(str(exc).split())[:120]) from exc
        raise
    try:
        try:
            os.fchmod(fd, os.stat(path).st_mode & 0o777)
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _is_disk_full(exc):
            raise DiskFullError(path, " ".join(str(exc).split())[:120]) from exc
        raise


def clean_stale_temporaries(folder: PathLike, max_age: float = 3600.0) -> List[Path]:
    """Remove the temporary files that killed atomic writers left under ``folder`` (recursively).

    A temporary file is stale when its writer (pid in the name) on this host is no longer
    running, or when it has not been written to for ``max_age`` seconds (a writer on another
    host, or a temporary from before cvkit named them). Returns the files removed, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for tmp in folder.rglob(".*"):
        match = _TEMP_NAME.match(tmp.name)
        if not (match or _OLD_TEMP_NAME.match(tmp.name)) or not tmp.is_file():
            continue
        try:
            old = now - tmp.stat().st_mtime > max_age
        except FileNotFoundError:  # its writer just renamed it
            continue
        dead = match is not None and match["host"] == _HOST and not _pid_alive(int(match["pid"]))
        if old or dead:
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return sorted(removed)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def safe_child(folder: PathLike, name: str) -> Path:
    """``folder / name``, refusing a name that would point outside ``folder`` or at ``folder`` itself.

    For names that come from data (class names, image ids) and become file or folder names:
    ``""``, ``"."``, ``".."``, ``"../x"``, ``"/abs/x"`` and a symlink leading out raise ValueError.
    Sub-folders inside (``"a/b"``) are allowed.
    """
    text = str(name)
    if not text.strip() or "\0" in text:
        raise ValueError(f"{name!r} is not a usable name under {folder}; expected a non-empty file or folder name")
    if os.path.isabs(text):
        raise ValueError(f"{name!r} is an absolute path; expected a name inside {folder}")
    normal = os.path.normpath(text)
    if normal == "." or normal == ".." or normal.startswith(".." + os.sep):
        raise ValueError(f"{name!r} leads outside {folder}; expected a name inside it (no '..', not '.')")
    child = Path(folder) / normal
    base = Path(folder).resolve()
    if not child.resolve().is_relative_to(base) or child.resolve() == base:
        raise ValueError(f"{name!r} leads outside {folder} through a symbolic link; expected a name inside it")
    return child


def create_whole(path: PathLike, data: bytes) -> None:
    """Create ``path`` holding ``data``, never replacing it: :class:`FileExistsError` when it exists.

    ``data`` goes to a temporary file beside ``path`` first, which is then hard-linked into place (a
    link, unlike a rename, fails on an existing file), so a reader sees the whole file or none.
    """
    path = Path(path)
    fd, tmp = _open_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


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
    if hasattr(obj, "tolist") and getattr(obj, "ndim", 0):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


def read_mapping(path: PathLike, what: str) -> Dict[str, Any]:
    """A YAML or JSON file whose top level is a mapping; a one-line ValueError naming the file otherwise
    (``what`` says what the file should have been)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found; expected the {what}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML/JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys at the top, got {type(raw).__name__}")
    return raw


def save_checkpoint(path: PathLike, payload: Mapping[str, Any]) -> None:
    """Save a checkpoint (tensors, numbers, strings, lists, dicts only) atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(dict(payload), f))


def load_checkpoint(path: PathLike, map_location: Union[str, "torch.device"] = "cpu") -> Dict[str, Any]:
    """Load a checkpoint saved by cvkit, torch or safetensors without running any code in it.

    ``path`` may be a run folder (its ``best.pth`` is loaded). Raises :class:`CheckpointError`
    with a one-line message naming the file for a missing, empty, truncated, unsafe or foreign file.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "best.pth").is_file():
            raise CheckpointError(f"{path} is a folder without best.pth; expected a checkpoint file "
                                  "or a run folder holding best.pth")
        path = path / "best.pth"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; expected a .pth or .safetensors file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was cut off")
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device=str(map_location)))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {_one_line(exc)}") from exc
    problem = _torch_file_problem(path, head)
    if problem:
        raise CheckpointError(f"{path} {problem}")
    import torch

    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _weights_only_detail(exc)
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain containers, "
                f"and loading those could run code ({detail}); re-save the state_dict alone, or convert it "
                "to safetensors") from exc
        raise CheckpointError(f"{path} is not a torch checkpoint of tensors and plain containers ({detail}); "
                              "expected a file written by torch.save or safetensors") from exc
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted: {_one_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's message, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] if len(lines[0]) <= limit else lines[0][: limit - 3] + "..."


def _weights_only_detail(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what it met (a GLOBAL, an operand)."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")
    return _one_line(exc)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors starts with a little-endian u64 header length, then the JSON header's ``{``."""
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _torch_file_problem(path: Path, head: bytes) -> Optional[str]:
    """Why ``path`` cannot be a torch checkpoint, judged from its bytes, or None when it may be one.

    torch.save writes a zip archive holding ``<name>/data.pkl`` (or, with the legacy format, a
    pickle, which starts with the PROTO opcode ``0x80``).
    """
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "is truncated or corrupted: a zip archive without its end (the write was cut off?)"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return "is a zip archive but not a torch checkpoint (no data.pkl inside); expected a .pth file"
        return None
    if head.startswith(b"\x80"):
        return None
    return (f"is not a checkpoint (it starts with {head[:8]!r}); expected a torch .pth file "
            "(zip archive or pickle) or a .safetensors file")


def state_dict_of(checkpoint: Mapping[str, Any], path: PathLike = "<memory>") -> Dict[str, "torch.Tensor"]:
    """The model weights inside a checkpoint: cvkit's ``{"model": ...}``, common wrappers, or a bare state_dict.

    A cvkit checkpoint holding the EMA beside the raw weights (``model_ema``) gives the ones it kept
    (``weights: "ema"``: the EMA); an older one with ``weights: "ema"`` already holds the EMA under ``model``.
    """
    import torch

    keys = ("model", "model_state_dict", "state_dict")
    if checkpoint.get("weights") == "ema" and isinstance(checkpoint.get("model_ema"), Mapping):
        keys = ("model_ema",)
    for key in keys:
        inner = checkpoint.get(key)
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors (keys: {list(checkpoint)[:10]})")
    return tensors
