"""bench/RESULTS.md: each bench owns one ``## `` section and rewrites only that one.

A section's hand-written ``### Reading`` part (what the numbers mean) is carried over when the
bench rewrites its table, so re-check it against the new numbers after a rerun.
"""
from __future__ import annotations

from pathlib import Path

from cvkit.io import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NOTES = "### Reading"


def replace_section(heading: str, section: str, path: Path = RESULTS) -> None:
    """Replace the section that starts with the line ``heading`` (or append it), atomically.

    The old section's ``### Reading`` part is appended to ``section`` unless ``section`` has its own.
    """
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = text.find(f"{heading}\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        old = text[start: end if end != -1 else len(text)]
        if NOTES in old and NOTES not in section:
            section = section.rstrip("\n") + "\n\n" + old[old.find(NOTES):]
        text = text[:start] + section.rstrip("\n") + ("\n\n" + text[end + 1:] if end != -1 else "")
    atomic_write_bytes(path, text.rstrip("\n").encode() + b"\n")
