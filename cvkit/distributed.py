"""Distributed data parallel across processes and machines, on Catalyst's DDP engine.

One launch per machine ("node"); Catalyst's engine spawns that node's worker processes (one per
GPU, or ``workers`` on CPU). :func:`ddp_engine` builds the engine from explicit numbers,
:func:`engine_from_env` from what torchrun or Slurm put in the environment. Three things differ
from ``dl.DistributedDataParallelEngine`` used directly:

- the process group gets a ``timeout``, so a lost peer ends the run instead of hanging it
  (gloo/NCCL default: 30 minutes);
- a worker that fails because a peer vanished ends the launch with :class:`PeerLostError`, one
  line naming the ranks that stopped answering, instead of a multi-process traceback;
- a barrier before the group is torn down after each stage: every node's launch reads the
  ``resume.pth`` rank 0 writes at the stage's end, so none may read it before it is written;
- workers start from a fork server that imported the stack once per launch, not each importing
  it again per stage (``spawn``), which costs seconds per worker and stage.

The explicit ``address``/``port`` win over ``MASTER_ADDR``/``MASTER_PORT`` (Catalyst's engine lets
the environment override its arguments silently). Only global rank 0 writes run files; the other
nodes' launches read the run folder's checkpoints, see :func:`node_logdir`.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from catalyst import dl

DEFAULT_TIMEOUT = 300.0
DEFAULT_PORT = 29500

# What a collective or the rendezvous raises when the process on the other end is gone or silent:
# the exception's type, then its message.
_PEER_ERROR_TYPE = re.compile(r"(RuntimeError|torch\.distributed\.\w+|Dist\w*Error|\w*Connection\w*Error|"
                              r"BrokenPipeError|TimeoutError)\b")
_PEER_TROUBLE = re.compile(
    r"Connection (closed|reset|refused)|Broken pipe|[Tt]imed out|timeout|DistNetworkError|DistStoreError|"
    r"DistBackendError|NCCL (error|communicator)|ncclRemoteError|ncclSystemError|Socket|recvBytes|sendBytes")


class PeerLostError(ConnectionError):
    """A process of the distributed run stopped answering (killed, crashed, or its machine gone)."""


def _span(ranks: Sequence[int]) -> str:
    """``0-1, 4`` for ranks 0, 1 and 4."""
    parts, ranks = [], sorted(ranks)
    start = prev = ranks[0]
    for rank in ranks[1:] + [None]:
        if rank is not None and rank == prev + 1:
            prev = rank
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if rank is not None:
            start = prev = rank
    return ", ".join(parts)


class DDPEngine(dl.DistributedDataParallelEngine):
    """Catalyst's DDP engine with a process-group timeout, one-line peer loss and a closing barrier.

    Build it with :func:`ddp_engine` or :func:`engine_from_env`.
    """

    def __init__(self, *args: Any, address: str, port: int, world_size: int, workers_dist_rank: int,
                 num_node_workers: int, timeout: float, process_group_kwargs: Dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, address=address, port=port, world_size=world_size,
                         workers_dist_rank=workers_dist_rank, num_node_workers=num_node_workers,
                         process_group_kwargs={**process_group_kwargs,
                                               "timeout": datetime.timedelta(seconds=timeout)}, **kwargs)
        self._address, self._port = address, port

    @property
    def node_ranks(self) -> range:
        """The global ranks this node's workers hold."""
        return range(self._workers_global_rank, self._workers_global_rank + self._num_local_workers)

    @property
    def is_master_node(self) -> bool:
        """Whether global rank 0 (the writer of the run folder) runs on this node."""
        return self._workers_global_rank == 0

    def spawn(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in this node's workers; a peer lost on the way raises :class:`PeerLostError`.

        Workers start from a fork server that imported torch, Catalyst and the runner's module once
        per launch: each stage's workers then start in a fraction of a second instead of each
        importing the stack again (what ``spawn`` does, seconds per worker and stage).
        """
        owner = getattr(fn, "__self__", fn)
        mp.set_forkserver_preload(["torch", "catalyst.dl", type(owner).__module__])
        quiet = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process ..." per sibling
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return mp.start_processes(fn, args=(self._world_size,), nprocs=self._num_local_workers, join=True,
                                      start_method="forkserver")
        except mp.ProcessExitedException as exc:
            rank = self._workers_global_rank + exc.error_index
            how = f"was killed by {exc.signal_name}" if exc.signal_name else f"exited with code {exc.exit_code}"
            raise PeerLostError(f"distributed run: rank {rank} (pid {exc.pid}, on this node) {how}; "
                                f"the node's ranks {_span(list(self.node_ranks))} stopped") from None
        except mp.ProcessRaisedException as exc:
            reason = _last_error_line(str(exc))
            if not (_PEER_ERROR_TYPE.match(reason) and _PEER_TROUBLE.search(reason)):
                raise
            raise PeerLostError(self._lost_message(reason)) from None
        finally:
            quiet.setLevel(level)

    def _lost_message(self, reason: str) -> str:
        others = [r for r in range(self._world_size) if r not in self.node_ranks]
        who = f"rank(s) {_span(others)} on other node(s)" if others else "a rank of this node"
        return (f"distributed run: lost contact with {who} (master {self._address}:{self._port}, world size "
                f"{self._world_size}); this node's ranks {_span(list(self.node_ranks))} stopped. {reason}")

    def cleanup(self) -> None:
        """Wait for every rank (rank 0's end-of-stage checkpoint is written by then), then leave the group."""
        dist.barrier()
        super().cleanup()


def _last_error_line(text: str) -> str:
    """The first sentence of a worker traceback's exception line, paths shortened
    (``RuntimeError: [pair.cc:534] Connection closed by peer [127.0.0.1]:4711``)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = re.sub(r"\[[^\]\s]*/([^/\]\s]+:\d+)\]", r"[\1]", lines[-1] if lines else text)
    return re.split(r"\.\s+(?=[A-Z])", line, maxsplit=1)[0]


def ddp_engine(*, address: str = "127.0.0.1", port: int = DEFAULT_PORT, nodes: int = 1, node_rank: int = 0,
               workers: Optional[int] = None, timeout: float = DEFAULT_TIMEOUT, backend: Optional[str] = None,
               cpu: Optional[bool] = None, mixed_precision: str = "no") -> DDPEngine:
    """The DDP engine of node ``node_rank`` of ``nodes``, each running ``workers`` processes.

    Args:
        address, port: where rank 0 (on node 0) listens; every node must reach it. Nothing else
            listens elsewhere than on this node's own address.
        workers: processes on each node (the same on every node); default one per visible GPU, else 1.
        timeout: seconds a collective or the rendezvous waits for a silent peer before the run ends.
        backend: ``nccl`` on GPUs, ``gloo`` on CPU (the default follows ``cpu``).
        cpu: train on CPU; default when no CUDA GPU is visible.
        mixed_precision: ``no`` or ``fp16`` (accelerate's names).
    """
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    workers = workers or (1 if cpu else torch.cuda.device_count()) or 1
    if nodes < 1 or not 0 <= node_rank < nodes:
        raise ValueError(f"ddp: node_rank {node_rank} must lie in 0..{nodes - 1} ({nodes} nodes)")
    if not cpu and workers > torch.cuda.device_count():
        raise ValueError(f"ddp: {workers} workers per node but {torch.cuda.device_count()} GPU(s) visible")
    if timeout <= 0:
        raise ValueError(f"ddp: timeout must be > 0 seconds, got {timeout}")
    backend = backend or ("gloo" if cpu else "nccl")
    return DDPEngine(address=address, port=int(port), world_size=nodes * workers, workers_dist_rank=node_rank * workers,
                     num_node_workers=workers, timeout=float(timeout), process_group_kwargs={"backend": backend},
                     cpu=cpu, mixed_precision=mixed_precision)


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist.strip())
    if not match:
        raise ValueError(f"ddp: cannot read a host from the Slurm node list {nodelist!r}; set MASTER_ADDR")
    return match.group(1) + (match.group(2) or "")


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"ddp: environment variable {key}={env[key]!r} is not an integer") from None


def engine_from_env(env: Optional[Mapping[str, str]] = None, *, workers: Optional[int] = None,
                    timeout: float = DEFAULT_TIMEOUT, cpu: Optional[bool] = None,
                    mixed_precision: str = "no") -> DDPEngine:
    """:func:`ddp_engine` for this node, read from the launcher's environment (one launch per node).

    - Slurm (``SLURM_NODEID`` set; ``srun`` with ``--ntasks-per-node=1``): node ``SLURM_NODEID`` of
      ``SLURM_NNODES``; master ``MASTER_ADDR``, else the first host of ``SLURM_STEP_NODELIST``
      (``SLURM_JOB_NODELIST``).
    - torchrun with ``--nproc-per-node=1`` (or the variables set by hand): node ``GROUP_RANK``
      (``NODE_RANK``, else ``RANK``) of ``WORLD_SIZE``, which then counts launches, i.e. nodes.
    - neither: one node, all its GPUs, on 127.0.0.1.
    ``MASTER_PORT`` defaults to 29500. ``workers`` per node: see :func:`ddp_engine`.
    """
    env = os.environ if env is None else env
    address, port = env.get("MASTER_ADDR"), _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    if "SLURM_NODEID" in env:
        tasks = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        if tasks != "1":
            raise ValueError(f"ddp: SLURM_NTASKS_PER_NODE={tasks}; start one task per node (--ntasks-per-node=1), "
                             "the engine spawns one process per GPU")
        nodes, node_rank = _int(env, "SLURM_NNODES"), _int(env, "SLURM_NODEID")
        if address is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("ddp: under Slurm set MASTER_ADDR or SLURM_STEP_NODELIST")
            address = _first_host(nodelist)
    elif "WORLD_SIZE" in env:
        if env.get("LOCAL_WORLD_SIZE", "1") != "1":
            raise ValueError(f"ddp: LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']}; start one launch per node "
                             "(torchrun --nproc-per-node=1), the engine spawns one process per GPU")
        key = next((k for k in ("GROUP_RANK", "NODE_RANK", "RANK") if k in env), None)
        if key is None:
            raise ValueError("ddp: WORLD_SIZE is set but none of GROUP_RANK, NODE_RANK, RANK says which node this is")
        nodes, node_rank = _int(env, "WORLD_SIZE"), _int(env, key)
        if address is None:
            raise ValueError("ddp: WORLD_SIZE is set but MASTER_ADDR is not (the address of node 0)")
    else:
        nodes, node_rank = 1, 0
    return ddp_engine(address=address or "127.0.0.1", port=port, nodes=nodes, node_rank=node_rank, workers=workers,
                      timeout=timeout, cpu=cpu, mixed_precision=mixed_precision)


def node_logdir(logdir: Union[str, os.PathLike], engine: Any, scratch: Union[None, str, os.PathLike] = None) -> Path:
    """The folder this node's launch trains in: ``logdir`` itself on the master node, else
    ``scratch`` (a node-local folder; default: one per run folder and node under the system's temporary
    folder) whose ``checkpoints`` links to ``logdir/checkpoints``. :meth:`cvkit.runners.StagedRunner.fit`
    calls it, so every node's launch passes the same ``logdir``; a folder it returned is returned as it is.

    Only global rank 0 writes the run folder. The other nodes' launches need its checkpoints (the
    previous stage's weights, ``resume.pth``) but keep their own lock and config beside them, so
    they write nothing into ``logdir``. ``logdir`` must be on a file system every node sees.
    """
    logdir = Path(logdir)
    if not isinstance(engine, DDPEngine) or engine.is_master_node or (logdir / "checkpoints").is_symlink():
        return logdir
    if scratch is None:
        key = hashlib.sha1(str(logdir.resolve()).encode()).hexdigest()[:12]
        scratch = Path(tempfile.gettempdir()) / "cvkit-nodes" / f"{logdir.name}-{key}-rank{engine.node_ranks[0]}"
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    link, target = scratch / "checkpoints", (logdir / "checkpoints").resolve()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return scratch
    if link.exists() or link.is_symlink():
        raise ValueError(f"{link} exists and is not a link to {target}; give this node another scratch folder")
    link.symlink_to(target, target_is_directory=True)
    return scratch


__all__ = ["DDPEngine", "PeerLostError", "ddp_engine", "engine_from_env", "node_logdir"]
