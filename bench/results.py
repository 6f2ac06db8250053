"""bench/RESULTS.md: each bench owns one ``## `` section and rewrites only that one."""
from __future__ import annotations

from pathlib import Path

from cvkit.io import atomic_write_bytes

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(heading: str, section: str, path: Path = RESULTS) -> None:
    """Replace the section that starts with the line ``heading`` (or append it), atomically."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    start = text.find(f"{heading}\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section.rstrip("\n") + ("\n\n" + text[end + 1:] if end != -1 else "")
    atomic_write_bytes(path, text.rstrip("\n").encode() + b"\n")


def kept_notes(heading: str, notes: str = "### Reading", path: Path = RESULTS) -> str:
    """The hand-written ``notes`` part of section ``heading``, to carry over a rerun (re-check it!)."""
    text = path.read_text() if path.is_file() else ""
    start = text.find(f"{heading}\n")
    if start == -1:
        return ""
    end = text.find("\n## ", start + len(heading))
    section = text[start: end if end != -1 else len(text)]
    found = section.find(notes)
    return "" if found == -1 else "\n" + section[found:].rstrip("\n") + "\n"
