"""Pieces the example scripts share: common options, loaders, task adapters, prediction writers.

The examples in ``examples/`` are short scripts of choices; what they would otherwise each
re-implement (the class + box target layout, a criterion weight that changes per stage,
predicting a whole loader, Severstal submissions, overlays) lives here.
"""
from __future__ import annotations

import argparse
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd
import torch
from catalyst.core.callback import Callback, CallbackOrder
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cvkit.data.datasets import TableDataset
from cvkit.data.io import read_image_info
from cvkit.data.rle import rle_encode
from cvkit.io import atomic_write_bytes, load_checkpoint, state_dict_of
from cvkit.losses import ClassBoxCriterion
from cvkit.models.groups import block_names

PredictFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def common_args(doc: str, name: str, arch: Optional[str], epochs: int, batch_size: int) -> argparse.ArgumentParser:
    """A parser with the options every example takes (``--arch``/``--pretrained`` unless ``arch`` is None)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="competition data folder (default: a demo set built from sklearn digits)")
    p.add_argument("--logdir", type=Path, default=Path("runs") / name, help="where logs, checkpoints and predictions go")
    if arch is not None:
        p.add_argument("--arch", default=arch, help="timm architecture name")
        p.add_argument("--pretrained", help="local weights file for --arch (nothing is downloaded)")
    p.add_argument("--epochs", type=int, default=epochs, help="maximum epochs of each stage after the first")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--device", default=None, choices=["cpu", "gpu", "amp"], help="engine; default gpu if available")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="use only this many train and test images (smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def train_valid_loaders(train: Dataset, valid: Dataset, batch_size: int, workers: int, seed: int) -> Dict[str, DataLoader]:
    """Shuffled train loader with its own generator (cvkit reseeds it per epoch) and a valid loader."""
    return {
        "train": DataLoader(train, batch_size, shuffle=True, num_workers=workers, drop_last=len(train) > batch_size,
                            generator=torch.Generator().manual_seed(seed)),
        "valid": DataLoader(valid, batch_size * 2, num_workers=workers),
    }


def load_weights(model: nn.Module, path: Optional[Path]) -> None:
    """Load a cvkit checkpoint (``best.pth`` of an earlier run) or a plain state_dict into ``model``."""
    if path is not None:
        model.load_state_dict(state_dict_of(load_checkpoint(path), path))


@torch.no_grad()
def iter_predictions(model: nn.Module, loader: DataLoader, fn: Optional[PredictFn] = None
                     ) -> Iterator[Tuple[torch.Tensor, List[int]]]:
    """Per batch: outputs of ``model`` (or ``fn(model, images)``, e.g. TTA) on CPU in eval mode, and the item indices."""
    device = next(model.parameters()).device
    model.eval()
    for batch in loader:
        x = batch["features"].to(device)
        yield (fn(model, x) if fn else model(x)).float().cpu(), [int(i) for i in batch["index"]]


def predict(model: nn.Module, loader: DataLoader, fn: Optional[PredictFn] = None) -> Tuple[torch.Tensor, List[int]]:
    """All outputs over ``loader`` concatenated (see :func:`iter_predictions`), and the item indices."""
    outputs, indices = [], []
    for out, index in iter_predictions(model, loader, fn):
        outputs.append(out)
        indices += index
    return torch.cat(outputs), indices


def demo_pretrained(arch: str, cache_dir: Path, epochs: int = 8, seed: int = 0) -> Path:
    """Backbone weights for the demos, standing in for the ImageNet weights a real run would load.

    A frozen randomly initialised backbone (with BatchNorm statistics frozen at their initial
    values) makes head-only and frozen-BN stages meaningless, and nothing may be downloaded. So
    the demos first train ``arch`` on a pretext task that uses no digit labels: which of four
    rotations (0/90/180/270 degrees) was applied to a digit pasted at a random place and scale on
    a 32x32 tinted canvas (a few seconds for timm's ``test_*`` models). The demo test sets are
    built from the same digit glyphs, so their labels must not be seen here. The file is cached
    as ``cache_dir/<arch>-digits-rotation.safetensors``; load it with ``pretrained=`` like any
    other local weights (the 4-way classifier is skipped).
    """
    from safetensors.torch import save as to_safetensors
    import timm

    from cvkit.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from cvkit.data.demo import digits_canvases

    path = Path(cache_dir) / f"{arch}-digits-rotation.safetensors"
    if path.is_file():
        return path
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
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, to_safetensors(state))
    return path


def starting_weights(args: argparse.Namespace) -> Optional[Path]:
    """``--pretrained`` when given; on demo data (no ``--data``) :func:`demo_pretrained`'s weights; else None."""
    if args.pretrained:
        return Path(args.pretrained)
    if args.data is None:
        return demo_pretrained(args.arch, args.logdir.parent / "demo_data" / "pretrained")
    return None


def main_blocks(model: nn.Module) -> List[str]:
    """The model's stages in order (``layer1``..``layer4``, ``blocks.0``.., ``stages.0``..), as
    ``trainable`` block names: ``main_blocks(m)[-2]`` unfreezes the last two, ``[len // 2]`` the top half."""
    pattern = re.compile(r"^(?:.*\.)?(?:layer\d+|blocks\.\d+|stages\.\d+)$")
    names = [n for n in block_names(model) if pattern.match(n)]
    if not names:
        raise ValueError(f"{type(model).__name__}: no layerN / blocks.N / stages.N blocks among {block_names(model)}")
    return names


class UnlabelledImages(TableDataset):
    """Images listed in a table without targets (a competition's test set): ``features`` and ``index``."""

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"features": self._augment(image=self._read(index))["image"], "index": index}


