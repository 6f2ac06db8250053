"""MLflow logging for staged runs (the ``mlflow`` logger): Catalyst's MLflow logger writing one MLflow run per cvkit run."""
from __future__ import annotations

import logging
import math
import re
import time
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence

from catalyst.core.logger import ILogger
from catalyst.loggers.mlflow import MLflowLogger
from catalyst.settings import SETTINGS

from cvkit.loggers import LoggerRun, RunLogger, default_tracking_uri, final_scores

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner

    from cvkit.stages import Stage
    from mlflow.tracking import MlflowClient

_BATCH = 100  # MLflow's most params (and, here, metrics) per log_batch call


def mlflow_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in a param or metric key (``@``, ``:``...) made ``_``."""
    return re.sub(r"[^\w./\- ]", "_", str(name))


class RunMLflowLogger(MLflowLogger):
    """Catalyst's :class:`~catalyst.loggers.mlflow.MLflowLogger` for a whole staged run.

    Catalyst's logger keeps its run in MLflow's process-wide state: it sets the global tracking URI,
    adopts (and renames) whatever run is active, and ends that run when a stage's ``train()`` ends,
    so a two-stage run became two MLflow runs, and a DDP worker (which unpickles the logger) had no
    run at all. This one keeps its tracking URI and run id to itself and writes through an
    ``MlflowClient``; every stage uses the same object, and the runner calls :meth:`end` once.
    Metric names are Catalyst's (``<metric>/<loader>/epoch``, step = the run's global epoch).

    Args:
        experiment: MLflow experiment name (created when missing, its artifacts in ``artifact_location``).
        run: the MLflow run's name.
        tracking_uri: where the MLflow store is (see :func:`cvkit.loggers.default_tracking_uri`).
        artifact_location: artifact root of a newly created experiment (None: MLflow's default).
        run_id: continue this run (a resumed cvkit run) when the store has it; else a new run starts.
        tags: tags of a new run.
    """

    def __init__(
        self,
        experiment: str,
        run: str,
        tracking_uri: str,
        artifact_location: Optional[str] = None,
        run_id: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
    ) -> None:
        # MLflowLogger.__init__ would switch MLflow's global tracking URI and start a fluent run.
        ILogger.__init__(self, log_batch_metrics=SETTINGS.log_batch_metrics, log_epoch_metrics=SETTINGS.log_epoch_metrics)
        self.experiment, self.run, self.tracking_uri = experiment, run, tracking_uri
        self.registry_uri, self.exclude = None, None
        self._client: Optional["MlflowClient"] = None
        # A new SQLite store announces its table creation at INFO level; the run's console stays cvkit's.
        store_log = logging.getLogger("mlflow.store.db.utils")
        level = store_log.level
        store_log.setLevel(logging.WARNING)
        try:
            self.run_id = self._continue(run_id) or self._start(artifact_location, tags or {})
        finally:
            store_log.setLevel(level)

    def _continue(self, run_id: Optional[str]) -> Optional[str]:
        """``run_id`` set running again, or None when the store does not hold it."""
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _start(self, artifact_location: Optional[str], tags: Mapping[str, str]) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(
            self.experiment, artifact_location=artifact_location)
        return self.client.create_run(experiment_id, run_name=self.run, tags=dict(tags)).info.run_id

    @property
    def client(self) -> "MlflowClient":
        """The client of this logger's store (made on first use, also in a process the logger was pickled into)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def logger(self) -> "MlflowClient":
        """The MLflow client this logger writes through."""
        return self.client

    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _log_metrics(self, metrics: Dict[str, float], step: int, loader_key: str, suffix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(mlflow_key(f"{key}/{loader_key}{suffix}"), float(value), now, int(step))
                   for key, value in metrics.items()]
        self._log_batch(metrics=entries)

    def log_metrics_at(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``{name: value}`` at ``step`` (the run's final metrics, say); non-finite values are left out."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(mlflow_key(k), float(v), now, int(step)) for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and math.isfinite(v)])

    def log_hparams(self, hparams: Dict, runner: "IRunner" = None) -> None:
        """Log the run's hyperparameters as MLflow params; keys already logged keep their first value
        (MLflow params are immutable), so every stage and a resumed run may log them again."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        params = {mlflow_key(k): str(v) for k, v in hparams.items()}
        self._log_batch(params=[Param(k, v) for k, v in params.items() if k not in logged])

    def _log_batch(self, metrics: Sequence[Any] = (), params: Sequence[Any] = ()) -> None:
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + _BATCH])
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + _BATCH])

    def log_artifact(self, tag: str, runner: "IRunner", artifact: object = None, path_to_artifact: str = None,
                     scope: str = None) -> None:
        """Copy a local file or folder into the run's artifacts."""
        self.client.log_artifact(self.run_id, path_to_artifact)

    def log_image(self, tag: str, image: Any, runner: "IRunner", scope: str = None) -> None:
        """Store an image in the run's artifacts, named by tag (and epoch and loader for those scopes)."""
        parts = [tag]
        if scope in ("epoch", "loader", "batch"):
            parts.append(f"epoch-{runner.epoch_step:04d}")
        if scope in ("loader", "batch"):
            parts.append(f"loader-{runner.loader_key}")
        self.client.log_image(self.run_id, image, artifact_file=f"{'_'.join(parts)}.png")

    def close_log(self) -> None:
        """A stage ended; the run goes on (the runner calls :meth:`end` after the last stage)."""

    def end(self, status: str = "FINISHED") -> None:
        """Mark the MLflow run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(self.run_id, status=status)


class MLflowRunLogger(RunLogger):
    """The ``mlflow`` logger: one :class:`RunMLflowLogger` for the whole run, its run id kept in the resume
    payload so a resumed run continues the same MLflow run; the final scores logged as ``best/<split>/<key>``.

    Experiment: ``experiment``, else the run's name; MLflow run name: the run folder's name. Store:
    ``tracking_uri``, else a SQLite store under ``<logdir>/mlruns`` (:func:`cvkit.loggers.default_tracking_uri`).
    """

    options = ("tracking_uri", "experiment")
    package = ("mlflow", "mlflow")

    def __init__(self, tracking_uri: Optional[str] = None, experiment: Optional[str] = None) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.logger: Optional[RunMLflowLogger] = None

    def start(self, run: LoggerRun) -> None:
        logdir = run.logdir.resolve()
        local = not self.tracking_uri
        uri = default_tracking_uri(logdir) if local else self.tracking_uri
        artifacts = (logdir / "mlruns" / "artifacts").as_uri() if local else None
        self.logger = RunMLflowLogger(str(self.experiment or run.name), logdir.name, uri, artifacts,
                                      run_id=(run.resumed or {}).get("mlflow_run_id"),
                                      tags={"cvkit.logdir": str(logdir)})

    def stage(self, stage: "Stage", index: int) -> Optional[RunMLflowLogger]:
        return self.logger

    def finish(self, result: Mapping[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log_metrics_at({f"best/{k}": v for k, v in final_scores(result).items()}, int(result["epochs"]))

    def end(self, status: str = "FINISHED") -> None:
        if self.logger is not None:
            self.logger.end(status)

    def resume_state(self) -> Dict[str, Any]:
        return {"mlflow_run_id": self.logger.run_id if self.logger is not None else None}


__all__ = ["MLflowRunLogger", "RunMLflowLogger", "mlflow_key"]
