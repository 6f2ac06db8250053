"""Facial keypoints: regress N (x, y) points per image with a KeypointModel.

Stage 1 trains the head on a frozen backbone for one epoch; stage 2 trains everything with a
lower backbone LR (AdamW; ReduceLROnPlateau on the smoothed train loss checked every batch). The
worst-predicted valid images of each epoch go to TensorBoard and ``LOGDIR/worst/``. Error: mean
distance in pixels of the original image, and NME (normalised by the first left/right pair: the
eye centres in Kaggle's layout); on the test set also with horizontal-flip TTA (left/right
points, found from their names, swap places).

Real data (``--data DIR``): ``DIR/train.csv`` and ``DIR/test.csv`` with ``path`` (relative to
``DIR``) and a ``<name>_x, <name>_y`` column pair per keypoint in pixels (an empty cell marks a
missing point). Without ``--data``: a demo in that layout from scikit-learn's digits (corners and
centre of a pasted digit), whose backbone starts from ``cvkit.data.demo.demo_pretrained``.

    python examples/facial_keypoints_train.py            # demo, under a minute on 2 CPU cores
    python examples/facial_keypoints_train.py --data ~/facial --arch resnet34 --image-size 96
"""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import pandas as pd
import torch

from _common import common_args, predict_device, run_script, starting_weights
from cvkit.callbacks.worst import WorstPredictionsCallback
from cvkit.data.draw import draw_keypoints
from cvkit.data import KeypointDataset, OneWarp, compose, create_preset, limit_items, split_train_valid
from cvkit.data.demo import KEYPOINT_NAMES, build_keypoints
from cvkit.data.io import read_image
from cvkit.data.loaders import make_loader
from cvkit.inference.predict import predict
from cvkit.inference.tta import flip_pairs_from_names
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
    names = {f"{axis}{k}": f"{name}_{axis}" for k, name in enumerate(KEYPOINT_NAMES) for axis in "xy"}
    for split in ("train", "test"):
        pd.read_csv(root / f"{split}.csv").rename(columns=names).to_csv(root / f"{split}_named.csv", index=False)
    return root


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or demo_data(args.logdir.parent / "demo_data" / "keypoints")
    suffix = "" if args.data else "_named"
    table, test_table = (limit_items(pd.read_csv(root / f"{split}{suffix}.csv"), args.limit) for split in ("train", "test"))
    # every column pair <name>_x, <name>_y in table order
    columns = [c for x in table.columns if x.endswith("_x") and f"{x[:-2]}_y" in table for c in (x, f"{x[:-2]}_y")]
    names = [c[:-2] for c in columns[::2]]
    flip_pairs = flip_pairs_from_names(names)
    train_rows, valid_rows = split_train_valid(table, 0.2, label_col=None, seed=args.seed)
    height, width = read_image(root / table["path"].iloc[0]).shape[:2]
    size, plain = args.image_size, create_preset("resize", args.image_size)
    augment = compose([OneWarp((size, size), mode="resize", affine=0.7, affine_scale=(0.9, 1.1),
                               translate_percent=(-0.05, 0.05), rotate=(-10, 10)), A.RandomBrightnessContrast(p=0.3)])

    def loaders(stage: Stage) -> dict:
        train = KeypointDataset(train_rows, columns, root=root, transform=augment)
        valid = KeypointDataset(valid_rows, columns, root=root, transform=plain)
        return {"train": make_loader(train, args.batch_size, train=True, workers=args.workers, seed=args.seed),
                "valid": make_loader(valid, args.batch_size * 2, train=False, workers=args.workers)}

    # ReduceLROnPlateau per batch, patience ~15% of an epoch (at least 3 batches on tiny demo epochs)
    patience = max(3, round(0.15 * max(1, len(train_rows) // args.batch_size)))
    stages = [Stage("frozen", epochs=1, trainable="head", lr={"head": 1e-2}, optimizer="adamw", weight_decay=1e-4),
              Stage("all", epochs=args.epochs, trainable="all", lr={"head": 3e-3, "backbone": 2e-3}, optimizer="adamw",
                    weight_decay=1e-4, scheduler="plateau_batch",
                    scheduler_kwargs=dict(patience=patience, factor=0.5, min_lr=1e-5))]

    def worst(stage: Stage) -> list:
        return [WorstPredictionsCallback(KeypointLoss(reduction="none"), draw=draw_keypoints, k=8,
                                         save_dir=args.logdir / "worst")]

    def metrics() -> list:
        return [KeypointMetrics((height, width), norm_points=flip_pairs[0] if flip_pairs else None)]

    test = KeypointDataset(test_table, columns, root=root, transform=plain)

    def test_errors(model: torch.nn.Module) -> dict:  # the best weights' test error without and with flip TTA
        files, out = [test.path(i) for i in range(len(test))], {}
        for label, tta in (("plain", []), ("hflip_tta", ["hflip"])):
            found = predict(model, files, "keypoints", tta=tta, flip_pairs=flip_pairs, transform=plain, image_size=size,
                            batch_size=64, workers=args.workers, device=predict_device(args))
            metric = metrics()[0]  # sizes: (width, height) of each original image, to measure the error in its pixels
            metric.update(torch.stack([p.output for p in found]), torch.stack([test[p.index]["targets"] for p in found]),
                          sizes=torch.tensor([[p.width, p.height] for p in found], dtype=torch.float64))
            out[f"test_{label}"] = metric.compute()
        return out

    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = KeypointModel(args.arch, len(names), pretrained=starting_weights(args))
    result = StagedRunner().fit(
        model, stages, loaders, KeypointLoss(), args.logdir, metrics=metrics, callbacks=worst,
        valid_metric="mean_error_px", minimize_valid_metric=True, engine=args.device, seed=args.seed,
        verbose=not args.quiet, test_loader=make_loader(test, 64, train=False, workers=args.workers),
        postprocess=test_errors,  # its results join metrics.json
        config={"example": "facial_keypoints", "arch": args.arch, "data": str(root), "keypoints": names,
                "flip_pairs": flip_pairs, "args": vars(args)},
    ).final_metrics
    plain_m, tta_m = result["test_plain"], result["test_hflip_tta"]
    print(f"test mean error {plain_m['mean_error_px']:.2f} px (NME {plain_m['nme']:.4f}); with hflip TTA "
          f"{tta_m['mean_error_px']:.2f} px (NME {tta_m['nme']:.4f})  (best: stage {result['best']['stage']!r}, "
          f"epoch {result['best']['epoch']}; logs in {args.logdir})")
    return result


if __name__ == "__main__":
    run_script(main)
