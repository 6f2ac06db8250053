"""How well does the outlier search find injected junk? precision@k for every method, per class and global.

Demo digits (cvkit.data.stl10.render_digits) get ~5% labels flipped and ~2% images replaced by
noise or blanks; a timm ``test_resnet`` is trained briefly on that noisy set with plain PyTorch
(CPU), its pooled features are scored by every method, and precision@k (k = number injected) is
reported. ``--write`` puts the table in the ``## Outlier search`` section of bench/RESULTS.md.

    python bench/outliers_precision.py --seeds 0 1 2 --write
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cvkit.data.stl10 import ArrayDataset, render_digits
from cvkit.models import create_model
from cvkit.tools.outliers import METHODS, extract_features, score_outliers
from results import replace_section

SECTION = "## Outlier search"


def inject(
    images: np.ndarray, labels: np.ndarray, mislabel: float, corrupt: float, seed: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flip ``mislabel`` of the labels and replace ``corrupt`` of the images by noise or blanks."""
    rng = np.random.default_rng(seed)
    images, labels = images.copy(), labels.copy()
    order = rng.permutation(len(labels))
    flipped = order[: int(round(mislabel * len(labels)))]
    broken = order[len(flipped) : len(flipped) + int(round(corrupt * len(labels)))]
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
    for n, i in enumerate(broken):
        if n % 2:
            images[i] = rng.integers(0, 256, images[i].shape, dtype=np.uint8)
        else:
            images[i] = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 2, images[i].shape), 0, 255).astype(np.uint8)
    return images, labels, flipped, broken


def shrink(images: np.ndarray, size: int) -> np.ndarray:
    """Downscale every image to ``size`` x ``size`` (4x fewer pixels at 48: the bench fits in minutes)."""
    import cv2

    return np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])


def train(images: np.ndarray, labels: np.ndarray, epochs: int, lr: float, seed: int) -> nn.Module:
    """A few epochs of AdamW with a one-cycle schedule on the noisy set, plain PyTorch."""
    torch.manual_seed(seed)
    model = create_model("test_resnet", 10)
    loader = DataLoader(ArrayDataset(images, labels), batch_size=64, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(batch["features"]), batch["targets"]).backward()
            opt.step()
            sched.step()
    return model


def precision_at_k(scores: np.ndarray, injected: np.ndarray) -> float:
    top = np.argsort(-scores, kind="stable")[: len(injected)]
    return float(np.isin(top, injected).mean())


def one_seed(args: argparse.Namespace, seed: int) -> Tuple[List[Dict[str, float]], Dict[str, float]]:
    """Inject, train, embed and score once; per-method rows plus facts about the run."""
    t0 = time.time()
    clean_images, true_labels = render_digits(seed)
    images, labels, flipped, broken = inject(clean_images, true_labels, args.mislabel, args.corrupt, seed)
    injected = np.concatenate([flipped, broken])
    images = shrink(images, args.size)
    model = train(images, labels, args.epochs, args.lr, seed)
    t_train = time.time() - t0
    loader = DataLoader(ArrayDataset(images, labels), batch_size=128)
    feats, feat_labels, idx = extract_features(model, loader)
    assert np.array_equal(idx, np.arange(len(labels))) and np.array_equal(feat_labels, labels)
    with torch.no_grad():
        predicted = torch.cat([model(b["features"]) for b in loader]).argmax(1).numpy()
    clean = np.setdiff1d(np.arange(len(labels)), broken)
    facts = dict(n=len(labels), flipped=len(flipped), broken=len(broken), train_s=t_train,
                 acc=float((predicted[clean] == true_labels[clean]).mean()))
    rows = []
    for method in METHODS:
        for per_class in (True, False):
            t = time.time()
            scores = score_outliers(feats, labels, method=method, per_class=per_class)
            top = np.argsort(-scores, kind="stable")[: len(injected)]
            rows.append(dict(p=precision_at_k(scores, injected), flipped=float(np.isin(top, flipped).sum()),
                             broken=float(np.isin(top, broken).sum()), seconds=time.time() - t))
    return rows, facts


def run(args: argparse.Namespace) -> str:
    t0 = time.time()
    runs = [one_seed(args, seed) for seed in args.seeds]
    facts = runs[0][1]
    accs = [f["acc"] for _, f in runs]
    seeds = " ".join(str(s) for s in args.seeds)
    lines = [
        SECTION,
        "",
        f"`python bench/outliers_precision.py --epochs {args.epochs} --size {args.size} --lr {args.lr:g} --seeds {seeds}"
        f"{' --write' if args.write else ''}` (CPU, {torch.get_num_threads()} threads, {time.time() - t0:.0f} s in all, "
        f"training {np.mean([f['train_s'] for _, f in runs]):.0f} s per seed).",
        "",
        f"{facts['n']} demo digits (96x96, shown to the model at {args.size}x{args.size}); per seed {facts['flipped']} labels "
        f"flipped ({args.mislabel:.0%}) and {facts['broken']} images replaced by uniform noise or a flat colour "
        f"({args.corrupt:.0%}), so k = {facts['flipped'] + facts['broken']}. Features: timm `test_resnet` trained "
        f"{args.epochs} epochs on the noisy set (AdamW, one-cycle to {args.lr:g}, batch 64), pooled pre-logits, "
        f"L2-normalised; default method arguments. The model's accuracy on the true labels of the uncorrupted "
        f"images: {min(accs):.1%}-{max(accs):.1%}. Mean over {len(runs)} seeds (min-max):",
        "",
        "| method | scope | precision@k | flipped found in top k | broken found in top k | scoring s |",
        "|---|---|---|---|---|---|",
    ]
    for i, (method, scope) in enumerate((m, s) for m in METHODS for s in ("per-class", "global")):
        cell = {key: [rows[i][key] for rows, _ in runs] for key in runs[0][0][i]}
        lines.append(
            f"| {method} | {scope} | {np.mean(cell['p']):.3f} ({min(cell['p']):.3f}-{max(cell['p']):.3f}) "
            f"| {np.mean(cell['flipped']):.1f}/{facts['flipped']} | {np.mean(cell['broken']):.1f}/{facts['broken']} "
            f"| {np.mean(cell['seconds']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=48, help="side the images are resized to for training and features")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (~30 s each on 2 idle cores)")
    parser.add_argument("--mislabel", type=float, default=0.05)
    parser.add_argument("--corrupt", type=float, default=0.02)
    parser.add_argument("--write", action="store_true", help="update the Outlier search section of bench/RESULTS.md")
    args = parser.parse_args(argv)
    text = run(args)
    print(text)
    if args.write:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main(sys.argv[1:])
