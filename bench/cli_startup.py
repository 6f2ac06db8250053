"""How fast `cvkit` starts: wall time and peak resident memory of `cvkit --help` and the data
commands, each in a fresh process, against `import torch` and `import cvkit.runners`.

    python bench/cli_startup.py --repeats 5 --write     # table into bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADING = "## Command start-up"


def measure(args: list, cwd: Path, repeats: int) -> tuple:
    """Median wall seconds and max peak RSS (MiB) of ``python args`` over ``repeats`` fresh processes."""
    times, peaks = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
        peaks.append(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)
    return statistics.median(times), max(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "t.csv").write_text("path,label\n" + "".join(f"{i}.jpg,{'ab'[i % 2]}\n" for i in range(200)))
        cases = [
            ("cvkit --help", ["-m", "cvkit", "--help"]),
            ("cvkit split t.csv", ["-m", "cvkit", "split", "t.csv", "--out-dir", "out"]),
            ("cvkit split t.csv --folds 5", ["-m", "cvkit", "split", "t.csv", "--folds", "5", "--out-dir", "out"]),
            ("python -c 'import torch'", ["-c", "import torch"]),
            ("python -c 'import catalyst.dl, timm'", ["-c", "import catalyst.dl, timm"]),
            ("python -c 'import cvkit.runners'", ["-c", "import cvkit.runners"]),
        ]
        rows = []
        for name, command in cases:
            seconds, mib = measure(command, folder, args.repeats)
            rows.append(f"| `{name}` | {seconds:.2f} | {mib:.0f} |")
            print(rows[-1])
    table = "\n".join(["| command | wall s (median) | peak RSS MiB |", "|---|---|---|", *rows])
    section = (f"{HEADING}\n\n`python bench/cli_startup.py --repeats {args.repeats} --write` (fresh process each, "
               f"2 CPU cores).\n\n{table}\n")
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import replace_section

        replace_section(HEADING, section)


if __name__ == "__main__":
    main()
