"""One node's launch of a 2-node CPU DDP staged run (gloo), or its one-process twin, for
tests/test_ddp_multinode.py.

    python ddp_multinode_script.py RUN PROBE --single [--gpu]
    python ddp_multinode_script.py RUN PROBE --node 0|1 --port PORT [--scratch DIR] [--resume] [--hold STAGE:EPOCH:RANK]
                                   [--gpu --world N]

Each node runs WORLD/2 workers (default world size 4 on CPU, gloo; ``--gpu``: one worker per visible
GPU, NCCL, for bench/ddp_multinode_gpu.py); per-rank batch 16/WORLD = the single run's batch 16. Every rank
writes its final weights per stage into PROBE, never into RUN. With CVKIT_AUDIT_LOG set, every
process of this launch (workers included: they import this module) appends to that file each path
it opens for writing, creates, renames or removes inside RUN. ``--hold`` parks the given global
rank at the first train batch of that stage's global epoch (PROBE/held_r<rank> says so) for the
test to kill nodes there.
"""
import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from catalyst.core.callback import Callback
from torch.utils.data import DataLoader


def _audit_writes(run: str, log: str) -> None:
    run, guard = os.path.realpath(run), threading.local()
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = {"os.rename": (0, 1), "os.remove": (0,), "os.mkdir": (0,), "os.rmdir": (0,), "os.symlink": (1,),
              "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.utime": (0,)}

    def hook(event, args):
        if getattr(guard, "busy", False):
            return
        if event == "open":
            paths = [args[0]] if isinstance(args[2], int) and args[2] & writing else []
        else:
            paths = [args[i] for i in events.get(event, ())]
        paths = [p for p in paths if isinstance(p, (str, bytes, os.PathLike))]
        hits = [os.path.realpath(os.fsdecode(p)) for p in paths]
        hits = [p for p in hits if p == run or p.startswith(run + os.sep)]
        if hits:
            guard.busy = True
            try:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} {event} {' '.join(hits)}\n")
            finally:
                guard.busy = False

    sys.addaudithook(hook)


if os.environ.get("CVKIT_AUDIT_LOG"):
    _audit_writes(os.environ["CVKIT_AUDIT_RUN"], os.environ["CVKIT_AUDIT_LOG"])


class Probe(Callback):
    """Each rank's final weights per stage into ``probe``; parks ``hold`` = (stage, epoch, rank)."""

    def __init__(self, probe: str, hold) -> None:
        super().__init__(order=200)
        self.probe, self.hold, self.batches = Path(probe), hold, 0

    def on_loader_start(self, runner) -> None:
        self.batches = 0

    def on_batch_end(self, runner) -> None:
        self.batches += 1
        rank = runner.engine.process_index
        if (self.hold and runner.is_train_loader and self.batches == 1
                and (runner.stage.name, runner.epoch_step, rank) == self.hold):
            (self.probe / f"held_r{rank}").write_text(str(os.getpid()))
            time.sleep(600)

    def on_experiment_end(self, runner) -> None:
        from cvkit.io import save_checkpoint

        model = runner.engine.unwrap_model(runner.model)
        save_checkpoint(self.probe / f"weights_{runner.stage.name}_r{runner.engine.process_index}.pth",
                        {"model": model.state_dict()})


def main() -> None:
    from conftest import TinyImages
    from cvkit.distributed import PeerLostError, ddp_engine, node_logdir
    from cvkit.metrics import ClassificationMetrics
    from cvkit.models import create_model
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("probe")
    p.add_argument("--single", action="store_true")
    p.add_argument("--node", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--scratch")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--hold")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--world", type=int, default=4)
    a = p.parse_args()
    if a.gpu:  # full fp32 matmuls, so one process and the DDP run compare within float tolerance
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hold = None
    if a.hold:
        stage, epoch, rank = a.hold.split(":")
        hold = (stage, int(epoch), int(rank))
    Path(a.probe).mkdir(parents=True, exist_ok=True)
    engine = (None if a.single else
              ddp_engine(address="127.0.0.1", port=a.port, nodes=2, node_rank=a.node, workers=a.world // 2,
                         cpu=not a.gpu, timeout=a.timeout))
    logdir = a.run if a.single else node_logdir(a.run, engine, a.scratch or a.run)
    loaders = {
        "train": DataLoader(TinyImages(64, seed=0), batch_size=16 if a.single else 16 // a.world, shuffle=True,
                            generator=torch.Generator().manual_seed(0)),
        "valid": DataLoader(TinyImages(32, seed=1), batch_size=16 if a.single else 32 // a.world),
    }
    torch.manual_seed(0)
    model = create_model("test_vit", 3)
    stages = [Stage("head", 1, trainable="head", lr=0.1, optimizer="sgd", optimizer_kwargs=dict(momentum=0.0)),
              Stage("all", 2, trainable="blocks.3", lr={"head": 0.05, "backbone": 0.01}, optimizer="sgd")]
    try:
        runner = StagedRunner().fit(model, stages, loaders, torch.nn.CrossEntropyLoss(), logdir,
                                    engine=engine or ("gpu" if a.gpu else "cpu"), metrics=lambda: [ClassificationMetrics(3)],
                                    callbacks=lambda s: [Probe(a.probe, hold)], verbose=False, seed=3,
                                    resume=a.resume or None)
    except PeerLostError as exc:
        print(f"node {a.node}: {exc}", file=sys.stderr)
        sys.exit(3)
    (Path(a.probe) / f"parent_n{a.node}.json").write_text(json.dumps(runner.history))


if __name__ == "__main__":
    main()
