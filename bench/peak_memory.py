"""Peak memory (RSS) and wall time of every example's demo run, each in a fresh process.

    python bench/peak_memory.py --write              # all examples, default (demo) settings
    python bench/peak_memory.py stl10_train --write  # one

The peak is the largest resident set of the example's process or any process it started
(DataLoader workers, DDP ranks), from ``getrusage``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import os, resource, runpy, sys, json
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as `python examples/x.py` does (for _common)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("PEAK_RSS_KB", json.dumps({"self": own, "children": kids}), flush=True)
"""


def measure(example: Path, logdir: Path) -> Dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(example), "--logdir", str(logdir), "--quiet"],
                          capture_output=True, text=True, cwd=logdir.parent)
    seconds = time.perf_counter() - start
    line = next((l for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_KB")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{example.name} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    peaks = json.loads(line.split(" ", 1)[1])
    metric = next((l for l in proc.stdout.splitlines() if l.strip() and not l.startswith("PEAK_RSS_KB")), "")
    return {"peak_mib": max(peaks.values()) / 1024, "seconds": seconds, "last_line": proc.stdout.splitlines()[-2] if len(proc.stdout.splitlines()) > 1 else metric}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("examples", nargs="*", help="example names (default: every examples/*_train.py)")
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = p.parse_args()
    names: List[str] = args.examples or sorted(f.stem for f in (ROOT / "examples").glob("*_train.py"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result = measure(ROOT / "examples" / f"{name}.py", Path(tmp) / name)
            print(f"{name}: {result['peak_mib']:.0f} MiB peak, {result['seconds']:.0f} s: {result['last_line']}", flush=True)
            rows.append((name, result))
    table = "\n".join(
        ["| example (demo data, no arguments) | peak RSS (MiB) | wall time (s) | what it printed |", "|---|---|---|---|"]
        + [f"| {n} | {r['peak_mib']:.0f} | {r['seconds']:.0f} | {r['last_line'].strip()[:110]} |" for n, r in rows]
    )
    print(table)
    if args.write:
        sys.path.insert(0, str(ROOT / "bench"))
        from results import replace_section

        command = "python bench/peak_memory.py --write" + (f" {' '.join(args.examples)}" if args.examples else "")
        replace_section("## Peak memory of the examples",
                        f"## Peak memory of the examples\n\nCommand: `{command}` (CPU, 2 cores; each example in a "
                        f"fresh process with `--quiet`; peak = largest RSS of the process or its children).\n\n{table}\n")


if __name__ == "__main__":
    main()
