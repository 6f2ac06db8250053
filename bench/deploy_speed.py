"""Deployment speed on CPU: images/s of ONNX Runtime vs PyTorch for each demo model at the examples' input
sizes (batch 1 and 32), and tiled vs whole-image mask prediction on a 1600x256 image.

Models are the demo configs' architectures with seeded random weights (speed does not depend on
training); both runtimes use one thread. Each number is the best of ``--repeats`` timed rounds
after a warm-up, model forward only (no image decoding).

    python bench/deploy_speed.py --write      # table into bench/RESULTS.md (about a minute)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADING = "## Deployment speed (ONNX Runtime vs PyTorch, CPU)"
COMMAND = "python bench/deploy_speed.py --write"
# (task, model builder kwargs, the example's input size)
MODELS = [
    ("classification", {"name": "classifier", "arch": "test_resnet", "num_classes": 10}, 48),
    ("class_box", {"name": "class_box", "arch": "test_resnet", "num_classes": 10}, 64),
    ("keypoints", {"name": "keypoints", "arch": "test_resnet", "num_keypoints": 5}, 64),
    ("segmentation", {"name": "segmentation", "encoder": "tu-test_resnet", "architecture": "Unet",
                      "decoder_channels": [32, 16, 8, 8, 8], "num_classes": 4}, 64),
]


def best_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.2) -> float:
    """Best seconds per call over ``repeats`` rounds, each at least ``min_seconds`` long, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def runtime_rows(repeats: int) -> List[str]:
    from cvkit.export import export_model
    from cvkit.inference.runtime import ExportedModel
    from cvkit.models.tasks import create_task_model

    rows = []
    for task, spec, size in MODELS:
        spec = dict(spec)
        torch.manual_seed(0)
        model = create_task_model(spec.pop("name"), **spec).eval()
        onnx = ExportedModel(export_model(model, torch.randn(1, 3, size, size), "onnx", dynamic_batch=True), "onnx",
                             threads=1)
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size)
            with torch.no_grad():
                torch_s = best_time(lambda: model(x), repeats)
            onnx_s = best_time(lambda: onnx(x), repeats)
            rows.append(f"| {task} | {size} | {batch} | {batch / torch_s:,.0f} | {batch / onnx_s:,.0f} | "
                        f"{torch_s / onnx_s:.2f}x |")
    return rows


def tiled_rows(repeats: int) -> List[str]:
    from cvkit.inference.tiled import tiled_predict, window_starts
    from cvkit.inference.tta import tta_predict
    from cvkit.models.tasks import create_task_model

    task, spec, _ = MODELS[-1]
    spec = dict(spec)
    torch.manual_seed(0)
    model = create_task_model(spec.pop("name"), **spec).eval()
    image = torch.randn(3, 256, 1600)
    whole = best_time(lambda: tta_predict(model, image[None], ["identity"], target="mask"), repeats)
    rows = [f"| whole image | 1 | {whole * 1000:.0f} | 1.00x |"]
    for tile, overlap, batch in ((512, 64, 8), (256, 32, 8), (256, 32, 1)):
        seconds = best_time(lambda: tiled_predict(model, image, tile, overlap, batch_size=batch), repeats)
        rows.append(f"| tile {tile}, overlap {overlap}, {batch} tiles/batch | "
                    f"{len(window_starts(1600, tile, overlap))} | {seconds * 1000:.0f} | {seconds / whole:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per number (the best is kept)")
    parser.add_argument("--write", action="store_true", help="replace the section in bench/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    speed = runtime_rows(args.repeats)
    tiled = tiled_rows(args.repeats)
    import onnxruntime

    section = "\n".join([
        HEADING, "",
        f"`{COMMAND}` ({time.perf_counter() - start:.0f} s; torch {torch.__version__.split('+')[0]}, onnxruntime "
        f"{onnxruntime.__version__}, one CPU thread each, seeded random weights, forward only).", "",
        "| task | input | batch | PyTorch img/s | ONNX Runtime img/s | ORT speed-up |",
        "|---|---|---|---|---|---|", *speed, "",
        "Segmentation (smp Unet, tu-test_resnet) on one 256x1600 image (Severstal's size), PyTorch, no TTA:", "",
        "| how | windows | ms | vs whole |", "|---|---|---|---|", *tiled, "",
    ])
    print(section)
    if args.write:
        from results import replace_section

        replace_section(HEADING, section)


if __name__ == "__main__":
    main()
