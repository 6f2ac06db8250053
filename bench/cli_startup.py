"""How fast `cvkit` starts: wall time and peak resident memory of `cvkit --help` and the data
commands (`split`, `check` of 200 JPEGs), each in a fresh process, against `import torch` and
`import cvkit.runners`.

    python bench/cli_startup.py --repeats 5 --write     # table into bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADING = "## Command start-up"


def measure(args: list, cwd: Path, repeats: int) -> tuple:
    """Median wall seconds and max peak RSS (MiB) of ``python args`` over ``repeats`` fresh processes.

    Each process's own peak comes from ``wait4`` (``RUSAGE_CHILDREN`` would keep the largest
    of all earlier children, so a light command measured after a heavy one would inherit its peak).
    """
    times, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)
        times.append(time.perf_counter() - start)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"{' '.join(args)} failed ({child.returncode}): {stderr.decode()[-2000:]}")
        peaks.append(usage.ru_maxrss / 1024)
    return statistics.median(times), max(peaks)


def write_images(folder: Path, count: int) -> None:
    """``0.jpg`` .. ``count-1.jpg``: small random 64x48 JPEGs, the images ``t.csv`` lists.

    Written by a child process: a child's peak RSS counts the parent's memory at fork, so this
    process must not load OpenCV itself.
    """
    code = ("import cv2, numpy as np, sys\nrng = np.random.default_rng(0)\n"
            "for i in range(int(sys.argv[1])):\n"
            "    cv2.imwrite(f'{i}.jpg', rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))\n")
    subprocess.run([sys.executable, "-c", code, str(count)], cwd=folder, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "t.csv").write_text("path,label\n" + "".join(f"{i}.jpg,{'ab'[i % 2]}\n" for i in range(200)))
        write_images(folder, 200)
        cases = [
            ("cvkit --help", ["-m", "cvkit", "--help"]),
            ("cvkit split t.csv", ["-m", "cvkit", "split", "t.csv", "--out-dir", "out"]),
            ("cvkit split t.csv --folds 5", ["-m", "cvkit", "split", "t.csv", "--folds", "5", "--out-dir", "out"]),
            ("cvkit check t.csv (200 JPEGs)", ["-m", "cvkit", "check", "t.csv"]),
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
