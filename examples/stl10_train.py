"""STL-10 classification: head first with the backbone frozen, then the whole network.

Real data (``--data DIR``): the STL-10 binary release, i.e. ``DIR/stl10_binary/`` (or ``DIR``
itself) holding ``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin`` (96x96x3 uint8,
labels 1..10), optionally ``class_names.txt``. Without ``--data`` a demo set in that same
layout is built from scikit-learn's handwritten digits, so the same reader runs.

    python examples/stl10_train.py                       # demo, ~1-2 min on 2 CPU cores
    python examples/stl10_train.py --data ~/stl10 --arch resnet50 --pretrained weights/resnet50.pth
    python examples/stl10_train.py --pseudo-label      # + a stage on confident predictions for unlabeled_X.bin
"""
from __future__ import annotations

import argparse
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from cvkit.data import stl10
from cvkit.data.augment import FastAffine, NormalizeToTensor
from cvkit.io import atomic_write_json
from cvkit.losses import create_criterion
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.perf import FastPaths
from cvkit.runners import StagedRunner
from cvkit.stages import Stage
from cvkit.tools.pseudo import PseudoLabelled, pseudo_label


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with the STL-10 binary files (default: embedded demo set)")
    p.add_argument("--logdir", type=Path, default=Path("runs/stl10"), help="where logs, checkpoints and metrics go")
    p.add_argument("--arch", default="test_resnet", help="any timm architecture name")
    p.add_argument("--pretrained", help="local weights file for --arch (nothing is downloaded)")
    p.add_argument("--head-epochs", type=int, default=2, help="epochs of the head-only stage")
    p.add_argument("--epochs", type=int, default=15, help="maximum epochs of the full stage")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64, help="training size of the full stage (head stage: 3/4 of it)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, choices=["cpu", "gpu", "amp", "ddp", "ddp_amp"],
                   help="engine (amp: fp16 mixed precision; ddp: one process per GPU); default gpu if available")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in place")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick kernels for fixed sizes")
    p.add_argument("--profile", action="store_true", help="profile 10 train batches into LOGDIR/profile.txt")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --logdir from its last epoch")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="use only this many train/test images (smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--loss", default="ce", choices=["ce", "bce"], help="cross-entropy, or BCE on one-hot targets")
    p.add_argument("--pseudo-label", action="store_true",
                   help="third stage on labelled + confidently pseudo-labelled unlabeled_X.bin images")
    p.add_argument("--pseudo-threshold", type=float, default=0.9, help="minimum confidence of a pseudo-label")
    p.add_argument("--pseudo-epochs", type=int, default=4, help="maximum epochs of the pseudo-label stage")
    return p.parse_args(argv)


def transforms(size: int, train: bool) -> A.Compose:
    steps = [A.Resize(size, size)]
    if train:
        steps.append(FastAffine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-8, 8), p=0.7))
        steps.append(A.RandomBrightnessContrast(p=0.3))
    return A.Compose(steps + [NormalizeToTensor()])


def weak_transforms(size: int) -> A.Compose:
    """What the unlabelled images are predicted with: a small shift only."""
    return A.Compose([A.Resize(size, size), FastAffine(translate_percent=(-0.03, 0.03), p=0.5), NormalizeToTensor()])


def strong_transforms(size: int) -> A.Compose:
    """What the pseudo-label stage trains with: stronger geometry, colour, blur and cut-out."""
    return A.Compose([
        A.Resize(size, size), FastAffine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-15, 15), p=0.9),
        A.RandomBrightnessContrast(0.3, 0.3, p=0.7), A.OneOf([A.GaussianBlur(), A.GaussNoise()], p=0.3),
        A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25), p=0.5),
        NormalizeToTensor()])


