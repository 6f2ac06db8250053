"""Sports image classification with any timm backbone, selected by macro F1.

Stage 1 trains the classifier on a frozen backbone; stage 2 trains everything with SGD and a
step schedule (LR x 0.8 every 2 epochs). ``--weights`` starts from an earlier run's ``best.pth``
(e.g. to continue training at a larger size). Test predictions go to ``LOGDIR/submission.csv``
(``path,label``, as ``cvkit predict`` writes them); ``--export-dir DIR`` also copies every test image into
``DIR/<predicted class>/`` for a quick look at what the model confuses.

The run is ``CONFIG`` with the command line's choices, built and trained by
:mod:`cvkit.experiment` like ``cvkit train``: ``examples/configs/sports_train.yaml`` is its twin.

Real data (``--data DIR``, Kaggle's "100 Sports Image Classification" layout): class folders
``DIR/train/<class>/*.jpg``, ``DIR/valid/<class>/*.jpg`` and ``DIR/test/<class>/*.jpg``.
Without ``--data`` a demo set is built from scikit-learn's digits (a stratified fifth of train
is valid), and without ``--pretrained`` the backbone starts from weights trained on a label-free
pretext task over the digits (``cvkit.data.demo.demo_pretrained``), standing in for ImageNet weights.

    python examples/sports_train.py                                  # demo, under a minute on 2 CPU cores
    python examples/sports_train.py --data ~/sports --arch efficientnet_b0 --pretrained weights/efficientnet_b0.pth \\
        --image-size 224 --export-dir runs/sports/by_class
"""
from __future__ import annotations

import copy
from pathlib import Path

from _common import common_args, predict_device, run_script
from cvkit.config import load_config
from cvkit.experiment import build_datasets, with_transform
from cvkit.training import run
from cvkit.inference.export import export_by_class
from cvkit.inference import load_run, predict, write_submission

CONFIG = {
    "name": "sports",
    "task": "classification",
    "data": {"kind": "demo", "per_class": 100},
    "model": {"name": "classifier", "arch": "test_convnext", "pretrained": "demo"},
    "augmentation": {"preset": "light", "size": 32},
    "criterion": {"name": "cross_entropy"},
    "valid_metric": "f1_macro",
    "seed": 42,
    "stages": [
        {"name": "head", "epochs": 1, "trainable": "head", "lr": {"head": 0.01}, "optimizer": "adamw",
         "batch_size": 32},
        {"name": "all", "epochs": 20, "trainable": "all", "lr": {"head": 0.05, "backbone": 0.02}, "optimizer": "sgd",
         "optimizer_kwargs": {"nesterov": True}, "weight_decay": 0.0005, "scheduler": "step",
         "scheduler_kwargs": {"step_size": 2, "gamma": 0.8}, "batch_size": 32},
    ],
}


def parse_args(argv=None):
    model, last = CONFIG["model"], CONFIG["stages"][-1]
    p = common_args(__doc__, CONFIG["name"], model["arch"], last["epochs"], last["batch_size"])
    p.add_argument("--weights", type=Path, help="start from this checkpoint (an earlier run's best.pth)")
    p.add_argument("--image-size", type=int, default=CONFIG["augmentation"]["size"])
    p.add_argument("--export-dir", type=Path, help="copy each test image into EXPORT_DIR/<predicted class>/")
    return p.parse_args(argv)


def experiment(args) -> dict:
    """``CONFIG`` with the command line's choices (the defaults give ``CONFIG`` itself)."""
    config = copy.deepcopy(CONFIG)
    config.update(logdir=str(args.logdir), seed=args.seed, engine=args.device, workers=args.workers,
                  weights=str(args.weights) if args.weights else None)
    if args.data is not None:
        config["data"] = {"kind": "folders", **{split: str(args.data / split) for split in ("train", "valid", "test")}}
    config["data"].update({"limit": args.limit} if args.limit else {})
    config["model"].update(arch=args.arch, pretrained=args.pretrained or ("demo" if args.data is None else None))
    config["augmentation"]["size"] = args.image_size
    for stage in config["stages"]:
        stage["batch_size"] = args.batch_size
    config["stages"][-1]["epochs"] = args.epochs
    return config


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(load_config(experiment(args)), verbose=not args.quiet)  # checked and resolved as `cvkit train` does
    trained = load_run(args.logdir)  # the run's model with its best weights, and its class names
    test = with_transform(build_datasets(trained.config)["test"], trained.transform())
    predictions = predict(trained.model, test, "classification", batch_size=128, workers=args.workers,
                          device=predict_device(args))
    submission = write_submission(predictions, "classification", trained.classes, out=args.logdir / "submission.csv")
    if args.export_dir:
        export_by_class([test.path(p.index) for p in predictions], submission["label"].tolist(), args.export_dir)
    print(f"test macro F1 {result['test']['f1_macro']:.4f}  accuracy {result['test']['accuracy']:.4f}  "
          f"(best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; "
          f"submission in {args.logdir / 'submission.csv'})")
    return result


if __name__ == "__main__":
    run_script(main)
