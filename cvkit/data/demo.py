"""Small on-disk datasets for every task, built from scikit-learn's bundled 8x8 digits (no download).

Each builder writes images plus ``train.csv`` and ``test.csv`` under ``root`` in the layout the
matching dataset reads, is deterministic for a seed, and returns ``root``; a finished build is
kept (a marker file) so examples can call it on every run.

- :func:`build_classification`: ``images/digit_k/*.jpg`` class folders, CSVs ``path,label``, ``encode_classes.json``;
- :func:`build_boxes`: one digit pasted on a larger canvas, ``path,label,x1,y1,x2,y2`` (pixels);
- :func:`build_keypoints`: the pasted digit's four corners and centre, ``x0,y0..x4,y4`` (some NaN);
- :func:`build_segmentation`: digit pixels per class as id PNGs (``path,mask``) and Severstal RLE
  (``train_rle.csv``: ``ImageId,ClassId,EncodedPixels``);
- :func:`build_stl10`: STL-10 binary layout (see :mod:`cvkit.data.stl10`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

import cv2
import numpy as np
import pandas as pd

from cvkit.data.io import read_mask, save_class_map
from cvkit.data.rle import masks_to_rle_frame
from cvkit.data.stl10 import build_demo as build_stl10
from cvkit.status import announce

PathLike = Union[str, os.PathLike]
KEYPOINT_NAMES = ("top_left", "top_right", "bottom_right", "bottom_left", "centre")
KEYPOINT_COLS = tuple(c for i in range(len(KEYPOINT_NAMES)) for c in (f"x{i}", f"y{i}"))

__all__ = ["build_classification", "build_boxes", "build_keypoints", "build_segmentation", "build_stl10",
           "demo_pretrained", "digits_canvases", "KEYPOINT_NAMES", "KEYPOINT_COLS"]


def _digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _glyph(img8: np.ndarray, side: int) -> np.ndarray:
    return np.clip(cv2.resize(img8, (side, side), interpolation=cv2.INTER_CUBIC), 0, 1)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    base = rng.uniform(0.0, 0.35, size=3)
    return np.clip(base + rng.normal(0, 0.03, size=(height, width, 3)), 0, 1)


def _paste(canvas: np.ndarray, glyph: np.ndarray, x: int, y: int, colour: np.ndarray) -> None:
    side = glyph.shape[0]
    region = canvas[y : y + side, x : x + side]
    region[:] = glyph[..., None] * colour + (1 - glyph[..., None]) * region


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _write(path: Path, rgb_or_mask: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rgb_or_mask if rgb_or_mask.ndim == 2 else cv2.cvtColor(rgb_or_mask, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(path.suffix, data, params)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def _pick(labels: np.ndarray, classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` digit indices of each class 0..classes-1, shuffled."""
    chosen = [rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(classes)]
    return rng.permutation(np.concatenate(chosen))


def _build(root: PathLike, name: str, seed: int, make: Callable[[Path, np.random.Generator], List[Dict]],
           test_fraction: float, **settings: object) -> Path:
    """Run ``make`` once per (root, seed, settings) and write its rows as train/test CSVs, stratified by ``label``.

    The marker file records the settings; a set built with other settings (e.g. a smaller
    ``per_class`` by an older cvkit) is deleted and rebuilt rather than silently reused. A build
    says what it builds, and how long it took, on stdout.
    """
    root = Path(root)
    marker = root / f".demo-{name}-seed-{seed}"
    stamp = json.dumps({"test_fraction": test_fraction, **settings}, sort_keys=True)
    if marker.is_file():
        if marker.read_text().strip() == stamp:
            return root
        for old in ("images", "masks"):
            shutil.rmtree(root / old, ignore_errors=True)
        for table in root.glob("*.csv"):  # train/test and files derived from them (e.g. *_rle.csv)
            table.unlink()
        marker.unlink()
    root.mkdir(parents=True, exist_ok=True)
    with announce(f"demo data: building {name!r} in {root} (once; kept for later runs)", f"demo data: {name!r} built"):
        frame = pd.DataFrame(make(root, np.random.default_rng(seed)))
        test = np.zeros(len(frame), bool)
        for _, group in frame.groupby("label", sort=True):
            n_test = int(round(len(group) * test_fraction))
            test[group.index[:n_test]] = True
        frame[~test].to_csv(root / "train.csv", index=False)
        frame[test].to_csv(root / "test.csv", index=False)
    marker.write_text(stamp + "\n")
    return root


