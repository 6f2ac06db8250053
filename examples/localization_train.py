"""Classification with localisation: one class and one box per image (a ClassBoxModel).

Stage v1 trains the two heads on a frozen backbone with early stopping (box loss weight 75);
stage v2 starts from v1's best, unfreezes the last two backbone blocks at a lower LR and raises
the box weight to 100. Selection metric: mean box IoU on valid (the loss changes between stages).

Real data (``--data DIR``): ``DIR/train.csv`` with ``path,label,x1,y1,x2,y2`` (box corners in
pixels of the image, ``path`` relative to ``DIR``) and ``DIR/test.csv`` with ``path`` (plus the
same columns if the test set is labelled: then it is also evaluated). Predictions (class and box
in pixels of the original image) go to ``LOGDIR/predictions.csv``. Without ``--data`` a demo set
in that layout is built from scikit-learn's digits (one digit pasted on a 96x96 canvas).
Without ``--pretrained``, the demo's backbone starts from weights trained on a label-free pretext
task over the digits (``cvkit.examples_support.demo_pretrained``), standing in for ImageNet weights.

    python examples/localization_train.py                  # demo, about two minutes on 2 CPU cores
    python examples/localization_train.py --data ~/pets --arch resnet34 --pretrained weights/resnet34.pth
"""
from __future__ import annotations

import albumentations as A
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cvkit.data import BoxDataset, FastAffine, compose, create_preset, split_train_valid
from cvkit.data.demo import build_boxes
from cvkit.examples_support import (ClassBoxCriterion, ClassBoxTargets, SetCriterionAttribute, UnlabelledImages,
                                    common_args, image_sizes, main_blocks, predict, starting_weights,
                                    train_valid_loaders, write_table)
from cvkit.metrics import BoxMetrics
from cvkit.models import ClassBoxModel, split_output
from cvkit.runners import StagedRunner
from cvkit.stages import Stage

BOX_COLS = ["x1", "y1", "x2", "y2"]
BOX_WEIGHT = {"v1": 75.0, "v2": 100.0}


def parse_args(argv=None):
    p = common_args(__doc__, "localization", arch="test_resnet", epochs=20, batch_size=16)
    p.add_argument("--head-epochs", type=int, default=8, help="maximum epochs of stage v1 (early stopping may end it)")
    p.add_argument("--image-size", type=int, default=64)
    return p.parse_args(argv)


def train_transform(size: int) -> A.Compose:
    return compose([A.Resize(size, size), A.HorizontalFlip(p=0.5),
                    FastAffine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), p=0.5),
                    A.RandomBrightnessContrast(p=0.3)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or build_boxes(args.logdir.parent / "demo_data" / "boxes", seed=0, per_class=80)
    table, test_table = pd.read_csv(root / "train.csv"), pd.read_csv(root / "test.csv")
    classes = {name: i for i, name in enumerate(sorted(table["label"].unique()))}
    if args.limit:
        table, test_table = table.sample(frac=1, random_state=0).head(args.limit), test_table.head(args.limit)
    train_rows, valid_rows = split_train_valid(table, 0.2, "label", seed=args.seed)
    names = sorted(classes, key=classes.get)
    boxes = dict(root=root, box_cols=BOX_COLS, class_map=classes)
    plain = create_preset("resize", args.image_size)

    def loaders(stage: Stage) -> dict:
        train = ClassBoxTargets(BoxDataset(train_rows, transform=train_transform(args.image_size), **boxes))
        valid = ClassBoxTargets(BoxDataset(valid_rows, transform=plain, **boxes))
        return train_valid_loaders(train, valid, args.batch_size, args.workers, args.seed)

    torch.manual_seed(args.seed)  # the same seed gives the same initial weights
    model = ClassBoxModel(args.arch, len(classes), pretrained=starting_weights(args), dropout=0.2)
    stages = [
        Stage("v1", epochs=args.head_epochs, trainable="head", lr={"head": 1e-2}, optimizer="adamw",
              early_stopping=dict(patience=3, min_delta=1e-3)),
        Stage("v2", epochs=args.epochs, trainable=main_blocks(model)[-2], lr={"head": 3e-3, "backbone": 2e-3},
              optimizer="adamw", weight_decay=1e-4, scheduler="cosine"),
    ]
    labelled = {"label", *BOX_COLS} <= set(test_table.columns)
    test = ClassBoxTargets(BoxDataset(test_table, transform=plain, **boxes)) if labelled else None
    runner = StagedRunner().fit(
        model, stages, loaders, ClassBoxCriterion(len(classes), BOX_WEIGHT["v1"]), args.logdir,
        metrics=lambda: [BoxMetrics(len(classes))], valid_metric="box_iou", minimize_valid_metric=False,
        callbacks=lambda stage: [SetCriterionAttribute("box_weight", BOX_WEIGHT[stage.name])],
        engine=args.device, seed=args.seed, verbose=not args.quiet,
        test_loader=DataLoader(test, 64) if test else None,
        config={"example": "localization", "arch": args.arch, "data": str(root), "classes": names,
                "box_weight": BOX_WEIGHT, "args": vars(args)},
    )
    images = UnlabelledImages(test_table, root=root, transform=plain)
    out, index = predict(model, DataLoader(images, 64, num_workers=args.workers))
    logits, box = split_output(out, len(classes))
    probs = logits.softmax(dim=1)
    sizes = torch.tensor(image_sizes(images.path(i) for i in index), dtype=torch.float32).repeat(1, 2)
    pixels = (box * sizes).numpy().round(1)
    frame = pd.DataFrame({"path": images.frame["path"].iloc[index].to_numpy(),
                          "label": [names[k] for k in probs.argmax(dim=1).tolist()],
                          "probability": probs.max(dim=1).values.numpy().round(4),
                          **{col: pixels[:, k] for k, col in enumerate(BOX_COLS)}})
    write_table(frame, args.logdir / "predictions.csv")
    result = runner.final_metrics
    if "test" in result:
        test_m = result["test"]
        print(f"test accuracy {test_m['accuracy']:.4f}  macro F1 {test_m['f1_macro']:.4f}  "
              f"box IoU {test_m['box_iou']:.4f}", end="  ")
    print(f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; "
          f"predictions in {args.logdir / 'predictions.csv'})")
    return result


if __name__ == "__main__":
    main()
