"""Data throughput: JPEG decode + ``medium`` augmentation + to-tensor at 224x224, images/s on one core.

Five arms read the same JPEG files, taking turns every 10 images, repeated (the median is reported):
(a) the floor: OpenCV decode + resize to 224x224, nothing else;
(b) cvkit: ``ClassificationDataset`` with ``create_preset("medium", 224)``, i.e. what a DataLoader
    worker runs: the JPEG header's size, the crop / flip / affine drawn from it, a reduced decode
    (1/2, 1/4, 1/8) where no output pixel gets upsampled, one warp, brightness/contrast, blur,
    NormalizeToTensor;
(c) cvkit before: the same dataset with the step-by-step pipeline ``medium`` was until the one warp
    (full decode, RandomResizedCrop, HorizontalFlip, FastAffine, the same colour steps);
(d) OpenCV by hand: the step-by-step pipeline written directly in OpenCV, no framework, image only;
(e) torchvision/PIL: the same steps with ``torchvision.transforms`` on PIL images.
One thread everywhere (OpenCV, torch), so the numbers are per core: multiply by DataLoader workers.

    python bench/data_throughput.py --write
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import cv2
import numpy as np
import pandas as pd
import torch

HEADING = "## Data throughput"


def make_jpegs(folder: Path, n: int, width: int, height: int, seed: int = 0) -> List[Path]:
    """Photo-like JPEGs (smooth colour fields, edges and noise, quality 90) so decode cost is realistic."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, [width, height]))
            cv2.circle(image, (x, y), int(rng.integers(10, height // 3)), rng.integers(0, 256, 3).tolist(), -1)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:04d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def floor_arm(paths: List[Path], size: int) -> Callable[[int], object]:
    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
    return lambda i: cv2.resize(cv2.imread(str(paths[i]), flag), (size, size), interpolation=cv2.INTER_LINEAR)


def cvkit_arm(paths: List[Path], size: int, transform: object = None) -> Callable[[int], object]:
    """Items of a ClassificationDataset over ``paths`` with ``transform`` (default: the ``medium`` preset)."""
    from cvkit.data.augment import create_preset
    from cvkit.data.datasets import ClassificationDataset

    frame = pd.DataFrame({"path": [p.name for p in paths], "label": ["x"] * len(paths)})
    transform = transform if transform is not None else create_preset("medium", size)
    dataset = ClassificationDataset(frame, root=paths[0].parent, transform=transform)
    return lambda i: dataset[i]["features"]


def step_by_step_medium(size: int) -> object:
    """``medium`` as it was before the one warp: crop + resize, flip and affine as separate steps."""
    import albumentations as A

    from cvkit.data.augment import FastAffine, compose

    return compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0)),
        A.HorizontalFlip(p=0.5),
        FastAffine(scale=(0.9, 1.1), translate_percent=(-0.0625, 0.0625), rotate=(-15, 15),
                   border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.OneOf([A.Blur(blur_limit=3), A.GaussianBlur(blur_limit=(3, 5))], p=0.2),
    ])


def opencv_arm(paths: List[Path], size: int) -> Callable[[int], object]:
    """The preset's steps written straight in OpenCV, no framework: what any Python pipeline could reach.

    Same probabilities and ranges as ``medium`` (crop, flip, affine warped as RGBA, brightness /
    contrast as one LUT, 3x3 blur, normalise by per-plane LUT); no targets besides the image.
    """
    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
    rng = np.random.default_rng(0)
    shift = np.array([0.485, 0.456, 0.406]) * 255.0
    scale = 1.0 / (np.array([0.229, 0.224, 0.225]) * 255.0)
    luts = ((np.arange(256)[None, :] - shift[:, None]) * scale[:, None]).astype(np.float32)
    levels = np.arange(256, dtype=np.float64)

    def run(i: int) -> object:
        image = cv2.imread(str(paths[i]), flag)
        height, width = image.shape[:2]
        area = height * width * rng.uniform(0.6, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w, h = min(width, round(np.sqrt(area * ratio))), min(height, round(np.sqrt(area / ratio)))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out = cv2.resize(image[y:y + h, x:x + w], (size, size), interpolation=cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            out = cv2.flip(out, 1)
        if rng.random() < 0.5:
            matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-15, 15), rng.uniform(0.9, 1.1))
            matrix[:, 2] += rng.uniform(-0.0625, 0.0625, 2) * size
            rgba = cv2.warpAffine(cv2.cvtColor(out, cv2.COLOR_RGB2RGBA), matrix, (size, size))
            out = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
        if rng.random() < 0.5:
            lut = levels * rng.uniform(0.8, 1.2) + rng.uniform(-0.2, 0.2) * 255
            out = cv2.LUT(out, np.clip(lut, 0, 255).astype(np.uint8))
        if rng.random() < 0.2:
            out = cv2.blur(out, (3, 3))
        tensor = torch.empty((3, size, size))
        planes = tensor.numpy()
        for plane, lut, dst in zip(cv2.split(out), luts, planes):
            cv2.LUT(plane, lut, dst=dst)
        return tensor

    return run


