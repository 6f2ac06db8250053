"""One run per folder: a lock file holding the owner's pid and host.

Two runs writing one logdir would overwrite each other's checkpoints and logs without a word.
:class:`RunLock` creates ``<logdir>/.cvkit.lock`` exclusively; a second run refuses with one line
naming the owner. The file appears whole (written aside, then linked into place), so a reader never
takes a lock being written for a stale one. A lock left by a process that no longer exists on this
host is taken over with a warning (a crash or SIGKILL cannot remove it).

The lock is re-entrant in the thread that holds it: ``cvkit train`` holds the folder from its first
write to its last and :meth:`cvkit.runners.StagedRunner.fit` takes it again inside; the file goes when
the outermost hold ends. A folder the lock itself created is removed again if nothing was written into it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Dict, Optional, Tuple, Type, Union

from cvkit.io import create_whole

LOCK_NAME = ".cvkit.lock"
_HELD: Dict[Tuple[int, int, Path], int] = {}  # (pid, thread, lock file) -> holds taken by that thread


class RunLockedError(ValueError):
    """Another live process is writing this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(logdir):`` — hold the run folder (re-entrant in this thread); see the module doc."""

    def __init__(self, logdir: Union[str, os.PathLike]) -> None:
        self.path = Path(logdir) / LOCK_NAME
        self.held = False
        self._created = False
        self._key: Tuple[int, int, Path] = (0, 0, self.path)

    def acquire(self) -> None:
        """Take the lock (again, when this thread holds it already), or raise :class:`RunLockedError`
        naming the live owner."""
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = key = (os.getpid(), threading.get_ident(), self.path.resolve())
        if key in _HELD:
            _HELD[key] += 1
            self.held = True
            return
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                create_whole(self.path, json.dumps(me).encode())
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # released since: try again
                    continue
                if not owner or (owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1)))):
                    warnings.warn(f"{self.path}: taking over a stale lock of a process that no longer runs ({owner})",
                                  stacklevel=3)
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(f"{self.path.parent} is being written by another run (pid {owner.get('pid')} on "
                                     f"{owner.get('host')}); wait for it, stop it, or use another logdir") from None
            _HELD[key] = 1
            self.held = True
            return
        raise RunLockedError(f"{self.path}: could not take the lock")

    def _owner(self) -> Optional[dict]:
        """The lock's ``{"pid", "host"}``; None when the file is gone, ``{}`` when it is not a lock's."""
        try:
            owner = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def release(self) -> None:
        """Give this hold back; the outermost one removes the file (only the holder does)."""
        if not self.held:
            return
        self.held = False
        key = self._key
        _HELD[key] -= 1
        if _HELD[key]:
            return
        del _HELD[key]
        self.path.unlink(missing_ok=True)
        if self._created:
            try:
                self.path.parent.rmdir()
            except OSError:  # something was written into it: the run's folder stays
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 trace: Optional[TracebackType]) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]
