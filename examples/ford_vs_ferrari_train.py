"""Ford vs Ferrari: an EfficientNet with a BatchNorm + Dropout head, fine-tuned in three stages.

Stage 1 trains the head (BN + dropout 0.5 + linear) on a frozen backbone; stage 2 unfreezes the
upper half of the blocks (from the middle block on) with every BatchNorm kept frozen; stage 3
continues at a lower LR. Each stage trains at a larger image size with a smaller batch
(progressive resizing, through the loader factory). Train/valid/test is a stratified split of
one folder tree; the augmentation (cvkit's OneWarp crop and flip) adds CLAHE (local contrast), as
the project used for photos with harsh light. The test set is scored, with the best weights, at the
last stage's image size (as ``cvkit train`` scores it).

Real data (``--data DIR``): class folders ``DIR/<class>/*.jpg`` (e.g. ``ferrari/``, ``ford/``),
split 64/16/20 stratified by class. Without ``--data`` a demo set in that layout is built from
scikit-learn's digits (ten classes of tinted 32x32 digits under ``images/digit_k/``).
Without ``--pretrained``, the demo's backbone starts from weights trained on a label-free pretext
task over the digits (``cvkit.data.demo.demo_pretrained``), standing in for ImageNet weights.

    python examples/ford_vs_ferrari_train.py                     # demo, about a minute on 2 CPU cores
    python examples/ford_vs_ferrari_train.py --data ~/cars --arch efficientnet_b0 \\
        --pretrained weights/efficientnet_b0.pth --sizes 224 288 320 --batch-sizes 64 32 24
"""
from __future__ import annotations

import albumentations as A
import torch

from _common import common_args, run_script, starting_weights
from cvkit.data import ClassificationDataset, OneWarp, compose, create_preset, limit_items, split_train_valid
from cvkit.data.demo import build_classification
from cvkit.data.loaders import make_loader
from cvkit.losses import create_criterion
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.models.groups import main_blocks
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def parse_args(argv=None):
    p = common_args(__doc__, "ford_vs_ferrari", arch="test_efficientnet", epochs=10, batch_size=32)
    p.add_argument("--head-epochs", type=int, default=2, help="epochs of the head-only stage")
    p.add_argument("--sizes", type=int, nargs=3, default=[48, 64, 80], help="image size of each stage")
    p.add_argument("--batch-sizes", type=int, nargs=3, default=None,
                   help="batch size of each stage (default: --batch-size, then 3/4 and 1/2 of it)")
    return p.parse_args(argv)


def train_transform(size: int) -> A.Compose:
    return compose([OneWarp((size, size), scale=(0.7, 1.0), hflip=0.5), A.CLAHE(clip_limit=2.0, p=0.5),
                    A.RandomBrightnessContrast(p=0.3)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    demo = args.logdir.parent / "demo_data" / "classification"
    root = args.data or build_classification(demo, seed=0, per_class=100) / "images"
    everything = ClassificationDataset.from_folders(root)
    frame = limit_items(everything.frame, args.limit, label_col="label")  # the same number from every class
    rest, test_rows = split_train_valid(frame, 0.2, "label", seed=args.seed)
    train_rows, valid_rows = split_train_valid(rest, 0.2, "label", seed=args.seed)
    names = sorted(everything.class_map, key=everything.class_map.get)
    data = dict(root=root, class_map=everything.class_map)
    b = args.batch_size
    batches = args.batch_sizes or [b, max(2, b * 3 // 4), max(2, b // 2)]

    def loaders(stage: Stage) -> dict:
        train = ClassificationDataset(train_rows, transform=train_transform(stage.image_size), **data)
        valid = ClassificationDataset(valid_rows, transform=create_preset("resize", stage.image_size), **data)
        return {"train": make_loader(train, stage.batch_size, train=True, workers=args.workers, seed=args.seed),
                "valid": make_loader(valid, stage.batch_size * 2, train=False, workers=args.workers)}

    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = create_model(args.arch, len(names), pretrained=starting_weights(args), head="bn_dropout", head_dropout=0.5)
    middle = main_blocks(model)[len(main_blocks(model)) // 2]
    stages = [
        Stage("head", epochs=args.head_epochs, trainable="head", lr={"head": 1e-2}, optimizer="adamw",
              batch_size=batches[0], image_size=args.sizes[0]),
        Stage("upper", epochs=args.epochs, trainable=middle, train_bn=False, lr={"head": 1e-2, "backbone": 5e-3},
              optimizer="adamw", weight_decay=1e-4, scheduler="plateau", scheduler_kwargs=dict(factor=0.3, patience=1),
              batch_size=batches[1], image_size=args.sizes[1]),
        Stage("lower_lr", epochs=args.epochs, trainable=middle, train_bn=False, lr={"head": 5e-4, "backbone": 3e-4},
              optimizer="adamw", weight_decay=1e-4, early_stopping=dict(patience=2),
              batch_size=batches[2], image_size=args.sizes[2]),
    ]
    criterion = create_criterion("cross_entropy")

    def metrics() -> list:
        return [ClassificationMetrics(len(names))]

    test = ClassificationDataset(test_rows, transform=create_preset("resize", args.sizes[-1]), **data)
    result = StagedRunner().fit(
        model, stages, loaders, criterion, args.logdir, metrics=metrics, valid_metric="accuracy",
        minimize_valid_metric=False, engine=args.device, seed=args.seed, verbose=not args.quiet,
        test_loader=make_loader(test, batches[-1] * 2, train=False, workers=args.workers),
        config={"example": "ford_vs_ferrari", "arch": args.arch, "data": str(root), "classes": names,
                "unfrozen_from": middle, "test_image_size": args.sizes[-1],
                "split": {"train": len(train_rows), "valid": len(valid_rows), "test": len(test_rows)},
                "args": vars(args)},
    ).final_metrics
    print(f"test accuracy {result['test']['accuracy']:.4f}  macro F1 {result['test']['f1_macro']:.4f}  "
          f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; logs in {args.logdir})")
    return result


if __name__ == "__main__":
    run_script(main)
