"""STL-10 binary layout: read, write, and an embedded demo set built from scikit-learn's digits.

The real layout (https://cs.stanford.edu/~acoates/stl10/) is ``stl10_binary/`` with
``train_X.bin``/``train_y.bin``, ``test_X.bin``/``test_y.bin`` and ``unlabeled_X.bin``:
96x96x3 uint8 images stored channel by channel, each channel column-major; labels uint8 1..10.
The demo set is written in that same layout so the real reader is the code path exercised.
Images are memory-mapped, not read: the 5.5 GB ``unlabeled_X.bin`` costs no memory until used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from cvkit.io import atomic_write_bytes
from cvkit.status import announce

SIZE = 96
IMAGE_BYTES = SIZE * SIZE * 3
CLASS_NAMES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
DIGIT_NAMES = tuple(f"digit_{i}" for i in range(10))
PathLike = Union[str, os.PathLike]


class STL10FormatError(ValueError):
    """A file does not have the STL-10 binary layout."""


def read_images(path: PathLike) -> np.ndarray:
    """An ``*_X.bin`` file as an ``(N, 96, 96, 3)`` uint8 RGB array, memory-mapped read-only.

    The array is a transposed view of the file (no copy): ``np.array(images[i])`` gives one
    contiguous image, fancy indexing (``images[idx]``) an in-memory copy of those images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STL-10 image file not found: {path}")
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise STL10FormatError(
            f"{path}: {size} bytes is not a whole number of 96x96x3 images "
            f"({IMAGE_BYTES} bytes each); the file is truncated or not STL-10"
        )
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(size // IMAGE_BYTES, 3, SIZE, SIZE))
    return raw.transpose(0, 3, 2, 1)


class ImageFile:
    """An ``*_X.bin`` file read one image at a time (``os.pread``): nothing stays resident.

    A memory map of the 2.76 GB unlabelled file leaves every touched page in the process's RSS
    (about 1.1 MiB per random item, bench/RESULTS.md "STL-10 reader memory"); reading each image
    with ``pread`` keeps memory flat. Integer indexing gives one ``(96, 96, 3)`` RGB image, an
    index array or slice an in-memory ``(n, 96, 96, 3)`` copy. Pickles as its path (DataLoader workers).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.count = len(read_images(self.path))
        self._fd: Optional[int] = None

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.count, SIZE, SIZE, 3)

    def _read(self, index: int) -> np.ndarray:
        if not -self.count <= index < self.count:
            raise IndexError(f"image {index} of {self.path} ({self.count} images)")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, IMAGE_BYTES, (index % self.count) * IMAGE_BYTES)
        return np.frombuffer(data, np.uint8).reshape(3, SIZE, SIZE).transpose(2, 1, 0).copy()

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._read(int(index))
        indices = np.arange(self.count)[index]
        return np.stack([self._read(int(i)) for i in np.atleast_1d(indices)])

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def read_labels(path: PathLike, num_images: Optional[int] = None) -> np.ndarray:
    """Read a ``*_y.bin`` file into 0-based int64 labels (the file stores 1..10)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STL-10 label file not found: {path}")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if num_images is not None and len(labels) != num_images:
        raise STL10FormatError(f"{path}: {len(labels)} labels for {num_images} images in the matching _X.bin")
    bad = np.flatnonzero((labels < 1) | (labels > 10))
    if bad.size:
        raise STL10FormatError(f"{path}: label {labels[bad[0]]} at position {bad[0]} is outside 1..10")
    return labels - 1


def write_images(path: PathLike, images: np.ndarray) -> None:
    """Write ``(N, 96, 96, 3)`` uint8 images in the STL-10 binary layout."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (SIZE, SIZE, 3):
        raise ValueError(f"expected uint8 images of shape (N, 96, 96, 3), got {images.dtype} {images.shape}")
    atomic_write_bytes(path, np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())


def write_labels(path: PathLike, labels: np.ndarray) -> None:
    """Write 0-based labels as STL-10's 1-based uint8."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError("STL-10 labels must be in 0..9 (written as 1..10)")
    atomic_write_bytes(path, (labels + 1).astype(np.uint8).tobytes())


def split_file(root: PathLike, split: str, kind: str = "X") -> Path:
    """``<root>/[stl10_binary/]<split>_<kind>.bin``; ``root`` may be ``stl10_binary`` or its parent."""
    root = Path(root)
    if (root / "stl10_binary").is_dir():
        root = root / "stl10_binary"
    if split not in ("train", "test", "unlabeled"):
        raise ValueError(f"unknown STL-10 split {split!r}; expected train, test or unlabeled")
    return root / f"{split}_{kind}.bin"


def load_split(root: PathLike, split: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Images (memory-mapped, see :func:`read_images`) and labels of ``train``, ``test`` or
    ``unlabeled`` (labels None) under ``root``, the ``stl10_binary`` folder or its parent."""
    images = read_images(split_file(root, split))
    if split == "unlabeled":
        return images, None
    return images, read_labels(split_file(root, split, "y"), num_images=len(images))


def class_names(root: PathLike) -> Tuple[str, ...]:
    """Class names from ``class_names.txt`` when present, else STL-10's."""
    root = Path(root)
    for folder in (root / "stl10_binary", root):
        f = folder / "class_names.txt"
        if f.is_file():
            return tuple(line.strip() for line in f.read_text().splitlines() if line.strip())
    return CLASS_NAMES


def render_digits(seed: int = 0, copies: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits rendered as 96x96 RGB images with random tint and offset.

    Each copy draws a new colour, scale and position, so ``copies > 1`` gives more distinct images.
    """
    import cv2
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(copies):
        for img8, label in zip(digits.images, digits.target):
            side = int(rng.integers(56, 84))
            glyph = cv2.resize((img8 / 16.0).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
            glyph = np.clip(glyph, 0, 1)
            canvas = np.zeros((SIZE, SIZE), np.float32)
            y, x = rng.integers(0, SIZE - side + 1, size=2)
            canvas[y : y + side, x : x + side] = glyph
            fg = rng.uniform(0.5, 1.0, size=3)
            bg = rng.uniform(0.0, 0.35, size=3)
            rgb = canvas[..., None] * fg + (1 - canvas[..., None]) * bg
            rgb += rng.normal(0, 0.03, size=rgb.shape)
            images.append(np.clip(rgb * 255, 0, 255).astype(np.uint8))
            labels.append(int(label))
    return np.stack(images), np.asarray(labels, np.int64)


def build_demo(root: PathLike, seed: int = 0, test_fraction: float = 0.3, unlabeled: int = 500) -> Path:
    """Write a demo set in the STL-10 binary layout under ``root/stl10_binary`` and return it.

    Built from scikit-learn's digits (train/test split stratified and seeded), plus an
    ``unlabeled_X.bin`` rendered with another seed for pseudo-labelling. Rebuilt only when missing; a
    build says what it builds, and how long it took, on stdout.
    """
    out = Path(root) / "stl10_binary"
    marker = out / f".demo-seed-{seed}"
    if marker.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with announce(f"demo data: building 'stl10' in {out} (once; kept for later runs)", "demo data: 'stl10' built"):
        from sklearn.model_selection import train_test_split

        images, labels = render_digits(seed)
        train_idx, test_idx = train_test_split(
            np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
        )
        write_images(out / "train_X.bin", images[train_idx])
        write_labels(out / "train_y.bin", labels[train_idx])
        write_images(out / "test_X.bin", images[test_idx])
        write_labels(out / "test_y.bin", labels[test_idx])
        extra, _ = render_digits(seed + 1)
        write_images(out / "unlabeled_X.bin", extra[np.random.default_rng(seed).permutation(len(extra))[:unlabeled]])
        (out / "class_names.txt").write_text("\n".join(DIGIT_NAMES) + "\n")
    marker.write_text("complete\n")
    return out


class ArrayDataset:
    """Images (N, H, W, 3) uint8, in memory or memory-mapped, with optional labels, through an
    albumentations pipeline; each item copies its image, so a read-only map is never written.

    Items are dicts ``{"features": CxHxW float tensor, "targets": int64, "index": int}``;
    unlabelled sets (``labels=None``) give ``targets = -1``.
    """

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None, transform: Optional[object] = None) -> None:
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, object]:
        import torch

        from cvkit.data.seeding import reseed_transform

        image = np.array(self.images[index])
        if self.transform is not None:
            reseed_transform(self.transform)
            image = self.transform(image=image)["image"]
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        target = -1 if self.labels is None else int(self.labels[index])
        return {"features": image, "targets": torch.tensor(target, dtype=torch.int64), "index": index}
