"""Do the competition recipes help here? Plain vs EMA vs mixup vs both, and one model vs a k-fold
ensemble, on the classification demo (digits) with clean and with noisy training labels.

Every arm is the same YAML experiment (`examples/configs/classification_demo.yaml`'s model and
stages) run through `cvkit.training.run` / `cvkit.kfold`, changed only by the recipe; test labels
are always clean. Several seeds; the table gives the mean and spread of test accuracy.

    python bench/competition_recipes.py --seeds 3 --write
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Competition recipes (EMA, mixup, k-fold ensemble)"
MIXUP = {"mixup_alpha": 0.2, "cutmix_alpha": 1.0, "prob": 1.0}
ARMS: Dict[str, Dict[str, Any]] = {
    "plain": {},
    "EMA 0.99, no warm-up": {"ema": {"decay": 0.99}},
    "EMA 0.99 with warm-up": {"ema": {"decay": 0.99, "use_warmup": True}},
    "mixup 0.2 + cutmix 1.0": {"mixup": MIXUP},
    "EMA with warm-up + mixup": {"ema": {"decay": 0.99, "use_warmup": True}, "mixup": MIXUP},
}


def base_config(data: Path, logdir: Path, seed: int, train_csv: str) -> Dict[str, Any]:
    import yaml

    config = yaml.safe_load((ROOT / "examples" / "configs" / "classification_demo.yaml").read_text())
    config.update(name="recipes", logdir=str(logdir), seed=seed, engine="cpu")
    config["data"] = {"kind": "csv", "train": str(data / train_csv), "test": str(data / "test.csv"),
                      "class_map": str(data / "encode_classes.json"), "valid_fraction": 0.2}
    return config


def noisy_copy(data: Path, fraction: float, seed: int) -> str:
    """``train.csv`` with ``fraction`` of its labels replaced by another class (seeded)."""
    frame = pd.read_csv(data / "train.csv")
    rng = np.random.default_rng(seed)
    classes = sorted(frame["label"].unique())
    flip = rng.random(len(frame)) < fraction
    frame.loc[flip, "label"] = [rng.choice([c for c in classes if c != old]) for old in frame.loc[flip, "label"]]
    name = f"train_noisy{int(fraction * 100)}.csv"
    frame.to_csv(data / name, index=False)
    return name


def with_recipe(config: Dict[str, Any], recipe: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(config)
    for stage in out["stages"][1:]:  # the full stage; the head stage stays as it is
        stage.update(recipe)
    return out


def test_accuracy_of_ensemble(folder: Path, test_csv: Path) -> float:
    from cvkit.inference import load_run, predict

    runs = [load_run(p) for p in sorted(folder.glob("fold_*"))]
    predictions = predict([r.model for r in runs], test_csv, "classification", transform=runs[0].transform(),
                          image_size=48, device="cpu")
    truth = pd.read_csv(test_csv)["label"].tolist()
    labels = [runs[0].classes[p.decode("classification", runs[0].classes)["label"]] for p in predictions]
    return float(np.mean([a == b for a, b in zip(labels, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=0.3, help="fraction of flipped training labels")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from cvkit.config import load_config
    from cvkit.data.demo import build_classification
    from cvkit.training import run
    from cvkit.kfold import kfold

    start = time.perf_counter()
    results: Dict[str, List[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = build_classification(Path(tmp) / "data", seed=0, per_class=80)
        labels = {"clean": "train.csv", f"{int(args.noise * 100)} % noisy": noisy_copy(data, args.noise, 0)}
        for condition, train_csv in labels.items():
            for seed in range(args.seeds):
                config = base_config(data, Path(tmp) / "runs" / "x", seed, train_csv)
                for arm, recipe in ARMS.items():
                    config_arm = with_recipe(config, recipe)
                    config_arm["logdir"] = str(Path(tmp) / "runs" / f"{condition}-{arm}-{seed}".replace(" ", ""))
                    result = run(load_config(config_arm), verbose=False)
                    results.setdefault(f"{condition}|{arm}", []).append(result["test"]["accuracy"])
                    print(condition, arm, seed, result["test"]["accuracy"], flush=True)
            folder = Path(tmp) / "runs" / f"{condition}-kfold".replace(" ", "")
            config = base_config(data, folder, 0, train_csv)
            config["data"].pop("valid_fraction")
            kfold(load_config(config), args.folds, verbose=False)
            score = test_accuracy_of_ensemble(folder, data / "test.csv")
            results[f"{condition}|{args.folds}-fold ensemble (seed 0)"] = [score]
            print(condition, "kfold", score, flush=True)
    lines = ["| training labels | recipe | test accuracy (mean over seeds) | min - max | seeds |", "|---|---|---|---|---|"]
    for key, values in results.items():
        condition, arm = key.split("|")
        lines.append(f"| {condition} | {arm} | {statistics.fmean(values):.3f} | {min(values):.3f} - "
                     f"{max(values):.3f} | {len(values)} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import replace_section

        minutes = (time.perf_counter() - start) / 60
        replace_section(HEADING, f"{HEADING}\n\n`python bench/competition_recipes.py --seeds {args.seeds} --write` "
                                 f"({minutes:.0f} min on 2 CPU cores). Classification demo (digits, 80 per class, "
                                 f"test_resnet, the demo YAML's two stages; the recipe applies to the full stage), "
                                 f"{args.noise:.0%} of training labels flipped in the noisy rows; test labels clean. "
                                 f"The k-fold row averages {args.folds} fold models (one seed).\n\n{table}\n")


if __name__ == "__main__":
    main()
