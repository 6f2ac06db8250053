"""Facial keypoints: regress N (x, y) points per image with a KeypointModel.

Stage 1 trains the head on a frozen backbone for one epoch; stage 2 trains everything with a
lower backbone LR. AdamW with weight decay; ReduceLROnPlateau on the smoothed train loss checked
every batch (patience ~15% of an epoch). The worst-predicted valid images of each epoch go to
TensorBoard and ``LOGDIR/worst/``. Error: mean distance in pixels of the original image, and
normalised (NME) by the distance between the first left/right pair (the eye centres in Kaggle's
layout). Test error is reported with and without horizontal-flip TTA (left/right points swap
places under the mirror, found from their names).

Real data (``--data DIR``): ``DIR/train.csv`` and ``DIR/test.csv`` with ``path`` (relative to
``DIR``) and one ``<name>_x, <name>_y`` column pair per keypoint in pixels (e.g. Kaggle's
``left_eye_center_x, left_eye_center_y, ...``; an empty cell marks a missing point). Names
holding ``left``/``right`` are mirrored by the flip TTA. Without ``--data`` a demo set in that
layout is built from scikit-learn's digits (corners and centre of a pasted digit, 96x96).
Without ``--pretrained``, the demo's backbone starts from weights trained on a label-free pretext
task over the digits (``cvkit.examples_support.demo_pretrained``), standing in for ImageNet weights.

    python examples/facial_keypoints_train.py            # demo, under a minute on 2 CPU cores
    python examples/facial_keypoints_train.py --data ~/facial --arch resnet34 --image-size 96
"""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cvkit.callbacks.worst import WorstPredictionsCallback, draw_keypoints
from cvkit.data import FastAffine, KeypointDataset, compose, create_preset, split_train_valid
from cvkit.data.demo import KEYPOINT_NAMES, build_keypoints
from cvkit.io import atomic_write_json
from cvkit.examples_support import (common_args, flip_pairs_from_names, image_sizes, predict, starting_weights,
                                    train_valid_loaders)
from cvkit.inference.tta import tta_predict
from cvkit.losses import KeypointLoss
from cvkit.metrics import KeypointMetrics
from cvkit.models import KeypointModel
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def parse_args(argv=None):
    p = common_args(__doc__, "facial_keypoints", arch="test_resnet", epochs=10, batch_size=16)
    p.add_argument("--image-size", type=int, default=48)
    return p.parse_args(argv)


def demo_data(folder: Path) -> Path:
    """The digits demo with its ``x0, y0...`` columns renamed ``top_left_x, top_left_y...``."""
    root = build_keypoints(folder, seed=0, per_class=20)
    for split in ("train", "test"):
        if not (root / f"{split}_named.csv").is_file():
            frame = pd.read_csv(root / f"{split}.csv")
            names = {f"{axis}{k}": f"{name}_{axis}" for k, name in enumerate(KEYPOINT_NAMES) for axis in "xy"}
            frame.rename(columns=names).to_csv(root / f"{split}_named.csv", index=False)
    return root


def keypoint_columns(frame: pd.DataFrame) -> list:
    """``[a_x, a_y, b_x, b_y, ...]``: every column pair ``<name>_x, <name>_y`` in table order."""
    return [c for x in frame.columns if x.endswith("_x") and f"{x[:-2]}_y" in frame.columns for c in (x, f"{x[:-2]}_y")]


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or demo_data(args.logdir.parent / "demo_data" / "keypoints")
    suffix = "" if args.data else "_named"
    table, test_table = pd.read_csv(root / f"train{suffix}.csv"), pd.read_csv(root / f"test{suffix}.csv")
    if args.limit:
        table, test_table = table.head(args.limit), test_table.head(args.limit)
    columns = keypoint_columns(table)
    names = [c[:-2] for c in columns[::2]]
    flip_pairs = flip_pairs_from_names(names)
    train_rows, valid_rows = split_train_valid(table, 0.2, label_col=None, seed=args.seed)
    width, height = image_sizes([root / table["path"].iloc[0]])[0]
    size, plain = args.image_size, create_preset("resize", args.image_size)
    augment = compose([A.Resize(size, size), FastAffine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                                                        rotate=(-10, 10), p=0.7), A.RandomBrightnessContrast(p=0.3)])

    def loaders(stage: Stage) -> dict:
        train = KeypointDataset(train_rows, columns, root=root, transform=augment)
        valid = KeypointDataset(valid_rows, columns, root=root, transform=plain)
        return train_valid_loaders(train, valid, args.batch_size, args.workers, args.seed)

    batches = max(1, len(train_rows) // args.batch_size)
    patience = max(3, round(0.15 * batches))  # ~15% of an epoch, at least 3 batches on tiny demo epochs
    plateau = dict(scheduler="plateau_batch", scheduler_kwargs=dict(patience=patience, factor=0.5, min_lr=1e-5))
    stages = [
        Stage("frozen", epochs=1, trainable="head", lr={"head": 1e-2}, optimizer="adamw", weight_decay=1e-4),
        Stage("all", epochs=args.epochs, trainable="all", lr={"head": 3e-3, "backbone": 2e-3},
              optimizer="adamw", weight_decay=1e-4, **plateau),
    ]
    per_sample = KeypointLoss(reduction="none")

    def worst(stage: Stage) -> list:
        return [WorstPredictionsCallback(per_sample, draw=draw_keypoints, k=8, save_dir=args.logdir / "worst")]

    def metrics() -> list:
        return [KeypointMetrics((height, width), norm_points=flip_pairs[0] if flip_pairs else None)]

    test = KeypointDataset(test_table, columns, root=root, transform=plain)
    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = KeypointModel(args.arch, len(names), pretrained=starting_weights(args))
    runner = StagedRunner().fit(
        model, stages, loaders, KeypointLoss(), args.logdir, metrics=metrics, callbacks=worst,
        valid_metric="mean_error_px", minimize_valid_metric=True, engine=args.device, seed=args.seed,
        verbose=not args.quiet, test_loader=DataLoader(test, 64),
        config={"example": "facial_keypoints", "arch": args.arch, "data": str(root), "keypoints": names,
                "flip_pairs": flip_pairs, "args": vars(args)},
    )
    result = runner.final_metrics
    loader = DataLoader(test, 64, num_workers=args.workers)
    targets = torch.stack([test[i]["targets"] for i in range(len(test))])
    sizes = torch.tensor(image_sizes(test.path(i) for i in range(len(test))), dtype=torch.float64)

    def flip(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return tta_predict(m, x, ["identity", "hflip"], target="keypoints", flip_pairs=flip_pairs)

    for label, fn in (("plain", None), ("hflip_tta", flip)):
        out, index = predict(model, loader, fn)
        metric = metrics()[0]
        metric.update(out, targets[index], sizes=sizes[index])
        result[f"test_{label}"] = metric.compute()
    atomic_write_json(args.logdir / "metrics.json", result)
    print(f"test mean error {result['test_plain']['mean_error_px']:.2f} px (NME {result['test_plain']['nme']:.4f}); "
          f"with hflip TTA {result['test_hflip_tta']['mean_error_px']:.2f} px (NME {result['test_hflip_tta']['nme']:.4f})"
          f"  (best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; logs in {args.logdir})")
    return result


if __name__ == "__main__":
    main()