def pseudo_train_set(model: torch.nn.Module, root: Path, args: argparse.Namespace, train: stl10.ArrayDataset,
                     size: int) -> torch.utils.data.Dataset:
    """Labelled train images plus the unlabelled ones the model predicts confidently, all strongly augmented."""
    unlabeled, _ = stl10.load_split(root, "unlabeled")
    unlabeled = unlabeled[: args.limit] if args.limit else unlabeled
    loader = DataLoader(stl10.ArrayDataset(unlabeled, None, weak_transforms(size)), 128, num_workers=args.workers)
    kept = pseudo_label(model, loader, threshold=args.pseudo_threshold)
    print(f"[stl10] pseudo-labels: kept {len(kept.indices)} of {kept.total} unlabelled images "
          f"(threshold {args.pseudo_threshold})")
    atomic_write_json(args.logdir / "pseudo_labels.json", kept.summary())
    strong = stl10.ArrayDataset(unlabeled, None, strong_transforms(size))
    return torch.utils.data.ConcatDataset([train, PseudoLabelled(strong, kept, index_offset=len(train))])


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or stl10.build_demo(args.logdir.parent / "demo_data" / "stl10", seed=0)
    images, labels = stl10.load_split(root, "train")
    test_images, test_labels = stl10.load_split(root, "test")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    names = stl10.class_names(root)
    train_idx, valid_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=args.seed)

    def loaders(stage: Stage) -> dict:
        size, batch = stage.image_size, stage.batch_size
        train = stl10.ArrayDataset(images[train_idx], labels[train_idx], transforms(size, train=True))
        if stage.name == "pseudo":  # the model holds the previous stage's best weights by now
            train = pseudo_train_set(model, root, args, stl10.ArrayDataset(
                images[train_idx], labels[train_idx], strong_transforms(size)), size)
        valid = stl10.ArrayDataset(images[valid_idx], labels[valid_idx], transforms(size, train=False))
        return {
            "train": DataLoader(train, batch, shuffle=True, num_workers=args.workers, drop_last=True,
                                generator=torch.Generator().manual_seed(args.seed)),
            "valid": DataLoader(valid, batch * 2, num_workers=args.workers),
        }

    head_size = max(32, args.image_size * 3 // 4)
    stages = [
        Stage("head", epochs=args.head_epochs, trainable="head", lr={"head": 3e-3}, optimizer="adamw",
              batch_size=args.batch_size, image_size=head_size),
        Stage("full", epochs=args.epochs, trainable="all", train_bn=True, lr={"head": 0.05, "backbone": 0.02},
              optimizer="sgd", optimizer_kwargs=dict(momentum=0.9, nesterov=True), weight_decay=5e-4,
              scheduler="plateau", scheduler_kwargs=dict(factor=0.3, patience=1),
              early_stopping=dict(patience=3, min_delta=1e-3),
              batch_size=args.batch_size, image_size=args.image_size),
    ]
    if args.pseudo_label:
        stages.append(Stage("pseudo", epochs=args.pseudo_epochs, trainable="all", lr={"head": 0.01, "backbone": 0.005},
                            optimizer="sgd", optimizer_kwargs=dict(momentum=0.9, nesterov=True), weight_decay=5e-4,
                            scheduler="cosine", batch_size=args.batch_size, image_size=args.image_size))
    criterion = torch.nn.CrossEntropyLoss() if args.loss == "ce" else create_criterion("bce_one_hot")
    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = create_model(args.arch, num_classes=len(names), pretrained=args.pretrained)
    test = DataLoader(stl10.ArrayDataset(test_images, test_labels, transforms(args.image_size, train=False)), 128)
    runner = StagedRunner().fit(
        model, stages, loaders, criterion, args.logdir,
        metrics=lambda: [ClassificationMetrics(len(names))],
        valid_metric="accuracy", minimize_valid_metric=False,
        engine=args.device, seed=args.seed, verbose=not args.quiet, test_loader=test, resume=args.resume,
        fast=FastPaths(args.channels_last, args.compile, args.cudnn_benchmark), profile=args.profile,
        config={"example": "stl10", "arch": args.arch, "data": str(root), "classes": list(names), "args": vars(args)},
    )
    result = runner.final_metrics
    print(f"test accuracy {result['test']['accuracy']:.4f}  macro F1 {result['test']['f1_macro']:.4f}  "
          f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; logs in {args.logdir})")
    return result


if __name__ == "__main__":
    main()
