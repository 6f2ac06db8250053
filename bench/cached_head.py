"""What does ``cache_features`` save? A head stage on ImageNet EfficientNet-Lite0, slow path vs cached.

The same head stage (AdamW, the demo recipe's LR, fixed epochs, no early stopping) on bench/transfer.py's
photos9 set, through StagedRunner: images through the frozen backbone every epoch, against the
backbone's pooled features computed once (one copy, and two augmented copies). Wall time of the
stage (cache building included) and valid accuracy of its last epoch; each arm in this one process,
after one warm-up forward pass, at the same thread count.

    python bench/cached_head.py --epochs 10 --write
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Head stage on cached features (bench/cached_head.py)"


def run_arm(config: Dict[str, Any], copies: Optional[int], epochs: int, logdir: Path) -> Dict[str, float]:
    """One head stage; wall seconds of ``fit`` and the last epoch's valid accuracy."""
    import torch

    from cvkit.config import load_config
    from cvkit.experiment import build
    from cvkit.metrics import ClassificationMetrics
    from cvkit.runners import StagedRunner
    from cvkit.stages import Stage

    experiment = build(load_config({**config, "logdir": str(logdir)}))
    stage = Stage("head", epochs, trainable="head", lr={"head": 3e-3}, batch_size=32, cache_features=copies)
    classes = int(experiment.config["model"]["num_classes"])
    start = time.perf_counter()
    runner = StagedRunner().fit(experiment.model, [stage], experiment.loaders, experiment.criterion, logdir,
                                metrics=lambda: [ClassificationMetrics(classes)], valid_metric="accuracy",
                                engine="cpu", seed=0, verbose=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "valid": float(runner.history[-1]["valid/accuracy"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the head stage")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--write", action="store_true", help=f"write the section '{HEADING}' of bench/RESULTS.md")
    args = parser.parse_args()
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from bench.transfer import Counts, build_set, demo_recipe, experiment_config, lite0_weights_file

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_set("photos9", Path(tmp) / "data", Counts())
        config = experiment_config(demo_recipe(False), folder, lite0_weights_file(), args.size, 0, Path(tmp) / "x")
        arms = {"slow path (backbone every epoch)": None, "cache_features: 1": 1, "cache_features: 2": 2}
        results = {name: run_arm(config, copies, args.epochs, Path(tmp) / str(copies)) for name, copies in arms.items()}
    slow = results["slow path (backbone every epoch)"]["seconds"]
    lines = ["| head stage | wall s | speed-up | valid accuracy (last epoch) |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['seconds']:.1f} | {slow / r['seconds']:.1f}x | {r['valid']:.3f} |"
              for name, r in results.items()]
    print("\n".join(lines))
    print(json.dumps(results))
    if args.write:
        from results import replace_section

        command = "python bench/cached_head.py " + " ".join(sys.argv[1:])
        text = (f"{HEADING}\n\n`{command.strip()}`: EfficientNet-Lite0 (ImageNet, packaged weights) at {args.size} px, "
                f"bench/transfer.py's photos9 set ({Counts().train * 9} train, {Counts().valid * 9} valid patches), "
                f"{args.epochs} head epochs, batch 32, {args.threads} torch threads, light augmentation.\n\n"
                + "\n".join(lines) + "\n")
        replace_section(HEADING, text)


if __name__ == "__main__":
    main()