def image_sizes(paths: Iterable[Path]) -> List[Tuple[int, int]]:
    """``(width, height)`` of each image as stored on disk (to map predictions back to original pixels)."""
    sizes = []
    for path in paths:
        info = read_image_info(path)
        sizes.append((int(info["width"]), int(info["height"])))
    return sizes


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write a CSV atomically (a crash never leaves half a submission)."""
    atomic_write_bytes(Path(path), frame.to_csv(index=False).encode())
    return Path(path)


# --- class + box ------------------------------------------------------------------------------

class ClassBoxTargets(Dataset):
    """A :class:`~cvkit.data.BoxDataset` whose ``"targets"`` is one float row: class, then xyxy box.

    A box cropped away by augmentation is NaN, so :class:`ClassBoxCriterion` and
    :class:`~cvkit.metrics.BoxMetrics` leave it out. One tensor keeps the runner's batch keys as they are.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item = self.dataset[index]
        box = item["boxes"] if float(item["box_visible"]) > 0 else torch.full((4,), float("nan"))
        targets = torch.cat([item["targets"].float().view(1), box.float()])
        return {"features": item["features"], "targets": targets, "index": item["index"]}


class SetCriterionAttribute(Callback):
    """At the start of a stage set ``runner.criterion.<name> = value`` (e.g. a loss weight per stage)."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(order=CallbackOrder.Internal + 1)
        self.name, self.value = name, value

    def on_experiment_start(self, runner: Any) -> None:
        if not hasattr(runner.criterion, self.name):
            raise AttributeError(f"criterion {type(runner.criterion).__name__} has no attribute {self.name!r} to set")
        setattr(runner.criterion, self.name, self.value)


# --- keypoints --------------------------------------------------------------------------------

def flip_pairs_from_names(names: Sequence[str]) -> List[Tuple[int, int]]:
    """Index pairs of keypoints whose names differ only by ``left``/``right`` (they swap under a mirror)."""
    index = {name: i for i, name in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        mirrored = name.replace("left", "\0").replace("right", "left").replace("\0", "right")
        j = index.get(mirrored)
        if j is not None and i < j:
            pairs.append((i, j))
    return pairs


# --- segmentation -----------------------------------------------------------------------------

def resize_probabilities(probs: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(C, h, w)`` probabilities resized (bilinear) to the original ``height`` x ``width``."""
    return nn.functional.interpolate(probs[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def severstal_rows(image_id: str, mask: np.ndarray) -> List[Dict[str, str]]:
    """Submission rows ``ImageId_ClassId, EncodedPixels`` for one ``(C, H, W)`` 0/1 mask: one per class,
    empty ``EncodedPixels`` where nothing is predicted (1-based ``ClassId``, column-major runs)."""
    return [{"ImageId_ClassId": f"{image_id}_{c + 1}", "EncodedPixels": rle_encode(mask[c])} for c in range(len(mask))]


COLOURS = np.array([(255, 64, 64), (64, 255, 64), (64, 128, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)], np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``image`` with each class of a ``(C, H, W)`` 0/1 mask tinted in its own colour."""
    out = image.astype(np.float32)
    for c in range(len(mask)):
        on = mask[c].astype(bool)
        out[on] = (1 - alpha) * out[on] + alpha * COLOURS[c % len(COLOURS)]
    return out.round().astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 image as PNG, atomically."""
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write_bytes(Path(path), png.tobytes())


# --- classification ---------------------------------------------------------------------------

def export_by_class(paths: Iterable[Path], labels: Iterable[str], out_dir: Path) -> int:
    """Copy each image into ``out_dir/<predicted label>/``; returns how many were copied.

    A file name that occurs more than once among ``paths`` gets its source folder as a prefix.
    """
    paths = [Path(p) for p in paths]
    repeated = Counter(p.name for p in paths)
    count = 0
    for path, label in zip(paths, labels):
        folder = Path(out_dir) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        name = path.name if repeated[path.name] == 1 else f"{path.parent.name}_{path.name}"
        shutil.copy2(path, folder / name)
        count += 1
    return count


__all__ = [
    "ClassBoxCriterion",
    "ClassBoxTargets",
    "SetCriterionAttribute",
    "common_args",
    "export_by_class",
    "flip_pairs_from_names",
    "image_sizes",
    "iter_predictions",
    "main_blocks",
    "UnlabelledImages",
    "load_weights",
    "mask_overlay",
    "predict",
    "resize_probabilities",
    "severstal_rows",
    "train_valid_loaders",
    "write_png",
    "write_table",
]
