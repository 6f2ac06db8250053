"""A finished run as a predictor: :func:`load_run` builds its model from the run folder's files
(:mod:`cvkit.run_folder`), :func:`predict_run` predicts images with it into a submission (what
``cvkit predict --checkpoint`` runs)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import pandas as pd
from torch import nn

from cvkit.data.evalspec import EvalSpec
from cvkit.inference.predict import FlipPairs, iter_predict, write_submission
from cvkit.run_folder import BEST_FILE, CONFIG_FILE, classes_file, kfold_members, run_checkpoints
from cvkit.tasks import Task, get_task

PathLike = Union[str, os.PathLike]


@dataclass
class RunModel:
    """What a finished run predicts with: its completed experiment, the model with its weights, class names."""

    config: Dict[str, Any]
    model: nn.Module
    classes: List[str]
    folder: Optional[Path] = None

    @property
    def tuning(self) -> Any:
        """The run's post-processing chosen on validation (``postprocess.json``...), or None."""
        return self.task.load_tuning(self.folder) if self.folder is not None else None

    @property
    def task(self) -> Task:
        return get_task(self.config["task"])

    def eval_spec(self, image_size: Optional[int] = None) -> EvalSpec:
        """The run's evaluation preprocessing of its last stage (at ``image_size`` when given), as data:
        the spec ``config.json`` records, or derived once from the pipeline an older run recorded."""
        from cvkit.experiment import eval_spec
        from cvkit.experiment import image_size as run_image_size

        last = self.config["stages"][-1]
        spec = eval_spec(self.config, run_image_size(self.config, last), last["name"])
        return spec.at(image_size) if image_size else spec

    def transform(self, image_size: Optional[int] = None) -> Any:
        """The run's evaluation pipeline of its last stage (at ``image_size`` when given), from :meth:`eval_spec`."""
        from cvkit.data.augment import eval_pipeline

        return eval_pipeline(self.eval_spec(image_size))


def load_run(config: PathLike, checkpoint: Optional[PathLike] = None) -> RunModel:
    """The run's completed experiment, its model holding ``checkpoint`` (default: ``best.pth`` beside
    ``config``, or in ``checkpoint`` when that is a folder) and its class names."""
    from cvkit.config import complete, load_experiment
    from cvkit.experiment import build_model
    from cvkit.models.weights import load_weights

    config = Path(config)
    if config.is_dir():
        folds = kfold_members(config)[0]
        config = (folds[0] if folds and not (config / CONFIG_FILE).is_file() else config) / CONFIG_FILE
    experiment = complete(load_experiment(config))
    checkpoint = Path(checkpoint) if checkpoint is not None else config.parent
    if checkpoint.is_dir():
        checkpoint = checkpoint / BEST_FILE
    task = get_task(experiment["task"])
    classes: List[str] = []
    names = classes_file(checkpoint.parent, config.parent)
    if names is not None:
        classes = [str(c) for c in json.loads(names.read_text())]
    spec = experiment["model"]
    if task.has_classes:
        given = spec.get("num_classes")
        if classes and given is not None and given != len(classes):
            raise ValueError(f"{names} names {len(classes)} classes but the model of {config} has {given} outputs; "
                             "expected one name per output")
        if classes:
            spec.setdefault("num_classes", len(classes))
        elif given is not None:
            classes = [str(i) for i in range(int(given))]
    model = build_model(experiment)
    load_weights(model, checkpoint)
    return RunModel(experiment, model, classes, config.parent)


def predict_run(
    checkpoint: Union[None, PathLike, Sequence[PathLike]],
    config: PathLike,
    images: PathLike,
    out: Optional[PathLike] = None,
    tta: Sequence[str] = (),
    probs: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    image_size: Optional[int] = None,
    root: Optional[PathLike] = None,
    path_col: str = "path",
    threshold: Optional[float] = None,
    workers: int = 0,
    progress: bool = True,
    flip_pairs: FlipPairs = None,
    tile: Optional[int] = None,
    overlap: int = 64,
    allow_missing_folds: bool = False,
) -> pd.DataFrame:
    """A run's submission for ``images``: :func:`load_run` + :func:`iter_predict` + :func:`write_submission`.

    ``checkpoint`` may be several files or a k-fold run folder: their models are averaged
    (:func:`run_checkpoints`; a k-fold folder missing a fold is refused unless ``allow_missing_folds``).
    The run's tuned post-processing (``postprocess.json``) applies unless ``threshold`` is given: a k-fold
    folder's own, tuned out-of-fold (:func:`cvkit.kfold.kfold`), else the first model's run's.
    """
    runs = [load_run(config, c) for c in run_checkpoints(checkpoint, allow_missing_folds)]
    run = runs[0]
    size = image_size or _run_size(run.config)
    predictions = iter_predict([r.model for r in runs], images, run.task, tta=tta, batch_size=batch_size, device=device,
                               transform=run.eval_spec(image_size), image_size=size, classes=run.classes,
                               flip_pairs=flip_pairs, root=root, path_col=path_col, workers=workers,
                               progress=progress, tile=tile, overlap=overlap)
    tuning = None
    if threshold is None:
        given = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
        kfold_folder = given[0] if len(given) == 1 and kfold_members(given[0])[0] else None
        tuning = (run.task.load_tuning(kfold_folder) if kfold_folder is not None else None) or run.tuning
    return write_submission(predictions, run.task, run.classes, out, probs=probs,
                            threshold=0.5 if threshold is None else threshold, tuning=tuning)


def _run_size(config: Dict[str, Any]) -> Optional[int]:
    from cvkit.experiment import image_size

    return image_size(config, config["stages"][-1])


__all__ = ["RunModel", "load_run", "predict_run"]
