"""StagedRunner: Catalyst's SupervisedRunner trained through a sequence of stages.

Catalyst removed stages in 22.02. Here each stage is one ``train()`` call with its own
optimizer, scheduler, loaders and an explicit callback list, while the runner keeps one global
epoch counter so TensorBoard, ``log.csv`` and checkpoints form a single timeline. The best
weights of a stage start the next one unless the stage says otherwise.

The runner orchestrates; each concern has its own module: the fit's arguments (:mod:`cvkit.fit_spec`),
a stage's callbacks (:mod:`cvkit.stage_callbacks`), the resume payload (:mod:`cvkit.resume`),
loggers (:mod:`cvkit.loggers`), engines (:mod:`cvkit.engines`), the test evaluation
(:mod:`cvkit.evaluation`) and the run folder's files (:mod:`cvkit.run_folder`).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from catalyst import dl
from catalyst.core.callback import Callback
from catalyst.core.engine import Engine
from catalyst.core.misc import sort_callbacks_by_order
from torch import nn
from torch.utils.data import DataLoader

from cvkit.stage_callbacks import monitor, raw_loader, raw_loader_key, stage_callbacks
from cvkit.callbacks.checks import check_callbacks
from cvkit.callbacks.scheduler import plateau_mode
from cvkit.callbacks.state import RunState
from cvkit.callbacks.tensorboard import run_hparams
from cvkit.data.augment import loader_pipeline
from cvkit.distributed import node_logdir
from cvkit.engines import known_warnings_silenced, make_engine
from cvkit.evaluation import evaluate
from cvkit.feature_cache import CachedFeatures, cached_loaders, features_as_input
from cvkit.fit_spec import FitSpec, LoaderFactory, Loaders, MetricsFactory, check_loaders, check_stages, run_config
from cvkit.io import clean_stale_temporaries, load_checkpoint, state_dict_of
from cvkit.lock import RunLock
from cvkit.loggers import (DEFAULT_LOGGERS, LoggerRun, LoggerSpec, RunLogger, build_loggers, logger_specs,
                           require_packages, stage_loggers)
from cvkit.metrics import metric_minimized
from cvkit.models.groups import apply_stage_trainable, count_params, param_groups, trainable_param_names
from cvkit.perf import FastPaths
from cvkit.resume import (ema_state, load_stage_start, load_state, read_resume, restore_run, restore_schedule,
                          resume_payload, resume_point, sync_run, train_weights)
from cvkit.run_folder import (PROGRESS_FILE, read_config, record_pipelines, resume_file, stage_checkpoints, write_best,
                              write_config, write_metrics)
from cvkit.stages import Stage


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
        self._resumed: Optional[Dict[str, Any]] = None
        self._run_loggers: List[RunLogger] = []
        self._stage_names: List[str] = []
        self._hparams: Dict[str, Any] = {}

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
        state, resumed = self.run_state, self._resumed
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

    def on_epoch_end(self, runner: "StagedRunner") -> None:
        super().on_epoch_end(runner)
        if self.engine.is_main_process and self.run_state.history:
            for logger in self._run_loggers:
                logger.epoch(dict(self.run_state.history[-1]))

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
            engine: a name in :data:`cvkit.engines.ENGINES` (``"cpu"``, ``"gpu"``, ``"amp"``, ``"ddp"``,
                ``"ddp_amp"``) or a Catalyst engine (default: GPU if any).
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
        specs = logger_specs(loggers)
        require_packages(specs)
        stages = list(stages)
        check_stages(model, stages)
        if minimize_valid_metric is None:
            minimize_valid_metric = _minimized(valid_metric, metrics)
        spec = FitSpec(model=model, stages=stages, loaders=loaders, criterion=criterion, logdir=Path(logdir),
                       metrics=metrics, callbacks=callbacks, valid_loader=valid_loader, valid_metric=valid_metric,
                       minimize=minimize_valid_metric, engine=engine, seed=seed, verbose=verbose, config=config,
                       test_loader=test_loader, resume=resume, fast=fast or FastPaths(), profile=profile, loggers=specs,
                       postprocess=postprocess, input_key=self._input_key, output_key=self._output_key,
                       target_key=self._target_key, loss_key=self._loss_key)
        spec.fast.apply(model)
        spec.engine = make_engine(spec.engine)
        spec.logdir = node_logdir(spec.logdir, spec.engine)  # only the node of global rank 0 writes logdir
        spec.logdir.mkdir(parents=True, exist_ok=True)
        with RunLock(spec.logdir):
            self._fit_locked(spec)
        return self

    def _fit_locked(self, spec: FitSpec) -> None:
        """:meth:`fit` once the run folder is held: config.json, the loggers around every stage, the finish."""
        clean_stale_temporaries(spec.logdir)
        self.valid_loader_key, self.valid_metric_key, self.minimize = spec.valid_loader, spec.valid_metric, spec.minimize
        self._stage_names = [s.name for s in spec.stages]
        self.run_state = run = RunState(logdir=spec.logdir, minimize=spec.minimize, resume_payload=self._resume_payload)
        state = read_resume(spec.logdir, self._stage_names, spec.resume) if spec.resume else None
        if isinstance(spec.engine, dl.DistributedDataParallelEngine):
            # Spawned workers receive the runner by pickling; the default file-descriptor sharing
            # fails here on empty tensors ("unable to resize file"), file-system sharing does not.
            torch.multiprocessing.set_sharing_strategy("file_system")
        first = 0
        if state is None:
            write_config(spec.logdir, run_config(spec))
        else:
            first = restore_run(run, state, spec.stages)
            self.epoch_step = state["epoch"]
        name = (spec.config or {}).get("name") or spec.logdir.resolve().name
        self._hparams = run_hparams(spec.stages, read_config(spec.logdir))
        logger_run = LoggerRun(spec.logdir, str(name), self._hparams, state)
        self._run_loggers, started = build_loggers(spec.loggers), []
        try:
            for logger in self._run_loggers:
                logger.start(logger_run)
                started.append(logger)
            self._run_stages(spec, first, state)
            self._finish(spec)
        except BaseException as exc:
            for logger in started:
                logger.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        for logger in started:
            logger.end()

    def _run_stages(self, spec: FitSpec, first: int, state: Optional[Dict[str, Any]]) -> None:
        """Every stage from ``first`` on, each starting from the previous one's weights (or the resume state)."""
        run, model = self.run_state, spec.model
        previous = stage_checkpoints(spec.logdir, spec.stages[first - 1].name) if first else None
        for index, stage in enumerate(spec.stages):
            if index < first:
                continue
            self._resumed = state if state is not None and index == state["stage_index"] else None
            run.start_stage(stage, index, self._resumed)
            if self._resumed is not None:
                load_state(model, train_weights(self._resumed), resume_file(spec.logdir))
            else:
                load_stage_start(model, stage, previous)
            loaders = spec.stage_loaders(stage)
            check_loaders(stage, loaders, spec.valid_loader)
            recorded = {} if (spec.config or {}).get("pipelines") else {
                key: pipeline for key, loader in loaders.items() if (pipeline := loader_pipeline(loader)) is not None}
            if recorded:
                record_pipelines(spec.logdir, stage.name, recorded)
            cached = contextlib.nullcontext()
            if stage.cache_features:
                apply_stage_trainable(model, trainable_param_names(model, stage.trainable), stage.train_bn,
                                      stage.frozen_bn)
                loaders = cached_loaders(model, loaders, stage.cache_features, spec.seed + index, spec.engine.device,
                                         spec.input_key, spec.target_key, f"stage {stage.name!r}: cache_features",
                                         spec.verbose)
                cached = features_as_input(model)
            with cached:
                self._run_stage(spec, stage, loaders)
            previous = stage_checkpoints(spec.logdir, stage.name)
            self.epoch_step = sync_run(run, spec.logdir)

    def _run_stage(self, spec: FitSpec, stage: Stage, loaders: Loaders) -> None:
        """One ``train()`` call: the stage's optimizer, scheduler (restored when resuming), callbacks and loggers."""
        run, model = self.run_state, spec.model
        frozen_bn = apply_stage_trainable(model, trainable_param_names(model, stage.trainable), stage.train_bn,
                                          stage.frozen_bn)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        groups = param_groups(model, names, stage.lr, stage.weight_decay, stage.layer_decay)
        optimizer = stage.build_optimizer(groups)
        train_key = next(k for k in loaders if k.startswith("train"))
        minimize = plateau_mode(monitor(spec, stage)[1], spec.minimize, spec.loss_key) == "min"
        steps_per_epoch = math.ceil(len(loaders[train_key]) / stage.accumulate)
        scheduler = stage.build_scheduler(optimizer, steps_per_epoch, minimize)
        if self._resumed is not None:
            restore_schedule(self._resumed, stage, optimizer, scheduler, steps_per_epoch)
        callbacks = stage_callbacks(spec, run, stage, frozen_bn, scheduler,
                                    ema_state(self._resumed) if self._resumed is not None else None)
        raw = raw_loader(spec, stage)
        if raw is not None:
            loaders = {**loaders, raw: loaders[spec.valid_loader]}
        check_callbacks(callbacks, (spec.input_key, spec.target_key, spec.output_key), f"stage {stage.name!r}: ")
        if spec.verbose:
            n_train, n_total = count_params(model)
            print(
                f"[cvkit] stage {run.stage_index + 1} {stage.name!r}: {n_train:,}/{n_total:,} parameters trainable, "
                f"{len(frozen_bn)} BatchNorm frozen, groups "
                + ", ".join(sorted({f"{g['name']}={g['lr']:.2e}" for g in groups}))
            )
        with known_warnings_silenced():
            self.train(
                model=model,
                engine=spec.engine,
                criterion=spec.criterion,
                optimizer=optimizer,
                scheduler=scheduler,
                loaders=OrderedDict(loaders),
                callbacks=callbacks,
                loggers=stage_loggers(spec.loggers, self._run_loggers, stage, run.stage_index),
                hparams=self._hparams,
                num_epochs=stage.epochs,
                seed=spec.seed,
                valid_loader=spec.valid_loader,
                valid_metric=spec.valid_metric,
                minimize_valid_metric=spec.minimize,
                verbose=False,
            )

    def _resume_payload(self) -> Dict[str, Any]:
        """The epoch's resume payload (:func:`cvkit.resume.resume_payload`) with the loggers' own entries."""
        extra: Dict[str, Any] = {}
        for logger in self._run_loggers:
            extra.update(logger.resume_state())
        return resume_payload(self, self._stage_names, extra)

    def resume_point(self, logdir: Union[str, Path], stages: Sequence[Stage]) -> Optional[Dict[str, Any]]:
        """``{"stage", "epoch"}``: the last completed epoch ``fit(resume=True)`` continues ``logdir`` from,
        or None when no epoch finished (see :func:`cvkit.resume.resume_point`)."""
        return resume_point(logdir, stages)

    def _finish(self, spec: FitSpec) -> None:
        """Root best.pth, the test evaluation, ``postprocess``, the loggers' finish, then metrics.json last.

        Everything here comes from the files and the spec, never from a stage's runner state
        (``self.criterion``...): a run resumed after its last epoch runs no stage before it.
        """
        run, model, logdir = self.run_state, spec.model, spec.logdir
        if not run.best:
            raise RuntimeError(
                f"no epoch produced a finite {spec.valid_loader}/{spec.valid_metric}; nothing to keep as best"
            )
        best_path = logdir / run.best["path"]
        checkpoint = load_checkpoint(best_path)
        weights = checkpoint.get("weights", "raw")
        kept = state_dict_of(checkpoint, best_path)
        load_state(model, kept, best_path)
        write_best(logdir, kept, checkpoint)
        raw_key = raw_loader_key(spec.valid_loader)
        valid_key = raw_key if weights == "raw" and raw_key in checkpoint["metrics"] else spec.valid_loader
        result: Dict[str, Any] = {"best": dict(run.best), "weights": weights,
                                  "valid": checkpoint["metrics"].get(valid_key, {})}
        result["epochs"] = int(self.epoch_step)
        if spec.test_loader is not None:
            result["test"] = evaluate(model, spec.test_loader, spec.criterion, spec.metrics, spec.engine,
                                      spec.input_key, spec.target_key)
        if spec.postprocess is not None:
            result.update(spec.postprocess(model))
        for logger in self._run_loggers:
            logger.finish(result)
        from cvkit.plots import plot_progress

        plot_progress(run.history, logdir / PROGRESS_FILE, spec.valid_metric)
        self.final_metrics = result
        write_metrics(logdir, result)


def _minimized(key: str, metrics: Optional[MetricsFactory]) -> bool:
    """Whether a smaller ``key`` is better, from the metrics that produce it (``loss*``: yes)."""
    if key.startswith("loss"):
        return True
    if metrics is None:
        raise ValueError(f"valid_metric {key!r}: no metrics= produce it, so its direction is unknown; "
                         "pass metrics=... or minimize_valid_metric=True/False")
    return metric_minimized(list(metrics()), key)


__all__ = ["FitSpec", "StagedRunner", "evaluate", "make_engine"]
