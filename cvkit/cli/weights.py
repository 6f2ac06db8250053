"""Weights commands: ``cvkit weights import`` (any checkpoint to timm's names) and ``cvkit weights check``.

Both wrap :mod:`cvkit.models.pretrained`; torch and timm are imported only when a command runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from cvkit.cli.base import UsageError, loading, refuse_overwriting_inputs, register_command


def _weights_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    sub.required = True
    imp = sub.add_parser("import", help="map a checkpoint's tensors onto a timm architecture and save safetensors",
                         formatter_class=p.formatter_class)
    imp.add_argument("file", help="the checkpoint: .pth/.pt/.bin (tensors only) or .safetensors")
    imp.add_argument("--arch", required=True, help="the timm architecture it holds, e.g. efficientnet_lite0")
    imp.add_argument("--out", help="safetensors file to write (default: the weights folder's ARCH.safetensors, "
                                   "where pretrained=True looks first)")
    check = sub.add_parser("check", help="print ImageNet's top-5 on sample photos (a cat, a cup of coffee, a temple, "
                                         "a flower) to see the weights work", formatter_class=p.formatter_class)
    check.add_argument("arch", help="the timm architecture, e.g. efficientnet_lite0")
    check.add_argument("--weights", help="a timm state dict with the 1000-class classifier (default: what "
                                         "pretrained=True loads: the weights folder, then packaged weights)")
    check.add_argument("--image", action="append", default=[], metavar="FILE",
                       help="your own photo instead of the samples (repeatable)")


@register_command("weights", "Bring pretrained weights: import any checkpoint onto a timm architecture, or check "
                             "weights on ImageNet sample photos.", _weights_args)
def _weights(args: argparse.Namespace) -> int:
    if args.action == "import":
        return _import(args)
    return _check(args)


def _import(args: argparse.Namespace) -> int:
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file} not found; expected a checkpoint file (.pth, .pt, .bin or .safetensors)")
    loading("torch, timm")
    from cvkit.models.pretrained import import_weights, weights_dir

    out = args.out or weights_dir() / f"{args.arch}.safetensors"
    refuse_overwriting_inputs([out], [args.file], "pass --out with another file")
    print(import_weights(args.file, args.arch, out=out).summary())
    return 0


def _check(args: argparse.Namespace) -> int:
    missing = [f for f in args.image if not Path(f).is_file()]
    if missing:
        raise UsageError(f"--image {missing[0]} not found; expected an image file")
    loading("torch, timm")
    from cvkit.models.pretrained import imagenet_top5, resolve_pretrained, weights_record

    images = {Path(f).name: f for f in args.image} or None
    top5 = imagenet_top5(args.arch, weights=args.weights, images=images)
    record = weights_record(args.weights or resolve_pretrained(args.arch))
    print(f"{args.arch} weights {record['path']} ({record['source']}, sha256 {record['sha256'][:16]}...)")
    width = max(len(name) for name in top5)
    for name, top in top5.items():
        print(f"{name:<{width}}  " + " | ".join(f"{label.split(',')[0]} {prob:.1%}" for label, prob in top))
    return 0
