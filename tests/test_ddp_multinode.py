"""Two "nodes" on 127.0.0.1 (two separate launches, 2 gloo workers each, world size 4) train a
staged run through StagedRunner: equal to one process with the same global batch, only global
rank 0 writes the run folder, a whole-job kill resumes to the same result, and a killed node ends
the other one within a bound with one line naming the lost ranks."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import torch

from cvkit.distributed import DDPEngine, ddp_engine, engine_from_env, node_logdir
from cvkit.io import load_checkpoint

SCRIPT = Path(__file__).with_name("ddp_multinode_script.py")
BENCH = Path(__file__).resolve().parent.parent / "bench" / "ddp_multinode_gpu.py"
LIMIT = 300  # seconds any launch may run (a busy 2-core machine imports the stack in ~15 s per process)
PEER_BOUND = 60.0  # seconds the surviving node may take to stop once the other is killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(run: Path, audit: Optional[Path]) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SCRIPT.parent), str(SCRIPT.parent.parent)]),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "SLURM_NODEID"):
        env.pop(key, None)
    if audit is not None:
        env.update(CVKIT_AUDIT_RUN=str(run), CVKIT_AUDIT_LOG=str(audit))
    return env


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@contextlib.contextmanager
def launches(base: Path, *extra: str, port: Optional[int] = None) -> Iterator[List[subprocess.Popen]]:
    """Both nodes' launches (each its own process group, output in ``base``); killed and checked gone at exit."""
    port = port or free_port()
    run, probe, procs = base / "run", base / "probe", []
    try:
        for node in (0, 1):
            cmd = [sys.executable, str(SCRIPT), str(run), str(probe), "--node", str(node), "--port", str(port),
                   "--scratch", str(base / f"scratch{node}"), *extra]
            with open(base / f"out{node}.txt", "a") as out, open(base / f"err{node}.txt", "w") as err:
                procs.append(subprocess.Popen(cmd, env=_env(run, base / f"audit{node}.txt"), stdout=out, stderr=err,
                                              start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while not all(_gone(p.pid) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(_gone(p.pid) for p in procs), "processes of a launch outlived it"


def wait_all(procs: List[subprocess.Popen], base: Path) -> None:
    deadline = time.monotonic() + LIMIT
    for node, proc in enumerate(procs):
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        assert rc == 0, f"node {node}: exit {rc}: {(base / f'err{node}.txt').read_text()[-3000:]}"


def wait_for(path: Path, procs: List[subprocess.Popen], base: Path) -> None:
    deadline = time.monotonic() + LIMIT
    while not path.exists():
        for node, proc in enumerate(procs):
            assert proc.poll() is None, f"node {node} ended early: {(base / f'err{node}.txt').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


def weights(probe: Path, stage: str, rank: int) -> Dict[str, torch.Tensor]:
    return load_checkpoint(probe / f"weights_{stage}_r{rank}.pth")["model"]


def max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def history(probe: Path, node: int) -> List[Dict[str, object]]:
    return json.loads((probe / f"parent_n{node}.json").read_text())


def numbers(rows: List[Dict[str, object]]) -> Dict[str, float]:
    return {f"{row['epoch']}/{key}": float(value) for row in rows for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and "time" not in key and not key.endswith("/std")}  # std: spread over batches, per rank under DDP


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(base / "run"), str(base / "probe"), "--single"],
                          env=_env(base / "run", None), capture_output=True, text=True, timeout=LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "probe"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("two_nodes")
    with launches(base) as procs:
        wait_all(procs, base)
    return base


@pytest.mark.slow
def test_two_nodes_equal_one_process_and_only_rank0_writes_the_run_folder(single, two_nodes):
    probe, run = two_nodes / "probe", two_nodes / "run"
    for stage in ("head", "all"):
        w0 = weights(probe, stage, 0)
        for rank in (1, 2, 3):
            assert max_diff(w0, weights(probe, stage, rank)) == 0.0, f"rank {rank} diverged from rank 0 ({stage})"
        diff = max_diff(w0, weights(single, stage, 0))
        print(f"stage {stage}: max |w_ddp - w_single| = {diff:.3g}")
        assert diff < 1e-5, f"stage {stage}: 2x2 DDP weights differ from one process by {diff}"
    ddp, one = numbers(history(probe, 0)), numbers(history(single, 0))
    assert [r["epoch"] for r in history(probe, 0)] == [1, 2, 3] and ddp.keys() == one.keys()
    metric_diff = max(abs(ddp[k] - one[k]) for k in ddp)
    print(f"max |metric_ddp - metric_single| = {metric_diff:.3g} over {len(ddp)} values")
    assert metric_diff < 1e-4, {k: (ddp[k], one[k]) for k in ddp if abs(ddp[k] - one[k]) >= 1e-4}
    assert history(probe, 1) == history(probe, 0), "node 1's launch lost rank 0's history"
    # Node 0 (positive control: the audit sees writes) wrote the run; node 1's processes nothing in it.
    written = (two_nodes / "audit0.txt").read_text()
    assert str(run / "checkpoints" / "resume.pth") in written and str(run / "metrics.json") in written
    audit1 = two_nodes / "audit1.txt"
    assert not audit1.exists(), f"node 1 wrote into the run folder:\n{audit1.read_text()[:2000]}"
    assert (run / "best.pth").is_file() and (run / "metrics.json").is_file()
    assert (two_nodes / "scratch1" / "checkpoints").resolve() == (run / "checkpoints").resolve()


def kill_node(procs: List[subprocess.Popen], base: Path, killed: int) -> str:
    """SIGKILL node ``killed`` (its launch and workers, parked at a collective); the other node must
    stop within ``PEER_BOUND`` with exit 3 and one stderr line naming the lost ranks, which is returned."""
    survivor = 1 - killed
    time.sleep(1.0)  # the other ranks reach their next collective and wait there
    os.killpg(procs[killed].pid, signal.SIGKILL)
    start = time.monotonic()
    rc = procs[survivor].wait(timeout=PEER_BOUND + 30)
    took = time.monotonic() - start
    print(f"node {survivor} stopped {took:.1f} s after node {killed} was killed")
    err = (base / f"err{survivor}.txt").read_text()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 3 and took < PEER_BOUND, (rc, took, err[-2000:])
    lost = "0-1" if killed == 0 else "2-3"
    assert len(lines) == 1 and f"lost contact with rank(s) {lost} on other node(s)" in lines[0], err[-2000:]
    assert lines[0].startswith(f"node {survivor}: distributed run:") and "127.0.0.1" in lines[0]
    return lines[0]


@pytest.mark.slow
def test_master_node_killed_mid_epoch_then_whole_job_resumed_ends_where_the_uninterrupted_run_ends(two_nodes, tmp_path):
    # Rank 0 parks at the first batch of global epoch 3 (the second of stage "all"), the other ranks
    # wait for it in their next collective; node 0 (the master, and the rendezvous store) is killed.
    with launches(tmp_path, "--hold", "all:3:0") as procs:
        wait_for(tmp_path / "probe" / "held_r0", procs, tmp_path)
        kill_node(procs, tmp_path, killed=0)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "resume.pth")
    assert (state["stage"], int(state["epoch"])) == ("all", 2), "the kill did not land after the first stage"
    with launches(tmp_path, "--resume") as procs:
        wait_all(procs, tmp_path)
    probe, uninterrupted = tmp_path / "probe", two_nodes / "probe"
    diff = max_diff(weights(probe, "all", 0), weights(uninterrupted, "all", 0))
    print(f"resumed vs uninterrupted: max weight difference {diff:.3g}")
    assert diff < 1e-6
    assert max_diff(weights(probe, "all", 2), weights(probe, "all", 0)) == 0.0
    resumed, full = numbers(history(probe, 0)), numbers(history(uninterrupted, 0))
    assert resumed.keys() == full.keys() and max(abs(resumed[k] - full[k]) for k in full) < 1e-6
    assert history(probe, 1) == history(probe, 0)
    assert not (tmp_path / "audit1.txt").exists(), "node 1 wrote into the run folder"


def layout(engine: DDPEngine) -> tuple:
    return (engine._address, int(engine._port), engine._world_size, engine._workers_global_rank,
            engine._num_local_workers, engine._process_group_kwargs["backend"],
            engine._process_group_kwargs["timeout"].total_seconds())


def test_engine_from_slurm_torchrun_and_plain_environments():
    slurm = {"SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_STEP_NODELIST": "gpu[03-04,09]", "MASTER_PORT": "29600"}
    assert layout(engine_from_env(slurm, workers=4, cpu=True, timeout=30)) == ("gpu03", 29600, 8, 4, 4, "gloo", 30)
    assert engine_from_env(dict(slurm, MASTER_ADDR="10.0.0.1"), workers=2, cpu=True)._address == "10.0.0.1"
    torchrun = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "WORLD_SIZE": "3", "RANK": "2", "GROUP_RANK": "2",
                "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    engine = engine_from_env(torchrun, workers=2, cpu=True)
    assert layout(engine) == ("10.0.0.1", 1234, 6, 4, 2, "gloo", 300) and not engine.is_master_node
    assert list(engine.node_ranks) == [4, 5]
    assert layout(engine_from_env({}, workers=2, cpu=True))[:5] == ("127.0.0.1", 29500, 2, 0, 2)
    # Catalyst's own engine lets MASTER_ADDR/MASTER_PORT override its arguments; ours keeps them.
    os.environ["MASTER_ADDR"] = "10.9.9.9"
    try:
        assert ddp_engine(address="127.0.0.1", port=5, workers=1, cpu=True)._address == "127.0.0.1"
    finally:
        del os.environ["MASTER_ADDR"]
    for env, message in [(dict(slurm, SLURM_NTASKS_PER_NODE="8"), "--ntasks-per-node=1"),
                         (dict(torchrun, LOCAL_WORLD_SIZE="8"), "--nproc-per-node=1"),
                         ({"WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "none of GROUP_RANK"),
                         ({"WORLD_SIZE": "2", "RANK": "1"}, "MASTER_ADDR is not"),
                         (dict(torchrun, GROUP_RANK="3"), "node_rank 3 must lie in 0..2"),
                         (dict(torchrun, MASTER_PORT="http"), "MASTER_PORT='http' is not an integer")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
            engine_from_env(env, workers=1, cpu=True)


def test_node_logdir_links_checkpoints_on_other_nodes_only(tmp_path):
    master = ddp_engine(nodes=2, node_rank=0, workers=1, cpu=True)
    other = ddp_engine(nodes=2, node_rank=1, workers=1, cpu=True)
    run = tmp_path / "run"
    assert node_logdir(run, master, tmp_path / "s0") == run and not (tmp_path / "s0").exists()
    view = node_logdir(run, other, tmp_path / "s1")
    assert view == tmp_path / "s1" and (view / "checkpoints").resolve() == (run / "checkpoints").resolve()
    assert node_logdir(run, other, tmp_path / "s1") == view  # a relaunch reuses the link
    with pytest.raises(ValueError, match="is not a link to"):
        node_logdir(tmp_path / "elsewhere", other, tmp_path / "s1")
    assert node_logdir(view, other) == view  # what fit() is handed back from a launch that chose its folder


def test_fit_trains_other_nodes_in_a_node_local_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    other = ddp_engine(nodes=2, node_rank=1, workers=1, cpu=True)
    view = node_logdir(tmp_path / "run", other)
    assert view.parent == tmp_path / "tmp" / "cvkit-nodes" and view.name.startswith("run-")
    assert (view / "checkpoints").resolve() == (tmp_path / "run" / "checkpoints").resolve()
    assert node_logdir(tmp_path / "run", other) == view  # the same folder on a relaunch


def test_gpu_bench_refuses_in_one_line_without_gpus():
    proc = subprocess.run([sys.executable, str(BENCH)], env=dict(_env(BENCH, None), CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "needs 2, 4, 8 or 16 CUDA GPUs" in lines[0], proc.stderr


def test_a_worker_failure_is_one_line_only_when_a_peer_is_lost(monkeypatch):
    import torch.multiprocessing as mp

    engine = ddp_engine(address="127.0.0.1", port=4711, nodes=2, node_rank=1, workers=2, cpu=True)

    def failing(line):
        def start_processes(*args, **kwargs):
            raise mp.ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\nTraceback "
                                            f"(most recent call last):\n  File \"x.py\", line 1\n{line}\n", 1, 99)
        return start_processes

    monkeypatch.setattr(mp, "start_processes", failing(
        "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
        "[127.0.0.1]:5555. This is typically caused by a remote worker crashing. GLHF!"))
    with pytest.raises(Exception) as info:
        engine.spawn(print)
    assert type(info.value).__name__ == "PeerLostError" and isinstance(info.value, OSError)
    assert str(info.value) == ("distributed run: lost contact with rank(s) 0-1 on other node(s) (master "
                               "127.0.0.1:4711, world size 4); this node's ranks 2-3 stopped. RuntimeError: "
                               "[pair.cc:534] Connection closed by peer [127.0.0.1]:5555")
    monkeypatch.setattr(mp, "start_processes", failing("ValueError: stage 'all': socket timeout is not a number"))
    with pytest.raises(mp.ProcessRaisedException):  # the worker's own error is not a lost peer
        engine.spawn(print)
