"""StagedRunner: Catalyst's SupervisedRunner trained through a sequence of stages.

Catalyst removed stages in 22.02. Here each stage is one ``train()`` call with its own
optimizer, scheduler, loaders and an explicit callback list, while the runner keeps one global
epoch counter so TensorBoard, ``log.csv`` and checkpoints form a single timeline. The best
weights of a stage start the next one unless the stage says otherwise.
"""
from __future__ import annotations

import math
import platform
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from catalyst import dl
from catalyst.core.callback import Callback
from catalyst.core.engine import Engine
from catalyst.core.misc import sort_callbacks_by_order
from torch import nn
from torch.utils.data import DataLoader

from cvkit.callbacks.core import (
    BatchPlateauCallback,
    EarlyStopping,
    FreezeBatchNormCallback,
    GradientGuardCallback,
    GuardedBackwardCallback,
    GuardedOptimizerCallback,
    HistoryCallback,
    LRMonitorCallback,
    MetricsCallback,
    NaNGuardCallback,
    StageCheckpointCallback,
)
from cvkit.io import atomic_write_json, load_checkpoint, save_checkpoint, state_dict_of
from cvkit.metrics import Metric
from cvkit.perf import FastPaths, ProfileCallback
from cvkit.models.groups import apply_trainable, count_params, param_groups, resolve_lr, trainable_param_names
from cvkit.stages import SmoothedLossPlateau, Stage

Loaders = Mapping[str, DataLoader]
LoaderFactory = Callable[[Stage], Loaders]
MetricsFactory = Callable[[], Iterable[Metric]]


def make_engine(engine: Union[None, str, Engine] = None) -> Engine:
    """An explicit Catalyst engine: ``cpu``, ``gpu``, ``amp`` (fp16 on GPU), ``ddp``/``ddp_amp``
    (one process per visible GPU, nccl), or the best available.

    Catalyst's own default builds ``GPUEngine(fp16=...)``, which recent accelerate rejects. For DDP
    on CPU or across machines pass ``dl.DistributedDataParallelEngine(...)`` yourself (README).
    """
    if isinstance(engine, Engine):
        return engine
    if engine is None:
        engine = "gpu" if torch.cuda.is_available() else "cpu"
    if engine == "cpu":
        return dl.CPUEngine()
    if engine in ("gpu", "amp", "ddp", "ddp_amp"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"engine {engine!r} needs a CUDA GPU and none is visible; use engine='cpu'")
        precision = "fp16" if engine.endswith("amp") else "no"
        if engine.startswith("ddp"):
            return dl.DistributedDataParallelEngine(mixed_precision=precision)
        return dl.GPUEngine(mixed_precision=precision)
    raise ValueError(f"unknown engine {engine!r}; valid: 'cpu', 'gpu', 'amp', 'ddp', 'ddp_amp' or a catalyst Engine")


