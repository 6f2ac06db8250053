"""Severstal steel defects: an smp U-Net with one mask per defect class, and an RLE submission.
Decoder and head on a frozen encoder, then everything; Dice + BCE; the best epoch has the best pooled valid Dice;
per-class threshold and minimum areas are then tuned on valid for ``dice_image`` (the leaderboard's Dice per image and
class; ``postprocess.json``). Test images: flip TTA, written with that tuning (``ImageId,EncodedPixels,ClassId``)
exactly as ``cvkit predict --tta hflip`` writes them; their Dice on a labelled test split: ``test_flip_tta.json``.
``CONFIG`` is trained by :mod:`cvkit.experiment` as ``cvkit train`` does (twin: configs/steel_segmentation_train.yaml).
``--data DIR``: Severstal's ``train.csv``, ``train_images/``, ``test_images/``; without it, digits 0-3 (classes 1-4).

    python examples/steel_segmentation_train.py                   # demo, about a minute on 2 CPU cores
    python examples/steel_segmentation_train.py --data ~/severstal --encoder resnet34 \\
        --encoder-weights weights/resnet34.pth --image-size 256 --width 1600 --overlays
"""
from __future__ import annotations

import copy
from pathlib import Path

import albumentations as A
import pandas as pd
import torch

from _common import common_args, predict_device, run_script
from cvkit.config import load_config
from cvkit.data import OneWarp, compose, create_preset, limit_items, transform_to_dict
from cvkit.data.io import read_image
from cvkit.experiment import build_datasets, with_transform
from cvkit.training import run
from cvkit.inference import list_images, load_run, predict, write_submission
from cvkit.io import atomic_write_bytes, atomic_write_json
from cvkit.metrics import SegmentationMetrics
from cvkit.plots import write_png
from cvkit.tasks import get_task, mask_overlay, read_rle_table


def train_transform(h: int, w: int) -> A.Compose:
    return compose([OneWarp((h, w), mode="resize", hflip=0.5), A.VerticalFlip(p=0.5), A.RandomBrightnessContrast(p=0.3)])


CONFIG = {  # the experiment; examples/configs/steel_segmentation_train.yaml holds the same one
    "name": "steel_segmentation", "task": "segmentation", "data": {"kind": "demo", "per_class": 25},
    "model": {"name": "segmentation", "encoder": "tu-test_resnet", "encoder_weights_path": None},
    "augmentation": transform_to_dict(train_transform(64, 64)), "criterion": {"name": "dice_bce"},
    "valid_metric": "dice", "seed": 42, "stages": [
        {"name": "decoder", "epochs": 2, "trainable": "head", "lr": {"head": 0.01}, "optimizer": "adamw",
         "batch_size": 8},
        {"name": "all", "epochs": 16, "trainable": "all", "lr": {"head": 0.005, "backbone": 0.003},
         "optimizer": "adamw", "weight_decay": 0.0001, "scheduler": "cosine", "batch_size": 8}]}


def parse_args(argv=None):
    first, last = CONFIG["stages"]
    p = common_args(__doc__, CONFIG["name"], None, last["epochs"], last["batch_size"])
    p.add_argument("--encoder", default=CONFIG["model"]["encoder"], help="smp encoder (resnet18...) or tu-<timm name>")
    p.add_argument("--encoder-weights", help="local encoder weights file (nothing is downloaded)")
    p.add_argument("--head-epochs", type=int, default=first["epochs"], help="epochs with the encoder frozen")
    p.add_argument("--image-size", type=int, default=64, help="training height (a multiple of 32)")
    p.add_argument("--width", type=int, default=None, help="training width (default: --image-size)")
    p.add_argument("--threshold", type=float, help="probability above which a pixel is a defect (default: tuned)")
    p.add_argument("--overlays", action="store_true", help="write LOGDIR/overlays/<image>.png with the predicted masks")
    return p.parse_args(argv)


