"""Deployment command: ``cvkit export`` (ONNX / TorchScript with a parity check; :mod:`cvkit.export`)."""
from __future__ import annotations

import argparse

from cvkit.cli.base import UsageError, register_command


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder to export (its config.json and best.pth)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format of the export")
    p.add_argument("--image-size", type=int, help="network input size (default: the run's last stage size)")
    p.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: batch 1)")
    p.add_argument("--out", help="model file to write (default: RUN/export/model.onnx or model.pt); "
                                 "the contract goes beside it as <file>.json")


@register_command("export", "Export a run's best.pth to ONNX or TorchScript, checked against PyTorch on valid "
                            "images, with a JSON contract beside it.", _export_args)
def _export(args: argparse.Namespace) -> int:
    from cvkit.export import export_run

    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    report = export_run(args.run, args.format, image_size=args.image_size, dynamic_batch=args.dynamic_batch,
                        out=args.out)
    print(report.summary())
    return 0