class StagedRunner(dl.SupervisedRunner):
    """Train one model through ``Stage`` after ``Stage``; see :meth:`fit`.

    After :meth:`fit`: ``history`` (one dict per epoch), ``best`` (stage, epoch, score, path),
    and the model holds the overall best weights.
    """

    def __init__(
        self,
        input_key: str = "features",
        output_key: str = "logits",
        target_key: str = "targets",
        loss_key: str = "loss",
    ) -> None:
        super().__init__(input_key=input_key, output_key=output_key, target_key=target_key, loss_key=loss_key)
        self.stage: Optional[Stage] = None
        self.stage_index = 0
        self.stage_start_epoch = 0
        self._batch_offset = 0
        self._sample_offset = 0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {}

    # Catalyst hooks: keep the global counters and use exactly the callbacks/loggers given.
    @property
    def num_epochs(self) -> int:
        return self.stage_start_epoch + self._num_epochs

    def on_experiment_start(self, runner: "StagedRunner") -> None:
        super().on_experiment_start(runner)
        resumed = getattr(self, "_resume_state", None)
        self.epoch_step = resumed["epoch"] if resumed else self.stage_start_epoch
        self.batch_step = self._batch_offset
        self.sample_step = self._sample_offset

    def on_loader_start(self, runner: "StagedRunner") -> None:
        super().on_loader_start(runner)
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            # A loader's own generator would carry its state across epochs; reseed it per epoch
            # (same on every rank) so an epoch's order depends on seed and epoch alone.
            generator.manual_seed(self.seed + self.epoch_step)

    def on_epoch_start(self, runner: "StagedRunner") -> None:
        super().on_epoch_start(runner)
        self.epoch_metrics["_epoch_"]["stage_index"] = float(self.stage_index)

    def get_callbacks(self) -> "OrderedDict[str, Callback]":
        return sort_callbacks_by_order(self._callbacks)

    def get_loggers(self) -> Dict[str, Any]:
        return dict(self._loggers or {})

    # The staged run.
    def fit(
        self,
        model: nn.Module,
        stages: Sequence[Stage],
        loaders: Union[Loaders, LoaderFactory],
        criterion: nn.Module,
        logdir: Union[str, Path],
        metrics: Optional[MetricsFactory] = None,
        callbacks: Optional[Callable[[Stage], Iterable[Callback]]] = None,
        valid_loader: str = "valid",
        valid_metric: str = "loss",
        minimize_valid_metric: bool = True,
        engine: Union[None, str, Engine] = None,
        seed: int = 42,
        verbose: bool = True,
        config: Optional[Dict[str, Any]] = None,
        test_loader: Optional[DataLoader] = None,
        resume: Union[None, bool, str, Path] = None,
        fast: Optional[FastPaths] = None,
        profile: bool = False,
    ) -> "StagedRunner":
        """Run every stage in order and return self.

        Args:
            model: any model whose head cvkit can name (timm, smp, or ``head_names``).
            stages: the stages, in order; names must be unique.
            loaders: ``{"train": ..., "valid": ...}`` or a factory ``f(stage) -> loaders`` so each
                stage can have its own batch and image size.
            criterion: the loss; the model's output goes in as ``logits``, batch ``targets`` as target.
            logdir: where config.json, log.csv, tensorboard/, checkpoints/, best.pth,
                metrics.json and progress.png go.
            metrics: factory of cvkit metrics computed on every loader (fresh objects per stage).
            callbacks: factory ``f(stage) -> callbacks`` added to each stage's list.
            valid_loader / valid_metric / minimize_valid_metric: what "best" means.
            engine: ``"cpu"``, ``"gpu"``, ``"amp"`` or a Catalyst engine (default: GPU if any).
            seed: seeds each stage (Catalyst reseeds per epoch from it).
            verbose: progress bars and a line per epoch.
            config: extra facts to record in config.json (model name, data, ...).
            test_loader: evaluated with the best weights at the end into metrics.json.
            resume: True (``logdir/checkpoints/resume.pth``) or a path: continue a killed run
                from its last completed epoch; on CPU with a fixed seed the result equals an
                uninterrupted run.
            fast: GPU speed switches (channels_last, compile, cudnn_benchmark); see cvkit.perf.
            profile: profile 10 train batches of the first epoch into logdir/profile.txt.
        """
        stages = list(stages)
        self._check_stages(model, stages)
        self._stages = stages
        self._resume_state: Optional[Dict[str, Any]] = None
        self._fast, self._profile = fast or FastPaths(), profile
        self._fast.apply(model)
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.logdir = logdir
        self.valid_loader_key, self.valid_metric_key = valid_loader, valid_metric
        self.minimize = minimize_valid_metric
        self.history, self.best = [], {}
        self.stage_start_epoch = self._batch_offset = self._sample_offset = 0
        state = self._read_resume(logdir, stages, resume) if resume else None
        engine = make_engine(engine)
        if isinstance(engine, dl.DistributedDataParallelEngine):
            # Spawned workers receive the runner by pickling; the default file-descriptor sharing
            # fails here on empty tensors ("unable to resize file"), file-system sharing does not.
            torch.multiprocessing.set_sharing_strategy("file_system")
        if state is None:
            self._write_config(logdir, model, stages, loaders, criterion, engine, seed, config)
        first = 0
        if state is not None:
            self.history, self.best = list(state["history"]), dict(state["run_best"])
            first = state["stage_index"] + (1 if state["stage_finished"] else 0)
            self.stage_start_epoch = state["epoch"] if state["stage_finished"] else state["stage_start_epoch"]
            self._batch_offset, self._sample_offset = state["batch_step"], state["sample_step"]
            self.epoch_step = state["epoch"]
        previous: Optional[Path] = logdir / "checkpoints" / stages[first - 1].name if first else None
        for index, stage in enumerate(stages):
            if index < first:
                continue
            self.stage, self.stage_index = stage, index
            self._resume_state = state if state is not None and index == state["stage_index"] else None
            if self._resume_state is not None:
                model.load_state_dict(self._resume_state["model"])
            else:
                self._load_init(model, stage, previous)
            stage_loaders = loaders(stage) if callable(loaders) else loaders
            self._check_loaders(stage, stage_loaders, valid_loader)
            folder = logdir / "checkpoints" / stage.name
            self._run_stage(
                model, stage, stage_loaders, criterion, metrics, callbacks, folder, engine, seed, verbose
            )
            previous = folder
            self._sync_from_disk(logdir)
        self._finish(model, logdir, test_loader, metrics, engine)
        return self

    def _check_stages(self, model: nn.Module, stages: List[Stage]) -> None:
        if not stages:
            raise ValueError("fit() needs at least one Stage")
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes}")
        for stage in stages:
            try:
                names = trainable_param_names(model, stage.trainable)
            except KeyError as exc:
                raise KeyError(f"stage {stage.name!r}: trainable={stage.trainable!r}: {exc.args[0]}") from None
            try:
                resolve_lr(model, names, stage.lr, stage.layer_decay)
            except KeyError as exc:
                raise KeyError(f"stage {stage.name!r}: lr={stage.lr!r}: {exc.args[0]}") from None
        if stages[0].init in ("best", "last"):
            stages[0].init = "current"

    @staticmethod
    def _check_loaders(stage: Stage, loaders: Loaders, valid_loader: str) -> None:
        for key in loaders:
            if not key.startswith(("train", "valid", "infer")):
                raise ValueError(f"stage {stage.name!r}: loader name {key!r} must start with 'train', 'valid' or 'infer'")
        if not any(k.startswith("train") for k in loaders):
            raise ValueError(f"stage {stage.name!r}: no train loader among {list(loaders)}")
        if valid_loader not in loaders:
            raise ValueError(f"stage {stage.name!r}: valid loader {valid_loader!r} missing; loaders are {list(loaders)}")

    def _sync_from_disk(self, logdir: Path) -> None:
        """Take counters, history and best from the stage's last ``resume.pth``.

        Under DDP the stage ran in spawned processes whose runner state never comes back;
        reading what rank 0 wrote keeps the parent right (and is a no-op otherwise).
        """
        state = load_checkpoint(logdir / "checkpoints" / "resume.pth")
        self.history[:] = state["history"]
        self.best = dict(state["run_best"])
        self.epoch_step = self.stage_start_epoch = int(state["epoch"])
        self._batch_offset, self._sample_offset = int(state["batch_step"]), int(state["sample_step"])

    def _load_init(self, model: nn.Module, stage: Stage, previous: Optional[Path]) -> None:
        if stage.init == "current" and previous is None:
            return
        if stage.init in ("best", "last", "current"):
            path = previous / f"{'last' if stage.init == 'current' else stage.init}.pth"
        else:
            path = Path(stage.init)
        model.load_state_dict(state_dict_of(load_checkpoint(path), path))

    def _stage_callbacks(
        self,
        stage: Stage,
        frozen_bn: List[str],
        metrics: Optional[MetricsFactory],
        extra: Optional[Callable[[Stage], Iterable[Callback]]],
        folder: Path,
        scheduler: Any,
        verbose: bool,
    ) -> Dict[str, Callback]:
        keys = dict(input_key=self._output_key, target_key=self._target_key)
        resumed = self._resume_state
        guard = NaNGuardCallback(stage.on_nan, loss_key=self._loss_key)
        monitor = stage.monitor or (self.valid_loader_key, self.valid_metric_key)
        out: Dict[str, Callback] = {
            "freeze_bn": FreezeBatchNormCallback(frozen_bn),
            "criterion": self._criterion_callback(stage),
            "nan_guard": guard,
            "backward": GuardedBackwardCallback(metric_key=self._loss_key),
            "gradient_guard": GradientGuardCallback(guard),
            "optimizer": GuardedOptimizerCallback(metric_key=self._loss_key),
            "lr_monitor": LRMonitorCallback(),
            "checkpoint": StageCheckpointCallback(
                folder, self.logdir / "checkpoints" / "resume.pth", stage.name,
                self.valid_loader_key, self.valid_metric_key, self.minimize,
                **(resumed["stage_best"] if resumed else {}),
            ),
            "history": HistoryCallback(self.logdir / "log.csv", stage.name, self.stage_index, self.history),
        }
        if metrics is not None:
            out["metrics"] = MetricsCallback(metrics(), **keys)
        if isinstance(scheduler, SmoothedLossPlateau):
            out["scheduler"] = BatchPlateauCallback(self._loss_key)
        elif scheduler is not None:
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            out["scheduler"] = dl.SchedulerCallback(
                mode=stage.interval, **(dict(loader_key=monitor[0], metric_key=monitor[1]) if plateau else {})
            )
        if stage.early_stopping:
            es = stage.early_stopping
            out["early_stopping"] = EarlyStopping(
                resume_state=resumed["early_stopping"] if resumed else None,
                patience=es["patience"],
                loader_key=es.get("loader", self.valid_loader_key),
                metric_key=es.get("metric", self.valid_metric_key),
                minimize=es.get("minimize", self.minimize),
                min_delta=es.get("min_delta", 1e-6),
            )
        if verbose:
            out["progress"] = dl.TqdmCallback()
        out.update(self._fast.callbacks(self._input_key))
        if self._profile and self.stage_index == 0:
            out["profile"] = ProfileCallback(self.logdir)
        for i, callback in enumerate(extra(stage) if extra else ()):
            out[f"extra_{i}_{type(callback).__name__}"] = callback
        return out

    def _criterion_callback(self, stage: Stage) -> Callback:
        keys = dict(input_key=self._output_key, target_key=self._target_key, metric_key=self._loss_key)
        if stage.loss_range is None:
            return dl.CriterionCallback(**keys)
        from cvkit.callbacks.loss_range import LossRangeCallback

        options = stage.loss_range if isinstance(stage.loss_range, Mapping) else {"band": tuple(stage.loss_range)}
        return LossRangeCallback(**keys, logdir=self.logdir / "loss_range" / stage.name, **options)

    def record_best(self, stage: str, path: Path, score: float, epoch: int) -> None:
        """Called by the checkpoint callback on a stage's new best: keep the run's overall best."""
        old = self.best.get("score")
        if old is None or (score < old if self.minimize else score > old):
            self.best = {"stage": stage, "epoch": epoch, "score": score, "path": str(path)}

    def _run_stage(
        self,
        model: nn.Module,
        stage: Stage,
        loaders: Loaders,
        criterion: nn.Module,
        metrics: Optional[MetricsFactory],
        extra: Optional[Callable[[Stage], Iterable[Callback]]],
        folder: Path,
        engine: Engine,
        seed: int,
        verbose: bool,
    ) -> None:
        trainable = trainable_param_names(model, stage.trainable)
        frozen_bn = apply_trainable(model, trainable, stage.train_bn)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        groups = param_groups(model, names, stage.lr, stage.weight_decay, stage.layer_decay)
        optimizer = stage.build_optimizer(groups)
        train_key = next(k for k in loaders if k.startswith("train"))
        scheduler = stage.build_scheduler(optimizer, len(loaders[train_key]), self.minimize)
        if self._resume_state is not None:
            optimizer.load_state_dict(self._resume_state["optimizer"])
            if scheduler is not None and self._resume_state["scheduler"] is not None:
                scheduler.load_state_dict(self._resume_state["scheduler"])
        callbacks = self._stage_callbacks(stage, frozen_bn, metrics, extra, folder, scheduler, verbose)
        if verbose:
            n_train, n_total = count_params(model)
            print(
                f"[cvkit] stage {self.stage_index + 1} {stage.name!r}: {n_train:,}/{n_total:,} parameters trainable, "
                f"{len(frozen_bn)} BatchNorm frozen, groups "
                + ", ".join(sorted({f"{g['name']}={g['lr']:.2e}" for g in groups}))
            )
        loggers: Dict[str, Any] = {"tensorboard": dl.TensorboardLogger(logdir=str(self.logdir / "tensorboard"))}
        if verbose:
            loggers["console"] = dl.ConsoleLogger()
        with warnings.catch_warnings():
            # Known, harmless warnings from the pinned stack, repeated every stage otherwise:
            # accelerate<1.0 deprecating its TPU enum, Catalyst's loss metric calling float() on
            # the undetached loss, and Catalyst not recognising cvkit's per-batch plateau callback
            # as a scheduler callback.
            warnings.filterwarnings("ignore", message=r"The `TPU` of `<enum 'DistributedType'>`", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"Converting a tensor with requires_grad=True to a scalar")
            warnings.filterwarnings("ignore", message=r"No ``ISchedulerCallback/SchedulerCallback`` were found")
            self.train(
                model=model,
                engine=engine,
                criterion=criterion,
                optimizer=optimizer,
                scheduler=scheduler,
                loaders=OrderedDict(loaders),
                callbacks=callbacks,
                loggers=loggers,
                num_epochs=stage.epochs,
                seed=seed,
                valid_loader=self.valid_loader_key,
                valid_metric=self.valid_metric_key,
                minimize_valid_metric=self.minimize,
                verbose=False,
            )

    def resume_payload(self) -> Dict[str, Any]:
        """Everything needed to continue after the epoch that just ended (plain data only)."""
        callbacks = self.callbacks
        early = callbacks.get("early_stopping")
        checkpoint = callbacks["checkpoint"]
        model = self.engine.unwrap_model(self.model)
        return {
            "format": "cvkit-resume-1",
            "stage": self.stage.name,
            "metrics": {k: dict(v) for k, v in self.epoch_metrics.items()},
            "stages": [s.name for s in self._stages],
            "stage_index": self.stage_index,
            "stage_start_epoch": self.stage_start_epoch,
            "epoch": int(self.epoch_step),
            "stage_finished": bool(self.need_early_stop or self.epoch_step >= self.num_epochs),
            "batch_step": int(self.batch_step),
            "sample_step": int(self.sample_step),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "early_stopping": early.state_dict() if early is not None else None,
            "stage_best": {"best_score": checkpoint.best_score, "best_epoch": checkpoint.best_epoch},
            "run_best": dict(self.best),
            "history": list(self.history),
        }

    def _read_resume(self, logdir: Path, stages: List[Stage], resume: Union[bool, str, Path]) -> Optional[Dict[str, Any]]:
        path = logdir / "checkpoints" / "resume.pth" if resume is True else Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"nothing to resume: {path} does not exist (no epoch of this run finished)")
        state = load_checkpoint(path)
        if state.get("format") != "cvkit-resume-1":
            raise ValueError(f"{path} is not a cvkit resume file (format {state.get('format')!r})")
        names = [s.name for s in stages]
        if state["stages"] != names:
            raise ValueError(f"{path} was written by a run with stages {state['stages']}, not {names}")
        return state

    def _write_config(
        self,
        logdir: Path,
        model: nn.Module,
        stages: List[Stage],
        loaders: Union[Loaders, LoaderFactory],
        criterion: nn.Module,
        engine: Engine,
        seed: int,
        extra: Optional[Dict[str, Any]],
    ) -> None:
        import catalyst
        import timm

        import cvkit

        config = {
            "stages": [s.to_dict() for s in stages],
            "model": type(model).__name__,
            "criterion": repr(criterion),
            "loaders": getattr(loaders, "__name__", None) or sorted(loaders),
            "valid": {"loader": self.valid_loader_key, "metric": self.valid_metric_key, "minimize": self.minimize},
            "engine": type(engine).__name__,
            "seed": seed,
            "fast_paths": self._fast.to_dict(),
            "profile": self._profile,
            "versions": {
                "cvkit": cvkit.__version__,
                "torch": torch.__version__,
                "catalyst": catalyst.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        config.update(extra or {})
        atomic_write_json(logdir / "config.json", config)

    def _finish(
        self, model: nn.Module, logdir: Path, test_loader: Optional[DataLoader], metrics: Optional[MetricsFactory], engine: Engine
    ) -> None:
        if not self.best:
            raise RuntimeError(
                f"no epoch produced a finite {self.valid_loader_key}/{self.valid_metric_key}; nothing to keep as best"
            )
        best_path = Path(self.best["path"])
        checkpoint = load_checkpoint(best_path)
        model.load_state_dict(state_dict_of(checkpoint, best_path))
        save_checkpoint(logdir / "best.pth", {
            "model": state_dict_of(checkpoint, best_path), "stage": checkpoint["stage"],
            "epoch": checkpoint["epoch"], "metrics": checkpoint["metrics"],
        })
        result: Dict[str, Any] = {"best": dict(self.best), "valid": checkpoint["metrics"].get(self.valid_loader_key, {})}
        result["epochs"] = int(self.epoch_step)
        if test_loader is not None:
            result["test"] = evaluate(model, test_loader, self.criterion, metrics, engine, self._input_key, self._target_key)
        self.final_metrics = result
        atomic_write_json(logdir / "metrics.json", result)
        from cvkit.plots import plot_progress

        plot_progress(self.history, logdir / "progress.png", self.valid_metric_key)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: Optional[nn.Module] = None,
    metrics: Optional[MetricsFactory] = None,
    engine: Union[None, str, Engine] = None,
    input_key: str = "features",
    target_key: str = "targets",
) -> Dict[str, float]:
    """Loss (mean over samples) and metrics of ``model`` on ``loader``, in eval mode."""
    device = torch.device("cuda") if isinstance(engine, Engine) and engine.device.type == "cuda" else torch.device("cpu")
    model = model.to(device).eval()
    metric_objs = list(metrics()) if metrics else []
    for metric in metric_objs:
        metric.reset()
    total, count = 0.0, 0
    for batch in loader:
        if not isinstance(batch, Mapping):
            batch = {input_key: batch[0], target_key: batch[1]}
        x = batch[input_key].to(device)
        y = batch[target_key].to(device)
        out = model(x)
        if criterion is not None:
            loss = criterion(out, y)
            n = len(x)
            total += float(loss.mean()) * n
            count += n
        for metric in metric_objs:
            metric.update(out, y)
    result: Dict[str, float] = {"loss": total / count} if count else {}
    for metric in metric_objs:
        result.update(metric.compute())
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in result.items()}


__all__ = ["StagedRunner", "evaluate", "make_engine"]