def torchvision_arm(paths: List[Path], size: int) -> Callable[[int], object]:
    from PIL import Image
    from torchvision import transforms as T

    pipeline = T.Compose([
        T.RandomResizedCrop(size, scale=(0.6, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomAffine(15, translate=(0.0625, 0.0625), scale=(0.9, 1.1))], p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
        T.RandomApply([T.GaussianBlur(3)], p=0.2),
        T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])

    def run(i: int) -> object:
        with Image.open(paths[i]) as image:
            return pipeline(image.convert("RGB"))

    return run


def measure(arms: Dict[str, Callable[[int], object]], n: int, chunk: int = 10) -> Dict[str, float]:
    """Images per second of each arm over ``n`` items, the arms taking turns every ``chunk`` images.

    Short turns (a few tens of ms, first arm rotating) expose every arm to the same bursts of a
    noisy shared machine, which whole-arm runs of a second did not; ``chunk`` images in a row keep
    each arm's own caches warm, as in a DataLoader worker.
    """
    names = list(arms)
    for fn in arms.values():
        fn(0), fn(1)
    spent = dict.fromkeys(names, 0.0)
    for turn, first in enumerate(range(0, n, chunk)):
        items = range(first, min(first + chunk, n))
        for k in range(len(names)):
            name = names[(turn + k) % len(names)]
            fn = arms[name]
            start = time.perf_counter()
            for i in items:
                fn(i)
            spent[name] += time.perf_counter() - start
    return {name: n / seconds for name, seconds in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=150, help="JPEG files generated and read per repeat")
    p.add_argument("--sources", default="640x480,1280x960", help="source JPEG sizes WxH, comma-separated")
    p.add_argument("--size", type=int, default=224, help="output side")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median is reported")
    p.add_argument("--write", action="store_true", help="replace the Data throughput section of bench/RESULTS.md")
    args = p.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lines = ["| source JPEG | pipeline | images/s (one core, median) | vs floor | vs torchvision |",
             "|---|---|---:|---:|---:|"]
    for source in args.sources.split(","):
        width, height = (int(v) for v in source.lower().split("x"))
        rate = run_source(args, width, height)
        floor, tv = rate["floor: OpenCV decode + resize"], rate["torchvision/PIL: same steps"]
        lines += [f"| {width}x{height} | {name} | {r:.0f} | {r / floor:.0%} | {r / tv:.2f}x |"
                  for name, r in rate.items()]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(args, table)


def run_source(args: argparse.Namespace, width: int, height: int) -> Dict[str, float]:
    """Median images/s of each arm on ``args.images`` JPEGs of ``width`` x ``height``."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images, width, height)
        arms: Dict[str, Callable[[int], object]] = {
            "floor: OpenCV decode + resize": floor_arm(paths, args.size),
            "cvkit: one warp + reduced decode": cvkit_arm(paths, args.size),
            "cvkit before (step by step)": cvkit_arm(paths, args.size, step_by_step_medium(args.size)),
            "OpenCV by hand: same steps, no framework": opencv_arm(paths, args.size),
            "torchvision/PIL: same steps": torchvision_arm(paths, args.size),
        }
        runs: Dict[str, List[float]] = {name: [] for name in arms}
        for _ in range(args.repeats):
            for name, rate in measure(arms, args.images).items():
                runs[name].append(rate)
    return {name: statistics.median(v) for name, v in runs.items()}


def write_section(args: argparse.Namespace, table: str) -> None:
    """Replace (or append) this bench's section of RESULTS.md, leaving every other section as it is."""
    import platform

    from results import replace_section

    command = (f"python bench/data_throughput.py --images {args.images} --sources {args.sources} "
               f"--size {args.size} --repeats {args.repeats} --write")
    section = (
        f"{HEADING}\n\n"
        f"JPEG (quality 90) -> {args.size}x{args.size} float tensor, one thread "
        f"(`cv2.setNumThreads(1)`, `torch.set_num_threads(1)`), {args.images} images x {args.repeats} "
        f"repeats, the arms taking turns every 10 images, on {platform.processor() or platform.machine()}, "
        f"OpenCV {cv2.__version__}, torch {torch.__version__}.\n\n"
        f"{table}\n\nGoals (cvkit, at 640x480 and 1280x960): >= 100% of the decode+resize floor and >= 3x "
        f"torchvision/PIL.\n\nCommand: `{command}`\n"
    )
    replace_section(HEADING, section)


if __name__ == "__main__":
    main()
