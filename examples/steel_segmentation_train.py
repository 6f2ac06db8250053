"""Severstal steel defects: a U-Net (smp) predicting one mask per defect class, RLE submission.

Stage 1 trains the decoder and segmentation head on a frozen encoder; stage 2 trains everything
with a lower encoder LR. Loss: per-image Dice + BCE. Metrics: Dice and IoU per class and their
mean (summed over the loader); the best epoch is chosen by mean valid Dice. Test predictions
average the plain and the mirrored image (flip TTA), are resized back to each image's own size,
thresholded and written as a Severstal submission (``ImageId_ClassId,EncodedPixels``: one row per
image and class, column-major 1-based runs, empty where nothing is predicted).

Real data (``--data DIR``, Severstal's layout): ``DIR/train.csv`` with ``ImageId,ClassId,
EncodedPixels`` (1-based ClassId; images without defects have no row), ``DIR/train_images/`` and
``DIR/test_images/``. Without ``--data`` a demo set is built from scikit-learn's digits: digits
0-3 on 96x96 canvases, their pixels as defect classes 1-4, with ``train_rle.csv`` and a labelled
``test_rle.csv`` in that same RLE layout (so the test set is also scored).

    python examples/steel_segmentation_train.py                   # demo, about a minute on 2 CPU cores
    python examples/steel_segmentation_train.py --data ~/severstal --encoder resnet34 \\
        --encoder-weights weights/resnet34.pth --image-size 256 --width 1600 --overlays
"""
from __future__ import annotations

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cvkit.data import SegmentationDataset, compose, create_preset
from cvkit.data.demo import build_segmentation
from cvkit.data.io import read_image
from cvkit.examples_support import (UnlabelledImages, common_args, iter_predictions, mask_overlay, resize_probabilities,
                                    severstal_rows, train_valid_loaders, write_png, write_table)
from cvkit.inference.tta import tta_predict
from cvkit.io import atomic_write_json
from cvkit.losses import DiceBCELoss
from cvkit.metrics import SegmentationMetrics
from cvkit.models import create_segmentation_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage

NUM_CLASSES = 4


def parse_args(argv=None):
    p = common_args(__doc__, "steel_segmentation", arch=None, epochs=16, batch_size=8)
    p.add_argument("--encoder", default="tu-test_resnet", help="smp encoder (resnet18, ...) or tu-<timm name>")
    p.add_argument("--encoder-weights", help="local encoder weights file (nothing is downloaded)")
    p.add_argument("--head-epochs", type=int, default=2, help="epochs with the encoder frozen")
    p.add_argument("--image-size", type=int, default=64, help="training height (a multiple of 32)")
    p.add_argument("--width", type=int, default=None, help="training width (default: --image-size)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability above which a pixel is a defect")
    p.add_argument("--overlays", action="store_true", help="write LOGDIR/overlays/<image>.png with the predicted masks")
    return p.parse_args(argv)


def datasets(args, train_tf, plain):
    """(train+valid dataset with masks, test dataset, whether the test set has masks)."""
    if args.data is None:
        root = build_segmentation(args.logdir.parent / "demo_data" / "segmentation", seed=0, per_class=25)
        train = SegmentationDataset.from_rle(root / "train_rle.csv", root / "images", NUM_CLASSES, transform=train_tf)
        test = SegmentationDataset.from_rle(root / "test_rle.csv", root / "images", NUM_CLASSES, transform=plain)
        return train, test, True
    train = SegmentationDataset.from_rle(args.data / "train.csv", args.data / "train_images", NUM_CLASSES,
                                         include_unlisted=True, transform=train_tf)
    names = sorted(p.name for p in (args.data / "test_images").iterdir())
    return train, UnlabelledImages(pd.DataFrame({"path": names}), root=args.data / "test_images", transform=plain), False


def main(argv=None) -> dict:
    args = parse_args(argv)
    size = (args.image_size, args.width or args.image_size)
    plain = create_preset("resize", size)
    train_tf = compose([A.Resize(*size), A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomBrightnessContrast(p=0.3)])
    full, test, labelled = datasets(args, train_tf, plain)
    order = np.random.default_rng(args.seed).permutation(len(full))[: args.limit or len(full)]
    if args.limit:
        test = test.subset(np.arange(min(args.limit, len(test))))
    n_valid = max(1, len(order) // 5)
    train, valid = full.subset(order[n_valid:]), full.subset(order[:n_valid])
    valid.transform = plain

    def loaders(stage: Stage) -> dict:
        return train_valid_loaders(train, valid, args.batch_size, args.workers, args.seed)

    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = create_segmentation_model(args.encoder, NUM_CLASSES, encoder_weights_path=args.encoder_weights)
    stages = [
        Stage("decoder", epochs=args.head_epochs, trainable="head", lr={"head": 1e-2}, optimizer="adamw"),
        Stage("all", epochs=args.epochs, trainable="all", lr={"head": 5e-3, "backbone": 3e-3}, optimizer="adamw",
              weight_decay=1e-4, scheduler="cosine"),
    ]

    def metrics() -> list:
        return [SegmentationMetrics(NUM_CLASSES, args.threshold)]

    runner = StagedRunner().fit(
        model, stages, loaders, DiceBCELoss(), args.logdir, metrics=metrics, valid_metric="dice",
        minimize_valid_metric=False, engine=args.device, seed=args.seed, verbose=not args.quiet,
        test_loader=DataLoader(test, 16) if labelled else None,
        config={"example": "steel_segmentation", "encoder": args.encoder, "data": str(args.data or "demo"),
                "image_size": size, "args": vars(args)},
    )
    result = runner.final_metrics
    rows, tta_metric = [], metrics()[0]

    def flip(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return tta_predict(m, x, ["identity", "hflip"], target="mask")

    for probs, index in iter_predictions(model, DataLoader(test, 16, num_workers=args.workers), flip):
        if labelled:
            tta_metric.update(torch.logit(probs.clamp(1e-6, 1 - 1e-6)), torch.stack([test[i]["targets"] for i in index]))
        for p, i in zip(probs, index):
            image = read_image(test.path(i))
            mask = (resize_probabilities(p, *image.shape[:2]) > args.threshold).numpy().astype(np.uint8)
            rows += severstal_rows(test.path(i).name, mask)
            if args.overlays:
                write_png(args.logdir / "overlays" / f"{test.path(i).stem}.png", mask_overlay(image, mask))
    write_table(pd.DataFrame(rows, columns=["ImageId_ClassId", "EncodedPixels"]), args.logdir / "submission.csv")
    if labelled:
        result["test_flip_tta"] = tta_metric.compute()
        atomic_write_json(args.logdir / "metrics.json", result)
        print(f"test Dice {result['test']['dice']:.4f} (IoU {result['test']['iou']:.4f}); with flip TTA "
              f"{result['test_flip_tta']['dice']:.4f} (IoU {result['test_flip_tta']['iou']:.4f})", end="  ")
    print(f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; "
          f"submission in {args.logdir / 'submission.csv'})")
    return result


if __name__ == "__main__":
    main()
