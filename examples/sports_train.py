"""Sports image classification with any timm backbone, selected by macro F1.

Stage 1 trains the classifier on a frozen backbone; stage 2 trains everything with SGD and a
step schedule (LR x 0.8 every 2 epochs). ``--weights`` starts from an earlier run's ``best.pth``
(e.g. to continue training at a larger size). Test predictions go to ``LOGDIR/submission.csv``
(``path,label,probability``); ``--export-dir DIR`` also copies every test image into
``DIR/<predicted class>/`` for a quick look at what the model confuses.

Real data (``--data DIR``, Kaggle's "100 Sports Image Classification" layout): class folders
``DIR/train/<class>/*.jpg``, ``DIR/valid/<class>/*.jpg`` and ``DIR/test/<class>/*.jpg``.
Without ``--data`` a demo set is built from scikit-learn's digits (ten classes of 32x32 JPEGs,
``train.csv``/``test.csv`` with ``path,label``; valid is a stratified fifth of train).
Without ``--pretrained``, the demo's backbone starts from weights trained on a label-free pretext
task over the digits (``cvkit.examples_support.demo_pretrained``), standing in for ImageNet weights.

    python examples/sports_train.py                                  # demo, under a minute on 2 CPU cores
    python examples/sports_train.py --data ~/sports --arch efficientnet_b0 --pretrained weights/efficientnet_b0.pth \\
        --image-size 224 --export-dir runs/sports/by_class
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from cvkit.data import ClassificationDataset, create_preset, split_train_valid
from cvkit.data.demo import build_classification
from cvkit.examples_support import (common_args, export_by_class, load_weights, predict, starting_weights,
                                    train_valid_loaders, write_table)
from cvkit.losses import create_criterion
from cvkit.metrics import ClassificationMetrics
from cvkit.models import create_model
from cvkit.runners import StagedRunner
from cvkit.stages import Stage


def parse_args(argv=None):
    p = common_args(__doc__, "sports", arch="test_convnext", epochs=20, batch_size=32)
    p.add_argument("--weights", type=Path, help="start from this checkpoint (an earlier run's best.pth)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--export-dir", type=Path, help="copy each test image into EXPORT_DIR/<predicted class>/")
    return p.parse_args(argv)


def datasets(args, train_tf, plain):
    """(train, valid, test) ClassificationDatasets sharing one class map."""
    if args.data is not None:
        train = ClassificationDataset.from_folders(args.data / "train", transform=train_tf)
        valid = ClassificationDataset.from_folders(args.data / "valid", class_map=train.class_map, transform=plain)
        test = ClassificationDataset.from_folders(args.data / "test", class_map=train.class_map, transform=plain)
    else:
        root = build_classification(args.logdir.parent / "demo_data" / "classification", seed=0, per_class=100)
        train_rows, valid_rows = split_train_valid(root / "train.csv", 0.2, "label", seed=args.seed)
        classes = root / "encode_classes.json"
        train = ClassificationDataset(train_rows, root=root, class_map=classes, transform=train_tf)
        valid = ClassificationDataset(valid_rows, root=root, class_map=classes, transform=plain)
        test = ClassificationDataset(root / "test.csv", class_map=classes, transform=plain)
    if args.limit:
        train = train.subset(range(0, len(train), max(1, len(train) // args.limit))[: args.limit])
        test = test.subset(range(0, len(test), max(1, len(test) // args.limit))[: args.limit])
    return train, valid, test


def main(argv=None) -> dict:
    args = parse_args(argv)
    plain = create_preset("resize", args.image_size)
    train, valid, test = datasets(args, create_preset("light", args.image_size), plain)
    names = sorted(train.class_map, key=train.class_map.get)
    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = create_model(args.arch, num_classes=len(names), pretrained=starting_weights(args))
    load_weights(model, args.weights)
    stages = [
        Stage("head", epochs=1, trainable="head", lr={"head": 1e-2}, optimizer="adamw"),
        Stage("all", epochs=args.epochs, trainable="all", lr={"head": 0.05, "backbone": 0.02}, optimizer="sgd",
              optimizer_kwargs=dict(nesterov=True), weight_decay=5e-4,
              scheduler="step", scheduler_kwargs=dict(step_size=2, gamma=0.8)),
    ]
    runner = StagedRunner().fit(
        model, stages, train_valid_loaders(train, valid, args.batch_size, args.workers, args.seed),
        create_criterion("cross_entropy"), args.logdir, metrics=lambda: [ClassificationMetrics(len(names))],
        valid_metric="f1_macro", minimize_valid_metric=False, engine=args.device, seed=args.seed,
        verbose=not args.quiet, test_loader=DataLoader(test, 128),
        config={"example": "sports", "arch": args.arch, "data": str(args.data or "demo"), "classes": names,
                "weights": str(args.weights), "args": vars(args)},
    )
    probs, index = predict(model, DataLoader(test, 128, num_workers=args.workers))
    probs = probs.softmax(dim=1)
    labels = [names[k] for k in probs.argmax(dim=1).tolist()]
    write_table(pd.DataFrame({"path": [str(test.frame.at[i, "path"]) for i in index], "label": labels,
                              "probability": probs.max(dim=1).values.numpy().round(4)}), args.logdir / "submission.csv")
    if args.export_dir:
        export_by_class([test.path(i) for i in index], labels, args.export_dir)
    result = runner.final_metrics
    print(f"test macro F1 {result['test']['f1_macro']:.4f}  accuracy {result['test']['accuracy']:.4f}  "
          f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; "
          f"submission in {args.logdir / 'submission.csv'})")
    return result


if __name__ == "__main__":
    main()