def _tinted_canvas(rng: np.random.Generator, img8: np.ndarray, size: int, min_side: int) -> np.ndarray:
    """A ``size`` x ``size`` tinted background with the digit pasted at a random place, side in [min_side, size - 1)."""
    side = int(rng.integers(min_side, size - 1))
    canvas = _background(rng, size, size)
    x, y = rng.integers(0, size - side + 1, size=2)
    _paste(canvas, _glyph(img8, side), int(x), int(y), rng.uniform(0.5, 1.0, size=3))
    return canvas


def build_classification(root: PathLike, seed: int = 0, per_class: int = 20, size: int = 32,
                         test_fraction: float = 0.25) -> Path:
    """Tinted digits in class folders ``images/digit_k/NNNNN.jpg``, CSVs and ``encode_classes.json``."""

    def make(root: Path, rng: np.random.Generator) -> List[Dict]:
        images8, labels = _digits()
        rows = []
        for n, i in enumerate(_pick(labels, 10, per_class, rng)):
            canvas = _tinted_canvas(rng, images8[i], size, min_side=size * 5 // 8)
            rel = f"images/digit_{labels[i]}/{n:05d}.jpg"
            _write(root / rel, _to_uint8(canvas))
            rows.append({"path": rel, "label": f"digit_{labels[i]}"})
        save_class_map(root / "encode_classes.json", {f"digit_{k}": k for k in range(10)})
        return rows

    return _build(root, "classification", seed, make, test_fraction, per_class=per_class, size=size)


def digits_canvases(size: int = 32, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as tinted ``size`` x ``size`` RGB arrays in [0, 1] (N, H, W, 3), and their labels.

    Each digit is placed at a random position and scale, as in :func:`build_classification`; kept in
    memory (no files), for pretraining the demos' backbones.
    """
    images8, labels = _digits()
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), size, size, 3), np.float32)
    for n, img8 in enumerate(images8):
        out[n] = _tinted_canvas(rng, img8, size, min_side=size * 3 // 8)
    return out, labels


def _pasted_digit(rng: np.random.Generator, img8: np.ndarray, canvas: int, side_range: Tuple[int, int]
                  ) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int, int]]:
    side = int(rng.integers(*side_range))
    x, y = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
    rgb = _background(rng, canvas, canvas)
    glyph = _glyph(img8, side)
    _paste(rgb, glyph, x, y, rng.uniform(0.5, 1.0, size=3))
    return rgb, glyph, (x, y, side)


def _pasted_rows(root: Path, rng: np.random.Generator, per_class: int, canvas: int,
                 targets: Callable[[int, int, int], Dict]) -> List[Dict]:
    """One digit pasted per ``canvas`` PNG: rows of path and label plus ``targets(x, y, side)``'s columns."""
    images8, labels = _digits()
    rows = []
    for n, i in enumerate(_pick(labels, 10, per_class, rng)):
        rgb, _, (x, y, side) = _pasted_digit(rng, images8[i], canvas, (canvas // 5, canvas // 2))
        rel = f"images/{n:05d}.png"
        _write(root / rel, _to_uint8(rgb))
        rows.append({"path": rel, "label": f"digit_{labels[i]}", **targets(x, y, side)})
    return rows


def build_boxes(root: PathLike, seed: int = 0, per_class: int = 10, canvas: int = 96,
                test_fraction: float = 0.25) -> Path:
    """One digit per ``canvas`` x ``canvas`` PNG at a random place; box columns ``x1,y1,x2,y2`` in pixels."""

    def make(root: Path, rng: np.random.Generator) -> List[Dict]:
        rows = _pasted_rows(root, rng, per_class, canvas, lambda x, y, side: {
            "x1": x, "y1": y, "x2": x + side, "y2": y + side})
        save_class_map(root / "encode_classes.json", {f"digit_{k}": k for k in range(10)})
        return rows

    return _build(root, "boxes", seed, make, test_fraction, per_class=per_class, canvas=canvas)


def build_keypoints(root: PathLike, seed: int = 0, per_class: int = 10, canvas: int = 96,
                    missing: float = 0.1, test_fraction: float = 0.25) -> Path:
    """One pasted digit per PNG; keypoints = its corners and centre (:data:`KEYPOINT_NAMES`), a
    fraction ``missing`` of them left empty (NaN). Also keeps ``label`` for stratified splits."""

    def make(root: Path, rng: np.random.Generator) -> List[Dict]:
        def points(x: int, y: int, side: int) -> Dict:
            row: Dict = {}
            corners = [(x, y), (x + side, y), (x + side, y + side), (x, y + side), (x + side / 2, y + side / 2)]
            for k, (px, py) in enumerate(corners):
                gone = rng.random() < missing
                row[f"x{k}"], row[f"y{k}"] = (np.nan, np.nan) if gone else (float(px), float(py))
            return row

        return _pasted_rows(root, rng, per_class, canvas, points)

    return _build(root, "keypoints", seed, make, test_fraction, per_class=per_class, canvas=canvas,
                  missing=missing)


def build_segmentation(root: PathLike, seed: int = 0, per_class: int = 10, canvas: int = 96,
                       num_classes: int = 4, test_fraction: float = 0.25) -> Path:
    """Digits 0..num_classes-1, one or two per PNG; ``masks/*.png`` hold class ids (digit d -> d + 1)
    and ``train_rle.csv``/``test_rle.csv`` the same masks as Severstal RLE rows."""

    def make(root: Path, rng: np.random.Generator) -> List[Dict]:
        images8, labels = _digits()
        rows = []
        for n, i in enumerate(_pick(labels, num_classes, per_class, rng)):
            rgb = _background(rng, canvas, canvas)
            ids = np.zeros((canvas, canvas), np.uint8)
            second = rng.choice(np.flatnonzero(labels < num_classes)) if rng.random() < 0.5 else None
            for j in [i] if second is None else [i, second]:
                side = int(rng.integers(canvas // 4, canvas // 2))
                x, y = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
                glyph = _glyph(images8[j], side)
                _paste(rgb, glyph, x, y, rng.uniform(0.5, 1.0, size=3))
                region = ids[y : y + side, x : x + side]
                region[glyph > 0.5] = labels[j] + 1
            name = f"{n:05d}.png"
            _write(root / "images" / name, _to_uint8(rgb))
            _write(root / "masks" / name, ids)
            rows.append({"path": f"images/{name}", "mask": f"masks/{name}", "label": f"digit_{labels[i]}"})
        return rows

    out = _build(root, "segmentation", seed, make, test_fraction, per_class=per_class, canvas=canvas,
                 num_classes=num_classes)
    for split in ("train", "test"):
        if not (out / f"{split}_rle.csv").is_file():
            names = [Path(p).name for p in pd.read_csv(out / f"{split}.csv")["path"]]
            masks = {name: (read_mask(out / "masks" / name)[..., None] == np.arange(1, num_classes + 1))
                     for name in names}
            masks_to_rle_frame(masks).to_csv(out / f"{split}_rle.csv", index=False)
    return out


def demo_pretrained(arch: str, cache_dir: PathLike, epochs: int = 8, seed: int = 0) -> Path:
    """Backbone weights for the demos, standing in for the ImageNet weights a real run would load.

    A frozen randomly initialised backbone (with BatchNorm statistics frozen at their initial
    values) makes head-only and frozen-BN stages meaningless, and nothing may be downloaded. So
    ``arch`` is first trained on a pretext task that uses no digit labels: which of four rotations
    (0/90/180/270 degrees) was applied to a digit pasted at a random place and scale on a 32x32
    tinted canvas (a few seconds for timm's ``test_*`` models). The demo test sets are built from
    the same digit glyphs, so their labels must not be seen here. The file is cached as
    ``cache_dir/<arch>-digits-rotation.safetensors``; load it with ``pretrained=`` like any other
    local weights (the 4-way classifier is skipped). The training says so, and how long it took, on stdout.
    """
    import timm
    import torch
    from safetensors.torch import save as to_safetensors

    from cvkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from cvkit.io import atomic_write_bytes

    path = Path(cache_dir) / f"{arch}-digits-rotation.safetensors"
    if path.is_file():
        return path
    with announce(f"demo backbone: training {arch} on digit rotations, {epochs} epochs (once; cached as {path})",
                  f"demo backbone: {arch} trained"):
        images, _ = digits_canvases(size=32, seed=seed)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        generator = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (len(x),), generator=generator)
        x = torch.stack([torch.rot90(image, int(k), dims=(1, 2)) for image, k in zip(x, y)])
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = timm.create_model(arch, num_classes=4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(y), generator=generator).split(64):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, to_safetensors(state))
    return path