def severstal_train_table(data: Path, logdir: Path) -> str:
    """Severstal's train.csv lists defective images only: every other train image joins with an empty mask."""
    frame, out = read_rle_table(data / "train.csv"), logdir / "train_all_images.csv"
    unlisted = sorted(set(list_images(data / "train_images")[1]) - set(frame["ImageId"].astype(str)))
    empty = pd.DataFrame({"ImageId": unlisted, "ClassId": 1, "EncodedPixels": ""})
    atomic_write_bytes(out, pd.concat([frame, empty]).to_csv(index=False).encode())
    return str(out)


def experiment(args) -> dict:
    """``CONFIG`` with the command line's choices (the defaults give ``CONFIG`` itself)."""
    config, size = copy.deepcopy(CONFIG), (args.image_size, args.width or args.image_size)
    config.update(logdir=str(args.logdir), seed=args.seed, engine=args.device, workers=args.workers)
    if args.data is not None:
        config["data"] = {"kind": "csv", "rle": True, "train": severstal_train_table(args.data, args.logdir),
                          "root": str(args.data / "train_images"), "num_classes": 4}
    config["data"].update({"limit": args.limit} if args.limit else {})
    config["model"].update(encoder=args.encoder, encoder_weights_path=args.encoder_weights)
    config["augmentation"] = transform_to_dict(train_transform(*size))
    if size[0] != size[1]:  # augmentation.size is square: record each stage's rectangular pipelines instead
        config["pipelines"] = {s["name"]: {"train": config["augmentation"], "eval": transform_to_dict(
            create_preset("resize", size))} for s in config["stages"]}
    for stage, epochs in zip(config["stages"], (args.head_epochs, args.epochs)):
        stage.update(epochs=epochs, batch_size=args.batch_size)
    return config


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(load_config(experiment(args)), verbose=not args.quiet)  # checked and resolved as `cvkit train` does
    trained = load_run(args.logdir)  # the run's model with its best weights
    plain, test = trained.transform(), build_datasets(trained.config).get("test")
    files = ([test.path(i) for i in range(len(test))] if test is not None
             else limit_items(list_images(args.data / "test_images")[0], args.limit))
    predictions = predict(trained.model, files, "segmentation", tta=["hflip"], transform=plain, batch_size=16,
                          image_size=args.image_size, workers=args.workers, device=predict_device(args))
    tuning, threshold = (trained.tuning, 0.5) if args.threshold is None else (None, args.threshold)
    write_submission(predictions, "segmentation", out=args.logdir / "submission.csv", threshold=threshold, tuning=tuning)
    for p in predictions if args.overlays else ():
        mask = get_task("segmentation").masks(p.decode("segmentation"), threshold, tuning)
        write_png(args.logdir / "overlays" / f"{Path(p.name).stem}.png", mask_overlay(read_image(files[p.index]), mask))
    if test is not None:
        tta, test = SegmentationMetrics(trained.config["model"]["num_classes"]), with_transform(test, plain)
        tta.update(torch.logit(torch.stack([p.output for p in predictions]).clamp(1e-6, 1 - 1e-6)),
                   torch.stack([test[p.index]["targets"] for p in predictions]))
        result["test_flip_tta"] = tta.compute()
        atomic_write_json(args.logdir / "test_flip_tta.json", result["test_flip_tta"])  # metrics.json is the run's
        print(f"test Dice {result['test']['dice']:.4f} (IoU {result['test']['iou']:.4f}); with flip TTA "
              f"{result['test_flip_tta']['dice']:.4f} (IoU {result['test_flip_tta']['iou']:.4f})", end="  ")
    post = result["postprocess"]  # dice_image on valid, plain 0.5 threshold -> tuned post-processing
    print(f"valid dice_image {post['before']:.4f} -> {post['after']:.4f} tuned (best: stage {result['best']['stage']!r}, epoch {result['best']['epoch']}; submission in {args.logdir})")
    return result


if __name__ == "__main__":
    run_script(main)
