"""Classification with localisation: one class and one box per image (a ClassBoxModel).

Stage v1 trains the two heads on a frozen backbone with early stopping (box loss weight 75);
stage v2 starts from v1's best, unfreezes the last two backbone blocks at a lower LR and raises
the box weight to 100. Selection metric: mean box IoU on valid (the loss changes between stages).

Real data (``--data DIR``): ``DIR/train.csv`` with ``path,label,x1,y1,x2,y2`` (box corners in
pixels of the image, ``path`` relative to ``DIR``) and ``DIR/test.csv`` with ``path`` (plus the
same columns if the test set is labelled: then it is also evaluated). Predictions (file name, class
and box in pixels of the original image: ``path,label,x1,y1,x2,y2``, as ``cvkit predict`` writes
them) go to ``LOGDIR/predictions.csv``. Without ``--data`` a demo set in that layout is built
from scikit-learn's digits (one digit pasted on a 96x96 canvas).
Without ``--pretrained``, the demo's backbone starts from weights trained on a label-free pretext
task over the digits (``cvkit.data.demo.demo_pretrained``), standing in for ImageNet weights.

    python examples/localization_train.py                  # demo, about two minutes on 2 CPU cores
    python examples/localization_train.py --data ~/pets --arch resnet34 --pretrained weights/resnet34.pth
"""
from __future__ import annotations

import albumentations as A
import pandas as pd
import torch

from _common import common_args, predict_device, run_script, starting_weights
from cvkit.callbacks.criterion import SetCriterionAttribute
from cvkit.data import BoxDataset, OneWarp, compose, create_preset, limit_items, split_train_valid
from cvkit.data.demo import build_boxes
from cvkit.data.loaders import make_loader
from cvkit.inference import predict, write_submission
from cvkit.losses import ClassBoxCriterion
from cvkit.metrics import BoxMetrics
from cvkit.models import ClassBoxModel
from cvkit.models.groups import main_blocks
from cvkit.runners import StagedRunner
from cvkit.stages import Stage
from cvkit.tasks import ClassBoxTargets

BOX_COLS = ["x1", "y1", "x2", "y2"]
BOX_WEIGHT = {"v1": 75.0, "v2": 100.0}


def parse_args(argv=None):
    p = common_args(__doc__, "localization", arch="test_resnet", epochs=20, batch_size=16)
    p.add_argument("--head-epochs", type=int, default=8, help="maximum epochs of stage v1 (early stopping may end it)")
    p.add_argument("--image-size", type=int, default=64)
    return p.parse_args(argv)


def train_transform(size: int) -> A.Compose:
    return compose([OneWarp((size, size), mode="resize", hflip=0.5, affine=0.5, affine_scale=(0.9, 1.1),
                            translate_percent=(-0.05, 0.05)), A.RandomBrightnessContrast(p=0.3)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = args.data or build_boxes(args.logdir.parent / "demo_data" / "boxes", seed=0, per_class=80)
    table, test_table = pd.read_csv(root / "train.csv"), pd.read_csv(root / "test.csv")
    classes = {name: i for i, name in enumerate(sorted(table["label"].unique()))}
    table, test_table = limit_items(table, args.limit, label_col="label"), limit_items(test_table, args.limit)
    train_rows, valid_rows = split_train_valid(table, 0.2, "label", seed=args.seed)
    names = sorted(classes, key=classes.get)
    boxes = dict(root=root, box_cols=BOX_COLS, class_map=classes)
    plain = create_preset("resize", args.image_size)

    def loaders(stage: Stage) -> dict:
        train = ClassBoxTargets(BoxDataset(train_rows, transform=train_transform(args.image_size), **boxes))
        valid = ClassBoxTargets(BoxDataset(valid_rows, transform=plain, **boxes))
        return {"train": make_loader(train, args.batch_size, train=True, workers=args.workers, seed=args.seed),
                "valid": make_loader(valid, args.batch_size * 2, train=False, workers=args.workers)}

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
        test_loader=make_loader(test, 64, train=False, workers=args.workers) if test else None,
        config={"example": "localization", "arch": args.arch, "data": str(root), "classes": names,
                "box_weight": BOX_WEIGHT, "args": vars(args)},
    )
    predictions = predict(model, [root / path for path in test_table["path"]], "class_box", classes=names,
                          transform=plain, image_size=args.image_size, batch_size=64, workers=args.workers,
                          device=predict_device(args))
    write_submission(predictions, "class_box", names, out=args.logdir / "predictions.csv")
    result = runner.final_metrics
    if "test" in result:
        test_m = result["test"]
        print(f"test accuracy {test_m['accuracy']:.4f}  macro F1 {test_m['f1_macro']:.4f}  "
              f"box IoU {test_m['box_iou']:.4f}", end="  ")
    print(f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; "
          f"predictions in {args.logdir / 'predictions.csv'})")
    return result


if __name__ == "__main__":
    run_script(main)
