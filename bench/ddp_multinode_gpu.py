"""Two-"node" DDP check on one GPU machine over NCCL: the GPU twin of tests/test_ddp_multinode.py.

The machine's GPUs are split in two halves; each half is one "node": a separate launch of
tests/ddp_multinode_script.py that sees only its GPUs (``CUDA_VISIBLE_DEVICES``) and spawns one
worker per GPU, NCCL over 127.0.0.1. The staged run (head, then all) is compared with one process
on one GPU at the same global batch (TF32 off); then node 1 is killed mid-epoch and node 0 must stop
within 60 s with one line naming the lost ranks.

    python bench/ddp_multinode_gpu.py [--results bench/RESULTS.md]

Needs 2, 4, 8 or 16 CUDA GPUs; without them it refuses in one line (exit 2).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "ddp_multinode_script.py"
LIMIT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(gpus: List[int]) -> Dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SCRIPT.parent), str(ROOT)]), PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))


@contextlib.contextmanager
def two_nodes(base: Path, gpus: int, *extra: str) -> Iterator[List[subprocess.Popen]]:
    """Both launches, each on its half of the GPUs, in their own process groups; killed at exit."""
    port, half, procs = free_port(), gpus // 2, []
    try:
        for node in (0, 1):
            cmd = [sys.executable, str(SCRIPT), str(base / "run"), str(base / "probe"), "--gpu", "--world", str(gpus),
                   "--node", str(node), "--port", str(port), "--scratch", str(base / f"scratch{node}"), *extra]
            with open(base / f"err{node}.txt", "w") as err:
                env = dict(env_for(list(range(node * half, (node + 1) * half))), CVKIT_AUDIT_RUN=str(base / "run"),
                           CVKIT_AUDIT_LOG=str(base / f"audit{node}.txt"))
                procs.append(subprocess.Popen(cmd, env=env,
                                              stdout=subprocess.DEVNULL, stderr=err, start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def max_diff(a: Path, b: Path) -> float:
    from cvkit.io import load_checkpoint

    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].numel())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, help="append a markdown section with the figures to this file")
    args = p.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if gpus not in (2, 4, 8, 16):
        sys.stderr.write(f"ddp_multinode_gpu.py: needs 2, 4, 8 or 16 CUDA GPUs (one per worker, two nodes of "
                         f"half each); {gpus} visible\n")
        sys.exit(2)
    sys.path[:0] = [str(ROOT)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        start = time.monotonic()
        single = subprocess.run([sys.executable, str(SCRIPT), str(base / "single" / "run"), str(base / "single" / "probe"),
                                 "--single", "--gpu"], env=env_for([0]), capture_output=True, text=True, timeout=LIMIT)
        assert single.returncode == 0, single.stderr[-3000:]
        rows.append(("one process, one GPU", f"{time.monotonic() - start:.1f} s"))
        (base / "ddp").mkdir()
        start = time.monotonic()
        with two_nodes(base / "ddp", gpus) as procs:
            for node, proc in enumerate(procs):
                rc = proc.wait(timeout=LIMIT)
                assert rc == 0, f"node {node}: exit {rc}: {(base / 'ddp' / f'err{node}.txt').read_text()[-3000:]}"
        rows.append((f"2 nodes x {gpus // 2} GPUs (NCCL), staged run", f"{time.monotonic() - start:.1f} s"))
        for stage in ("head", "all"):
            diff = max_diff(base / "ddp" / "probe" / f"weights_{stage}_r0.pth",
                            base / "single" / "probe" / f"weights_{stage}_r0.pth")
            rows.append((f"stage {stage}: max |w_ddp - w_single|", f"{diff:.3g}"))
        audit = base / "ddp" / "audit1.txt"
        writes = len(audit.read_text().splitlines()) if audit.exists() else 0
        rows.append(("writes of node 1's processes into the run folder", str(writes)))
        (base / "kill").mkdir()
        with two_nodes(base / "kill", gpus, "--hold", f"head:1:{gpus // 2}") as procs:
            held = base / "kill" / "probe" / f"held_r{gpus // 2}"
            deadline = time.monotonic() + LIMIT
            while not held.exists() and time.monotonic() < deadline and procs[0].poll() is None:
                time.sleep(0.2)
            time.sleep(1.0)
            os.killpg(procs[1].pid, signal.SIGKILL)
            start = time.monotonic()
            rc = procs[0].wait(timeout=120)
            took = time.monotonic() - start
        line = (base / "kill" / "err0.txt").read_text().strip()
        rows.append(("node 1 killed: node 0 stopped after", f"{took:.1f} s, exit {rc}"))
        rows.append(("node 0's message", line.replace("|", "/")))
    table = "\n".join(["| check | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])
    print(table)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## Two-node DDP over NCCL ({torch.cuda.get_device_name(0)} x {gpus})\n\n{table}\n")


if __name__ == "__main__":
    main()
