"""What a user sees while long work runs: a ``[cvkit] ...`` line before each step that takes seconds,
its duration after, and whether progress bars suit the stream.

Torch-free, so the ``cvkit`` command can speak before it loads torch. The lines go to stdout, beside
the epoch table and the other ``[cvkit]`` lines; stderr stays for errors, one line each.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


def say(message: str) -> None:
    """Print ``[cvkit] message`` on stdout at once (flushed: the step it announces may take a while)."""
    print(f"[cvkit] {message}", flush=True)


@contextmanager
def announce(doing: str, done: str) -> Iterator[None]:
    """Say ``doing`` before the block and ``done in N s`` after it (nothing after when it raises)."""
    say(doing)
    started = time.perf_counter()
    yield
    say(f"{done} in {time.perf_counter() - started:.1f} s")


def progress_bars_wanted(stream: TextIO = sys.stderr) -> bool:
    """Progress bars only when ``stream`` is a terminal."""
    return bool(getattr(stream, "isatty", lambda: False)())


__all__ = ["announce", "progress_bars_wanted", "say"]
