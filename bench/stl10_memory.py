"""STL-10 reader memory: reading a real-size ``unlabeled_X.bin`` must not load it.

Writes a synthetic file of the real size (100,000 images of 96x96x3 uint8, 2.76 GB, the STL-10
layout: each image channel by channel, each channel column-major) into a temporary folder, then in
a fresh process per row opens ``STL10Dataset(root, "unlabeled")`` and reads random items through a
DataLoader, recording resident memory: after the imports, after opening, at the end (anonymous
and file-backed parts, from /proc/self/status) and the peak (``getrusage``, workers included).
cvkit reads each image with ``os.pread`` (:class:`cvkit.data.stl10.ImageFile`); a reference row per
worker count reads the same items through a read-only memory map (``read_images``, the reader before).
The file is deleted at the end; the run refuses to start with less than 6 GB free.

    python bench/stl10_memory.py --write
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

HEADING = "## STL-10 reader memory"
MIN_FREE = 6 * 1024**3
PROBE = r"""
import json, os, resource, sys
import numpy as np, torch
from torch.utils.data import DataLoader, Subset
from cvkit.data.datasets import STL10Dataset

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields

root, reads, batch, workers, reader = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
imported = status()
dataset = STL10Dataset(root, "unlabeled")
if reader == "mmap":
    from cvkit.data.stl10 import read_images
    dataset.images = read_images(os.path.join(root, "stl10_binary", "unlabeled_X.bin"))
opened = status()
index = np.random.default_rng(0).choice(len(dataset), reads, replace=False)
seen, checksum = 0, 0.0
for batch_ in DataLoader(Subset(dataset, index.tolist()), batch_size=batch, num_workers=workers):
    assert batch_["features"].shape[1:] == (3, 96, 96), batch_["features"].shape
    seen += len(batch_["index"])
    checksum += float(batch_["features"].mean())
end = status()
peak = {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
print("RESULT " + json.dumps({"images": len(dataset), "seen": seen, "imported": imported, "opened": opened,
                              "end": end, "peak": peak, "checksum": checksum}))
"""


def write_unlabeled(folder: Path, images: int, chunk: int = 5000, seed: int = 0) -> Path:
    """A random ``unlabeled_X.bin`` of ``images`` images in the STL-10 layout, written chunk by chunk
    (never the whole file in memory); checks two images read back through cvkit's reader."""
    from cvkit.data.stl10 import read_images

    path = folder / "stl10_binary" / "unlabeled_X.bin"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    first = last = None
    with open(path, "wb") as f:
        for start in range(0, images, chunk):
            block = rng.integers(0, 256, (min(chunk, images - start), 96, 96, 3), dtype=np.uint8)
            f.write(np.ascontiguousarray(block.transpose(0, 3, 2, 1)).tobytes())  # as stl10.write_images
            first = block[0] if first is None else first
            last = block[-1]
    mapped = read_images(path)
    if len(mapped) != images or not (np.array_equal(mapped[0], first) and np.array_equal(mapped[-1], last)):
        raise RuntimeError(f"{path}: the reader does not give back the images written")
    return path


def measure(root: Path, reads: int, batch: int, workers: int, reader: str = "cvkit") -> Dict[str, object]:
    """The probe's memory figures for one fresh process reading ``reads`` random items with cvkit's
    reader (``cvkit``) or, as a reference, the same dataset reading through a memory map."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(root), str(reads), str(batch), str(workers), reader],
                          capture_output=True, text=True, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"probe with {workers} workers failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    result = json.loads(line[len("RESULT "):])
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000, help="images in the synthetic file (STL-10: 100,000)")
    p.add_argument("--reads", type=int, default=2000, help="random items read per process")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers, one process each")
    p.add_argument("--write", action="store_true", help="replace this bench's section of bench/RESULTS.md")
    args = p.parse_args()
    folder = Path(tempfile.gettempdir())
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE:
        sys.exit(f"stl10_memory.py: {folder} has {free / 1024**3:.1f} GB free; the 2.8 GB test file needs at least 6 GB")
    rows = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        start = time.perf_counter()
        path = write_unlabeled(Path(tmp), args.images)
        size, written = path.stat().st_size, time.perf_counter() - start
        print(f"wrote {path} ({size / 1e9:.2f} GB) in {written:.0f} s", flush=True)
        for reader in ("cvkit", "mmap"):
            for workers in args.workers:
                result = measure(Path(tmp), args.reads, args.batch, workers, reader)
                rows.append((reader, workers, result))
                print(json.dumps({"reader": reader, "workers": workers, **result}), flush=True)
        if len({round(r["checksum"], 6) for _, _, r in rows}) != 1:
            raise RuntimeError("the readers gave different images (checksums differ)")
    table = render(rows, size)
    print(table)
    if args.write:
        write_section(args, table, size)


def render(rows: Sequence, size: int) -> str:
    lines = ["| reader | DataLoader workers | items read | RSS after imports (MiB) | after opening | at the end: "
             "total (anonymous + file-backed) | growth over imports | peak RSS, process / largest worker | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"cvkit": "cvkit `STL10Dataset` (`os.pread` per image)", "mmap": "reference: same dataset, read-only memory map"}
    for reader, workers, r in rows:
        imported, opened, end, peak = r["imported"], r["opened"], r["end"], r["peak"]
        worker_peak = f"{peak['children']:.0f}" if workers else "-"
        lines.append(
            f"| {names[reader]} | {workers} | {r['seen']:,} of {r['images']:,} | {imported['VmRSS']:.0f} "
            f"| {opened['VmRSS']:.0f} | {end['VmRSS']:.0f} ({end['RssAnon']:.0f} + {end['RssFile']:.0f}) "
            f"| {end['VmRSS'] - imported['VmRSS']:+.0f} | {peak['self']:.0f} / {worker_peak} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_section(args: argparse.Namespace, table: str, size: int) -> None:
    import platform

    import torch

    from results import replace_section

    command = f"python bench/stl10_memory.py --reads {args.reads} --workers {' '.join(map(str, args.workers))} --write"
    section = (
        f"{HEADING}\n\nCommand: `{command}` (CPU, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}). A synthetic `unlabeled_X.bin` of {args.images:,} images ({size / 1e9:.2f} GB, "
        f"the real size and layout) in a temporary folder, deleted afterwards; per row a fresh process opens "
        f"`STL10Dataset(root, \"unlabeled\")` and reads {args.reads:,} random items (batch {args.batch}). "
        f"MiB from /proc/self/status and `getrusage` (peak of the largest worker for rows with workers); "
        f"file-backed pages are the touched parts of a memory map, clean page cache the kernel can drop.\n\n"
        f"{table}\n"
    )
    replace_section(HEADING, section)


if __name__ == "__main__":
    main()
