"""Deployment command: ``cvkit export`` (ONNX / TorchScript with a parity check; :mod:`cvkit.export`)."""
from __future__ import annotations

import argparse

from cvkit.cli.base import loading, register_command


def _image_size(text: str) -> int:
    """``--image-size``: refused at argument time outside cvkit.export's size range (one line)."""
    loading("torch, timm")
    from cvkit.export import ExportError, check_image_size

    try:
        return check_image_size(int(text), "value")
    except ExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None


def _tolerance(text: str) -> float:
    """``--atol`` / ``--rtol``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number >= 0")
    return value


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run folder to export (its config.json and best.pth)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format of the export")
    p.add_argument("--image-size", type=_image_size, help="network input size in pixels, 8 to 4096 "
                                                          "(default: the run's last stage size)")
    p.add_argument("--dynamic-batch", action="store_true", help="accept any batch size (default: batch 1)")
    p.add_argument("--out", help="model file to write (default: RUN/export/model.onnx or model.pt); "
                                 "the contract goes beside it as <file>.json")
    p.add_argument("--atol", type=_tolerance, help="parity: absolute part of |exported - PyTorch| <= atol + rtol x "
                                                   "max |PyTorch| of the image (default: per compared quantity)")
    p.add_argument("--rtol", type=_tolerance, help="parity: relative part, a fraction of the image's largest "
                                                   "|PyTorch| output (default: cvkit.export.RTOL, 1e-4)")


@register_command("export", "Export a run's best.pth to ONNX or TorchScript, checked against PyTorch on valid "
                            "images, with a JSON contract beside it.", _export_args)
def _export(args: argparse.Namespace) -> int:
    loading("torch, timm")
    from cvkit.export import RTOL, export_run

    report = export_run(args.run, args.format, image_size=args.image_size, dynamic_batch=args.dynamic_batch,
                        out=args.out, atol=args.atol, rtol=RTOL if args.rtol is None else args.rtol)
    print(report.summary())
    return 0
