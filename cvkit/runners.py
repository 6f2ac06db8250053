"""StagedRunner: Catalyst's SupervisedRunner trained through a sequence of stages.

Catalyst removed stages in 22.02. Here each stage is one ``train()`` call with its own
optimizer, scheduler, loaders and an explicit callback list, while the runner keeps one global
epoch counter so TensorBoard, ``log.csv`` and checkpoints form a single timeline. The best
weights of a stage start the next one unless the stage says otherwise.
"""
from __future__ import annotations

import contextlib
import math
import platform
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from catalyst import dl
from catalyst.core.callback import Callback, CallbackOrder
from catalyst.core.engine import Engine
from catalyst.core.misc import sort_callbacks_by_order
from torch import nn
from torch.utils.data import DataLoader

from cvkit.callbacks.console import ConsoleTableCallback, progress_bars_wanted
from cvkit.callbacks.tensorboard import run_hparams, write_hparams
from cvkit.callbacks import (
    AccumulatingBackwardCallback,
    AccumulatingOptimizerCallback,
    AccumulationWindow,
    BatchPlateauCallback,
    CriterionCallback,
    EarlyStopping,
    EmaCallback,
    FreezeBatchNormCallback,
    GradientGuardCallback,
    HistoryCallback,
    LRMonitorCallback,
    MetricsCallback,
    MixupCallback,
    NaNGuardCallback,
    RunState,
    StageCheckpointCallback,
    StageTensorboardLogger,
    WindowSchedulerCallback,
    check_callbacks,
    plateau_mode,
    stage_suffix,
)
from cvkit.feature_cache import CachedFeatures, cached_loaders, features_as_input
from cvkit.io import CheckpointError, clean_stale_temporaries, load_checkpoint, save_checkpoint, state_dict_of
from cvkit.lock import RunLock
from cvkit.loggers import DEFAULT_LOGGERS, LoggerSpec, default_tracking_uri, logger_specs, require_packages
from cvkit.metrics import Metric, metric_minimized
from cvkit.perf import FastPaths, ProfileCallback
from cvkit.run_folder import read_config, record_pipelines, write_config, write_metrics
from cvkit.models.groups import apply_trainable, count_params, param_groups, resolve_lr, trainable_param_names
from cvkit.stages import SmoothedLossPlateau, Stage, ema_options

Loaders = Mapping[str, DataLoader]
LoaderFactory = Callable[[Stage], Loaders]
MetricsFactory = Callable[[], Iterable[Metric]]


def make_engine(engine: Union[None, str, Engine] = None) -> Engine:
    """An explicit Catalyst engine: ``cpu``, ``gpu``, ``amp`` (fp16 on GPU), ``ddp``/``ddp_amp``
    (one process per visible GPU, nccl; across machines as torchrun's or Slurm's environment says,
    see :func:`cvkit.distributed.engine_from_env`), or the best available.

    Catalyst's own default builds ``GPUEngine(fp16=...)``, which recent accelerate rejects. For DDP
    on CPU pass :func:`cvkit.distributed.ddp_engine` ``(cpu=True, workers=...)`` yourself.
    """
    if isinstance(engine, Engine):
        return engine
    if engine is None:
        engine = "gpu" if torch.cuda.is_available() else "cpu"
    if engine == "cpu":
        return dl.CPUEngine()
    if engine in ("gpu", "amp", "ddp", "ddp_amp"):
        if not torch.cuda.is_available():
            raise ValueError(f"engine {engine!r} needs a CUDA GPU and none is visible; use engine='cpu'")
        precision = "fp16" if engine.endswith("amp") else "no"
        if engine.startswith("ddp"):
            from cvkit.distributed import engine_from_env

            return engine_from_env(mixed_precision=precision)
        return dl.GPUEngine(mixed_precision=precision)
    raise ValueError(f"unknown engine {engine!r}; valid: 'cpu', 'gpu', 'amp', 'ddp', 'ddp_amp' or a catalyst Engine")


def _at(callback: Callback, order: int) -> Callback:
    """``callback`` moved to ``order`` (for Catalyst callbacks whose default order is taken)."""
    callback.order = order
    return callback


class StagedRunner(dl.SupervisedRunner):
    """Train one model through ``Stage`` after ``Stage``; see :meth:`fit`.

    The runner and its callbacks share one :class:`~cvkit.callbacks.RunState`, ``run_state``:
    stage, counters, best epoch, history, the NaN guard's skip flag. After :meth:`fit`:
    ``history`` (one dict per epoch), ``best`` (stage, epoch, score, path), and the model holds
    the overall best weights.
    """

    def __init__(
        self,
        input_key: str = "features",
        output_key: str = "logits",
        target_key: str = "targets",
        loss_key: str = "loss",
    ) -> None:
        super().__init__(input_key=input_key, output_key=output_key, target_key=target_key, loss_key=loss_key)
        self.run_state = RunState(resume_payload=self._resume_payload)
        self._resume_state: Optional[Dict[str, Any]] = None
        self._ema: Optional[EmaCallback] = None
        self._logger_specs: List[Dict[str, Any]] = logger_specs(DEFAULT_LOGGERS)
        self._mlflow: Any = None
        self._run_hparams: Dict[str, Any] = {}

    # Read-only views of the run state, for users of a finished (or running) fit.
    @property
    def stage(self) -> Optional[Stage]:
        """The stage that runs (the last one after :meth:`fit`)."""
        return self.run_state.stage

    @property
    def stage_index(self) -> int:
        """Position of :attr:`stage` in the run's stages."""
        return self.run_state.stage_index

    @property
    def stage_start_epoch(self) -> int:
        """Global epochs completed before :attr:`stage` started."""
        return self.run_state.stage_start_epoch

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One row per finished epoch, as in ``log.csv``."""
        return self.run_state.history

    @property
    def best(self) -> Dict[str, Any]:
        """The run's best epoch: stage, epoch, score and checkpoint path."""
        return self.run_state.best

    @property
    def logdir(self) -> Optional[Path]:
        """The run's folder."""
        return self.run_state.logdir

    # Catalyst hooks: keep the global counters and use exactly the callbacks/loggers given.
    @property
    def num_epochs(self) -> int:
        return self.run_state.stage_start_epoch + self._num_epochs

    def on_experiment_start(self, runner: "StagedRunner") -> None:
        super().on_experiment_start(runner)
        state, resumed = self.run_state, self._resume_state
        self.epoch_step = resumed["epoch"] if resumed else state.stage_start_epoch
        self.batch_step = state.batch_offset
        self.sample_step = state.sample_offset

    def on_loader_start(self, runner: "StagedRunner") -> None:
        super().on_loader_start(runner)
        generator = getattr(self.loader, "generator", None)
        if isinstance(generator, torch.Generator):
            # A loader's own generator would carry its state across epochs; reseed it per epoch
            # (same on every rank) so an epoch's order depends on seed and epoch alone.
            generator.manual_seed(self.seed + self.epoch_step)
        dataset = getattr(self.loader, "dataset", None)
        if isinstance(dataset, CachedFeatures):
            dataset.set_epoch(self.epoch_step - self.run_state.stage_start_epoch - 1)

    def on_epoch_start(self, runner: "StagedRunner") -> None:
        super().on_epoch_start(runner)
        self.epoch_metrics["_epoch_"]["stage_index"] = float(self.run_state.stage_index)

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
        minimize_valid_metric: Optional[bool] = None,
        engine: Union[None, str, Engine] = None,
        seed: int = 42,
        verbose: bool = True,
        config: Optional[Dict[str, Any]] = None,
        test_loader: Optional[DataLoader] = None,
        resume: Union[None, bool, str, Path] = None,
        fast: Optional[FastPaths] = None,
        profile: bool = False,
        loggers: Sequence[LoggerSpec] = DEFAULT_LOGGERS,
        postprocess: Optional[Callable[[nn.Module], Dict[str, Any]]] = None,
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
            valid_loader / valid_metric / minimize_valid_metric: what "best" means; the direction
                comes from the metric (``lower_is_better``; ``loss*`` is minimised) unless given.
            engine: ``"cpu"``, ``"gpu"``, ``"amp"`` or a Catalyst engine (default: GPU if any).
            seed: seeds each stage (Catalyst reseeds per epoch from it).
            verbose: progress bars and a line per epoch.
            config: extra facts to record in config.json (model name, data, ...).
            test_loader: evaluated with the best weights at the end into metrics.json.
            resume: True (``logdir/checkpoints/resume.pth``) or a path: continue a killed run
                from its last completed epoch; on CPU with a fixed seed the result equals an
                uninterrupted run. When the interrupted stage's :data:`~cvkit.stages.SCHEDULE_KEYS`
                settings changed since (a new LR, more epochs...), it continues on the new settings'
                schedule: its optimizer's moments are kept (same optimizer kind), its LRs and scheduler are
                rebuilt and advanced to the epoch it resumes at; a stage that had run all its epochs
                continues when it has more now.
            fast: GPU speed switches (channels_last, compile, cudnn_benchmark); see cvkit.perf.
            profile: profile 10 train batches of the first epoch into logdir/profile.txt.
            loggers: where metrics go besides log.csv: ``"tensorboard"`` (logdir/tensorboard, the
                default) and ``"mlflow"`` (one MLflow run, by default in a SQLite store under
                logdir/mlruns; ``{"name": "mlflow", "tracking_uri": ..., "experiment": ...}`` to
                choose); see :mod:`cvkit.loggers`.
            postprocess: called with the model holding the best weights after the test evaluation;
                what it returns is added to metrics.json, which is written last (a run folder holding
                metrics.json is finished).
        """
        self._logger_specs = logger_specs(loggers)
        require_packages(self._logger_specs)
        stages = list(stages)
        self._check_stages(model, stages)
        if minimize_valid_metric is None:
            minimize_valid_metric = _minimized(valid_metric, metrics)
        self._stages = stages
        self._resume_state = None
        self._fast, self._profile = fast or FastPaths(), profile
        self._fast.apply(model)
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        with RunLock(logdir):
            self._fit_locked(model, stages, loaders, criterion, logdir, metrics, callbacks, valid_loader, valid_metric,
                             minimize_valid_metric, engine, seed, verbose, config, test_loader, resume, postprocess)
        return self

    def _fit_locked(self, model: nn.Module, stages: List[Stage], loaders: Union[Loaders, LoaderFactory],
                    criterion: nn.Module, logdir: Path, metrics: Optional[MetricsFactory],
                    callbacks: Optional[Callable[[Stage], Iterable[Callback]]], valid_loader: str, valid_metric: str,
                    minimize_valid_metric: bool, engine: Union[None, str, Engine], seed: int, verbose: bool,
                    config: Optional[Dict[str, Any]], test_loader: Optional[DataLoader],
                    resume: Union[None, bool, str, Path],
                    postprocess: Optional[Callable[[nn.Module], Dict[str, Any]]]) -> None:
        """:meth:`fit` once the run folder is held."""
        clean_stale_temporaries(logdir)
        self.valid_loader_key, self.valid_metric_key = valid_loader, valid_metric
        self.minimize = minimize_valid_metric
        self.run_state = run = RunState(logdir=logdir, minimize=minimize_valid_metric, resume_payload=self._resume_payload)
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
            run.history, run.best = list(state["history"]), dict(state["run_best"])
            finished = state["stage_finished"] and not _has_more_epochs(state, stages[state["stage_index"]])
            first = state["stage_index"] + (1 if finished else 0)
            run.stage_start_epoch = state["epoch"] if finished else state["stage_start_epoch"]
            run.batch_offset, run.sample_offset = state["batch_step"], state["sample_step"]
            self.epoch_step = state["epoch"]
        self._run_hparams = run_hparams(stages, _facts(logdir))
        self._mlflow = self._start_mlflow(logdir, config, state)
        try:
            self._run_stages(model, stages, first, state, loaders, criterion, logdir, metrics, callbacks,
                             valid_loader, engine, seed, verbose, config)
            self._finish(model, logdir, test_loader, metrics, engine, criterion, postprocess)
        except BaseException as exc:
            if self._mlflow is not None:
                self._mlflow.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        if self._mlflow is not None:
            self._mlflow.end()

    def _run_stages(self, model: nn.Module, stages: List[Stage], first: int, state: Optional[Dict[str, Any]],
                    loaders: Union[Loaders, LoaderFactory], criterion: nn.Module, logdir: Path,
                    metrics: Optional[MetricsFactory], callbacks: Optional[Callable[[Stage], Iterable[Callback]]],
                    valid_loader: str, engine: Engine, seed: int, verbose: bool,
                    config: Optional[Dict[str, Any]]) -> None:
        """Every stage from ``first`` on, each starting from the previous one's weights (or the resume state)."""
        run = self.run_state
        previous: Optional[Path] = logdir / "checkpoints" / stages[first - 1].name if first else None
        for index, stage in enumerate(stages):
            if index < first:
                continue
            self._resume_state = state if state is not None and index == state["stage_index"] else None
            run.start_stage(stage, index, self._resume_state)
            if self._resume_state is not None:
                raw = self._resume_state.get("train_model") or self._resume_state["model"]
                self._load_state(model, raw, logdir / "checkpoints" / "resume.pth")
            else:
                self._load_init(model, stage, previous)
            stage_loaders = loaders(stage) if callable(loaders) else loaders
            self._check_loaders(stage, stage_loaders, valid_loader)
            if not (config or {}).get("pipelines"):
                self._record_pipelines(logdir, stage, stage_loaders)
            folder = logdir / "checkpoints" / stage.name
            cached = contextlib.nullcontext()
            if stage.cache_features:
                self._apply_trainable(model, stage, trainable_param_names(model, stage.trainable))
                stage_loaders = cached_loaders(model, stage_loaders, stage.cache_features, seed + index, engine.device,
                                               self._input_key, self._target_key,
                                               f"stage {stage.name!r}: cache_features", verbose)
                cached = features_as_input(model)
            with cached:
                self._run_stage(
                    model, stage, stage_loaders, criterion, metrics, callbacks, folder, engine, seed, verbose
                )
            previous = folder
            self._sync_from_disk(logdir)

    def _start_mlflow(self, logdir: Path, config: Optional[Dict[str, Any]], state: Optional[Dict[str, Any]]) -> Any:
        """The run's MLflow logger when ``loggers`` names mlflow (continuing a resumed run's MLflow run), else None.

        Experiment: the ``experiment`` option, else the run's ``name``, else the run folder's name;
        MLflow run name: the run folder's name.
        """
        spec = next((s for s in self._logger_specs if s["name"] == "mlflow"), None)
        if spec is None:
            return None
        from cvkit.callbacks.mlflow import RunMLflowLogger

        local = not spec.get("tracking_uri")
        uri = default_tracking_uri(logdir) if local else spec["tracking_uri"]
        artifacts = (logdir.resolve() / "mlruns" / "artifacts").as_uri() if local else None
        experiment = spec.get("experiment") or (config or {}).get("name") or logdir.resolve().name
        return RunMLflowLogger(str(experiment), logdir.resolve().name, uri, artifacts,
                               run_id=(state or {}).get("mlflow_run_id"), tags={"cvkit.logdir": str(logdir.resolve())})

    @staticmethod
    def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
        """Weights this run wrote (``path``), or one line saying they belong to another model."""
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path} holds weights of another model than {type(model).__name__} (architecture "
                             f"or sizes changed since the run started): {' '.join(str(exc).split())[:200]}") from None

    def _record_pipelines(self, logdir: Path, stage: Stage, loaders: Loaders) -> None:
        """Add the stage's loaders' exact augmentation pipelines to config.json (albumentations' own format)."""
        recorded = {key: spec for key, loader in loaders.items() if (spec := _pipeline_of(loader)) is not None}
        if recorded:
            record_pipelines(logdir, stage.name, recorded)

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
        state, run = load_checkpoint(logdir / "checkpoints" / "resume.pth"), self.run_state
        run.history[:] = state["history"]
        run.best = dict(state["run_best"])
        self.epoch_step = run.stage_start_epoch = int(state["epoch"])
        run.batch_offset, run.sample_offset = int(state["batch_step"]), int(state["sample_step"])

    def _load_init(self, model: nn.Module, stage: Stage, previous: Optional[Path]) -> None:
        if stage.init == "current" and previous is None:
            return
        if stage.init in ("best", "last", "current"):
            path = previous / f"{'last' if stage.init == 'current' else stage.init}.pth"
        else:
            path = Path(stage.init)
        self._load_state(model, state_dict_of(load_checkpoint(path), path), path)

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
        """The stage's callbacks by name, each at its own ``order`` (checked before the stage runs).

        cvkit's run at 3-5 (channels_last, profile, freeze_bn), 7 (mixup), 11-12 (criterion, metrics),
        29-32 (nan_guard, backward, gradient_guard), 41 (optimizer), 43 (ema), 51-52 (scheduler, lr_monitor) and
        101-121 (early_stopping, progress, history, checkpoint, console); Catalyst's default orders (0, 10,
        20, ..., 100) stay free for the user's callbacks.
        """
        logdir = self.run_state.logdir
        guard = NaNGuardCallback(stage.on_nan, loss_key=self._loss_key)
        out: Dict[str, Callback] = {"freeze_bn": FreezeBatchNormCallback(frozen_bn)}
        out["criterion"] = self._criterion_callback(stage)
        if metrics is not None:
            out["metrics"] = MetricsCallback(metrics(), input_key=self._output_key, target_key=self._target_key)
        if stage.mixup is not None:
            out["mixup"] = MixupCallback(stage.mixup, self._input_key, self._target_key, f"stage {stage.name!r}: ")
        window = AccumulationWindow(stage.accumulate)
        out["nan_guard"] = guard
        out["backward"] = AccumulatingBackwardCallback(self._loss_key, window)
        out["gradient_guard"] = GradientGuardCallback(guard)
        out["optimizer"] = optimizer = AccumulatingOptimizerCallback(self._loss_key, window)
        self._ema = None
        if stage.ema is not None:
            resumed = (self._resume_state or {}).get("ema")
            self._ema = out["ema"] = EmaCallback(ema_options(stage.ema), optimizer, (self.valid_loader_key,), resumed)
        if isinstance(scheduler, SmoothedLossPlateau):
            out["scheduler"] = BatchPlateauCallback(self._loss_key, optimizer)
        elif scheduler is not None:
            plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
            monitor = self._monitor(stage)
            out["scheduler"] = _at(WindowSchedulerCallback(
                window, mode=stage.interval, **(dict(loader_key=monitor[0], metric_key=monitor[1]) if plateau else {})
            ), CallbackOrder.Scheduler + 1)
        out["lr_monitor"] = LRMonitorCallback()
        if stage.early_stopping:
            es = stage.early_stopping
            out["early_stopping"] = EarlyStopping(
                patience=es["patience"],
                loader_key=es.get("loader", self.valid_loader_key),
                metric_key=es.get("metric", self.valid_metric_key),
                minimize=es.get("minimize", plateau_mode(es.get("metric", self.valid_metric_key), self.minimize,
                                                         self._loss_key) == "min"),
                min_delta=es.get("min_delta", 1e-6),
            )
        if verbose:
            out["console"] = ConsoleTableCallback(self.valid_loader_key, self.valid_metric_key)
            if progress_bars_wanted():
                out["progress"] = _at(dl.TqdmCallback(), CallbackOrder.External + 2)
        out["history"] = HistoryCallback(logdir / "log.csv")
        out["checkpoint"] = StageCheckpointCallback(
            folder, logdir / "checkpoints" / "resume.pth", self.valid_loader_key, self.valid_metric_key,
            self._candidate_weights(stage),
        )
        out.update(self._fast.callbacks(self._input_key))
        if self._profile and self.run_state.stage_index == 0:
            out["profile"] = ProfileCallback(logdir)
        for i, callback in enumerate(extra(stage) if extra else ()):
            out[f"extra_{i}_{type(callback).__name__}"] = callback
        return out

    def _candidate_weights(self, stage: Stage) -> Dict[str, str]:
        """The weights an epoch of ``stage`` may keep, each with the loader that validates it: the raw
        weights, the EMA, or both when the EMA stage validates both (the better one is kept)."""
        if stage.ema is None:
            return {"raw": self.valid_loader_key}
        if ema_options(stage.ema)["validate"] == "both":
            return {"ema": self.valid_loader_key, "raw": f"{self.valid_loader_key}_raw"}
        return {"ema": self.valid_loader_key}

    def _monitor(self, stage: Stage) -> Tuple[str, str]:
        """``(loader, metric)`` the stage's plateau scheduler watches: the train loss for
        ``plateau_batch``, else ``stage.monitor`` or the run's valid metric."""
        if stage.scheduler == "plateau_batch":
            return "train", self._loss_key
        return stage.monitor or (self.valid_loader_key, self.valid_metric_key)

    def _criterion_callback(self, stage: Stage) -> Callback:
        keys = dict(input_key=self._output_key, target_key=self._target_key, metric_key=self._loss_key)
        if stage.loss_range is None:
            return CriterionCallback(**keys)
        from cvkit.callbacks.loss_range import LossRangeCallback

        options = stage.loss_range if isinstance(stage.loss_range, Mapping) else {"band": tuple(stage.loss_range)}
        return LossRangeCallback(**keys, logdir=self.run_state.logdir / "loss_range" / stage.name, **options)

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
        run = self.run_state
        trainable = trainable_param_names(model, stage.trainable)
        frozen_bn = self._apply_trainable(model, stage, trainable)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        groups = param_groups(model, names, stage.lr, stage.weight_decay, stage.layer_decay)
        optimizer = stage.build_optimizer(groups)
        train_key = next(k for k in loaders if k.startswith("train"))
        minimize = plateau_mode(self._monitor(stage)[1], self.minimize, self._loss_key) == "min"
        steps_per_epoch = math.ceil(len(loaders[train_key]) / stage.accumulate)
        scheduler = stage.build_scheduler(optimizer, steps_per_epoch, minimize)
        if self._resume_state is not None:
            self._restore_schedule(stage, optimizer, scheduler, steps_per_epoch)
        callbacks = self._stage_callbacks(stage, frozen_bn, metrics, extra, folder, scheduler, verbose)
        if stage.ema is not None and ema_options(stage.ema)["validate"] == "both":
            loaders = {**loaders, f"{self.valid_loader_key}_raw": loaders[self.valid_loader_key]}
        check_callbacks(callbacks, (self._input_key, self._target_key, self._output_key), f"stage {stage.name!r}: ")
        if verbose:
            n_train, n_total = count_params(model)
            print(
                f"[cvkit] stage {run.stage_index + 1} {stage.name!r}: {n_train:,}/{n_total:,} parameters trainable, "
                f"{len(frozen_bn)} BatchNorm frozen, groups "
                + ", ".join(sorted({f"{g['name']}={g['lr']:.2e}" for g in groups}))
            )
        names = [spec["name"] for spec in self._logger_specs]
        loggers: Dict[str, Any] = {}
        if "tensorboard" in names:
            loggers["tensorboard"] = StageTensorboardLogger(str(run.logdir / "tensorboard"), stage_suffix(run.stage_index))
        if self._mlflow is not None:
            loggers["mlflow"] = self._mlflow
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
                hparams=self._run_hparams,
                num_epochs=stage.epochs,
                seed=seed,
                valid_loader=self.valid_loader_key,
                valid_metric=self.valid_metric_key,
                minimize_valid_metric=self.minimize,
                verbose=False,
            )

    def _restore_schedule(self, stage: Stage, optimizer: torch.optim.Optimizer, scheduler: Any,
                          steps_per_epoch: int) -> None:
        """Continue the interrupted stage's optimizer and scheduler from the resume state.

        Unchanged settings (or a resume file that does not record them): both as saved. Changed
        :data:`~cvkit.stages.SCHEDULE_KEYS`: the saved optimizer's moments (when the optimizer kind is the
        same) under the new settings' hyperparameters and LRs, and the new scheduler stepped through the
        optimizer steps (epochs, for a per-epoch one) the stage already ran, so the LRs from here on are
        those an uninterrupted run with the new settings has; a plateau scheduler starts afresh at the new LRs.
        """
        state = self._resume_state
        saved = state.get("schedule")
        if saved is None or saved == stage.schedule_settings():
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state["scheduler"] is not None:
                scheduler.load_state_dict(state["scheduler"])
            return
        if saved["optimizer"] == stage.optimizer:
            fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])  # the moments (torch checks the groups' sizes)
            for group, settings in zip(optimizer.param_groups, fresh):
                group.update(settings)  # the new settings' values, the new scheduler's included
        if scheduler is None or isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            return
        done = min(int(state["epoch"]) - int(state["stage_start_epoch"]), stage.epochs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for _ in range(done * (steps_per_epoch if stage.interval == "batch" else 1)):
                scheduler.step()

    @staticmethod
    def _apply_trainable(model: nn.Module, stage: Stage, trainable: set) -> List[str]:
        """Set what trains; return the BatchNorm modules to keep in eval mode.

        With ``frozen_bn="train"`` the BatchNorm layers of frozen blocks train (statistics and affine
        parameters, fastai's default); ``"eval"`` keeps them frozen.
        """
        outside = set(apply_trainable(model, trainable, True)) if stage.frozen_bn == "train" else set()
        frozen_bn = apply_trainable(model, trainable, stage.train_bn)
        if not outside:
            return frozen_bn
        modules = dict(model.named_modules())
        for name in outside:
            for p in modules[name].parameters(recurse=False):
                p.requires_grad_(True)
        return [n for n in frozen_bn if n not in outside]

    def _resume_payload(self) -> Dict[str, Any]:
        """Everything needed to continue after the epoch that just ended (plain data only).

        With EMA, ``model`` holds the EMA weights (what was validated: best.pth and last.pth serve
        them; the checkpoint callback puts the raw ones there instead when, validating both, they
        did better), ``train_model`` the raw weights training continues from and ``ema`` the average's state.
        """
        run = self.run_state
        model = self.engine.unwrap_model(self.model)
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        ema = self._ema.state_dict() if self._ema is not None else None
        return {
            "format": "cvkit-resume-1",
            "stage": run.stage_name,
            "metrics": {k: dict(v) for k, v in self.epoch_metrics.items()},
            "stages": [s.name for s in self._stages],
            "stage_index": run.stage_index,
            "stage_start_epoch": run.stage_start_epoch,
            "epoch": int(self.epoch_step),
            "stage_finished": bool(self.need_early_stop or self.epoch_step >= self.num_epochs),
            "stopped_early": bool(self.need_early_stop),
            "schedule": run.stage.schedule_settings(),
            "batch_step": int(self.batch_step),
            "sample_step": int(self.sample_step),
            "model": ema["weights"] if ema is not None else weights,
            "train_model": weights if ema is not None else None,
            "ema": ema,
            "mlflow_run_id": self._mlflow.run_id if self._mlflow is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "early_stopping": run.early_stopping,
            "stage_best": {"best_score": run.stage_best_score, "best_epoch": run.stage_best_epoch},
            "run_best": dict(run.best),
            "history": list(run.history),
        }

    def _read_resume(self, logdir: Path, stages: List[Stage], resume: Union[bool, str, Path]) -> Optional[Dict[str, Any]]:
        """The state to continue from: ``resume.pth``, else (deleted or cut off) the newest intact
        ``checkpoints/<stage>/last.pth`` (the same payload); None when no epoch ever finished."""
        if resume is True:
            path = logdir / "checkpoints" / "resume.pth"
            state = self._try_resume_file(path)
            if state is None:
                state = self._newest_last(logdir, stages)
            if state is None:
                if path.exists():
                    raise CheckpointError(f"cannot resume {logdir}: {path} and every checkpoints/<stage>/last.pth "
                                          "are missing or unreadable; start the run again in a new logdir")
                warnings.warn(f"{logdir}: no epoch of this run finished; starting from the beginning", stacklevel=3)
                return None
        else:
            path = Path(resume)
            state = load_checkpoint(path)
        if state.get("format") != "cvkit-resume-1":
            raise ValueError(f"{path} is not a cvkit resume file (format {state.get('format')!r})")
        names = [s.name for s in stages]
        if state["stages"] != names:
            raise ValueError(f"{path} was written by a run with stages {state['stages']}, not {names}")
        return state

    def resume_point(self, logdir: Union[str, Path], stages: Sequence[Stage]) -> Optional[Dict[str, Any]]:
        """``{"stage", "epoch"}``: the last completed epoch ``fit(resume=True)`` continues ``logdir`` from,
        or None when no epoch finished (errors as :meth:`fit`'s, its warnings left to it)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = self._read_resume(Path(logdir), list(stages), True)
        return None if state is None else {"stage": state["stage"], "epoch": int(state["epoch"])}

    @staticmethod
    def _try_resume_file(path: Path) -> Optional[Dict[str, Any]]:
        if not path.is_file():
            return None
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; looking for the newest intact last.pth instead", stacklevel=4)
            return None

    def _newest_last(self, logdir: Path, stages: List[Stage]) -> Optional[Dict[str, Any]]:
        """The latest-epoch resume payload among the stages' ``last.pth`` files, if any is intact."""
        best: Optional[Dict[str, Any]] = None
        for stage in stages:
            state = self._try_resume_file(logdir / "checkpoints" / stage.name / "last.pth")
            if state is not None and state.get("format") == "cvkit-resume-1" and (
                    best is None or state["epoch"] > best["epoch"]):
                best = state
        return best

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

        from cvkit._version import __version__

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
            "loggers": [spec["name"] if len(spec) == 1 else dict(spec) for spec in self._logger_specs],
            "versions": {
                "cvkit": __version__,
                "torch": torch.__version__,
                "catalyst": catalyst.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
            },
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        weights = [m.cvkit_weights for m in model.modules() if isinstance(getattr(m, "cvkit_weights", None), dict)]
        if weights:
            config["pretrained_weights"] = weights[0]  # the file the backbone started from, with its sha256
        config.update(extra or {})
        write_config(logdir, config)

    def _finish(
        self, model: nn.Module, logdir: Path, test_loader: Optional[DataLoader], metrics: Optional[MetricsFactory],
        engine: Engine, criterion: nn.Module, postprocess: Optional[Callable[[nn.Module], Dict[str, Any]]],
    ) -> None:
        """Root best.pth, the test evaluation, ``postprocess``, then metrics.json last.

        Everything here comes from the files and the arguments, never from a stage's runner state
        (``self.criterion``...): a run resumed after its last epoch runs no stage before it.
        """
        run = self.run_state
        if not run.best:
            raise RuntimeError(
                f"no epoch produced a finite {self.valid_loader_key}/{self.valid_metric_key}; nothing to keep as best"
            )
        best_path = logdir / run.best["path"]
        checkpoint = load_checkpoint(best_path)
        self._load_state(model, state_dict_of(checkpoint, best_path), best_path)
        weights = checkpoint.get("weights", "raw")
        save_checkpoint(logdir / "best.pth", {
            "model": state_dict_of(checkpoint, best_path), "stage": checkpoint["stage"],
            "epoch": checkpoint["epoch"], "metrics": checkpoint["metrics"], "weights": weights,
        })
        raw_key = f"{self.valid_loader_key}_raw"
        valid_key = raw_key if weights == "raw" and raw_key in checkpoint["metrics"] else self.valid_loader_key
        result: Dict[str, Any] = {"best": dict(run.best), "weights": weights,
                                  "valid": checkpoint["metrics"].get(valid_key, {})}
        result["epochs"] = int(self.epoch_step)
        if test_loader is not None:
            result["test"] = evaluate(model, test_loader, criterion, metrics, engine, self._input_key, self._target_key)
        if postprocess is not None:
            result.update(postprocess(model))
        scores = {f"{split}/{key}": value for split in ("valid", "test") for key, value in
                  (result.get(split) or {}).items() if not key.startswith("loss/")}
        if any(spec["name"] == "tensorboard" for spec in self._logger_specs):
            write_hparams(logdir / "tensorboard", self._run_hparams, {f"hparam/{key}": value for key, value in scores.items()})
        if self._mlflow is not None:
            self._mlflow.log_metrics_at({f"best/{key}": value for key, value in scores.items()}, int(self.epoch_step))
        from cvkit.plots import plot_progress

        plot_progress(run.history, logdir / "progress.png", self.valid_metric_key)
        self.final_metrics = result
        write_metrics(logdir, result)


def _has_more_epochs(state: Mapping[str, Any], stage: Stage) -> bool:
    """Whether a stage that had run all its epochs when ``state`` was saved has more now (``--resume-changed``)."""
    return not state.get("stopped_early", True) and int(state["epoch"]) - int(state["stage_start_epoch"]) < stage.epochs


def _minimized(key: str, metrics: Optional[MetricsFactory]) -> bool:
    """Whether a smaller ``key`` is better, from the metrics that produce it (``loss*``: yes)."""
    if key.startswith("loss"):
        return True
    if metrics is None:
        raise ValueError(f"valid_metric {key!r}: no metrics= produce it, so its direction is unknown; "
                         "pass metrics=... or minimize_valid_metric=True/False")
    return metric_minimized(list(metrics()), key)


def _facts(logdir: Path) -> Dict[str, Any]:
    """The run's config.json (what the HParams tab and MLflow params describe), or {} before it exists."""
    return read_config(logdir)


def _pipeline_of(loader: Any) -> Optional[Dict[str, Any]]:
    """The serialised albumentations pipeline of a loader's dataset (looking through wrappers), or None."""
    import albumentations as A

    from cvkit.data.augment import transform_to_dict

    dataset = getattr(loader, "dataset", None)
    for _ in range(4):
        transform = getattr(dataset, "transform", None)
        if isinstance(transform, A.BaseCompose):
            try:
                return transform_to_dict(transform)
            except (NotImplementedError, ValueError, TypeError):
                return None
        dataset = getattr(dataset, "dataset", None)
    return None


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
    if criterion is not None:
        criterion = criterion.to(device)
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
