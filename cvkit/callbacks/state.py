"""The run-state a StagedRunner shares with its callbacks, held as ``runner.run_state``.

Callbacks read and write fields of this one object instead of attributes they hope the runner
has: which stage runs, where the run writes, the best epoch so far, the history rows, whether the
NaN guard marked the current batch, and how to serialise the run for ``resume.pth``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:
    from cvkit.stages import Stage


@dataclass
class RunState:
    """Everything a staged run's callbacks share; plain data plus one callable.

    ``runner.epoch_step`` stays the global epoch (1-based over all stages). The object travels with
    the runner into DDP workers by pickling; what workers change comes back through ``resume.pth``.

    Attributes:
        logdir: the run's folder (None outside a staged run).
        minimize: smaller valid metric is better (what "best" means for the run).
        stage / stage_index: the stage that runs and its position.
        stage_start_epoch: global epochs completed before this stage started.
        batch_offset / sample_offset: Catalyst's batch and sample counters when the stage started.
        best: the run's best epoch so far: ``{"stage", "epoch", "score", "path"}`` (path relative to logdir).
        stage_best_score / stage_best_epoch: the running stage's best valid score and its epoch.
        early_stopping: the early-stopping counters after the last epoch (None: no early stopping).
        kept_weights: the weights the last epoch kept, ``"ema"`` or ``"raw"`` (set by the checkpoint callback).
        history: one row per finished epoch (what ``log.csv`` holds).
        skip_step: the NaN guard marked the current train batch; backward/optimizer leave it out.
        stepped: the optimizer stepped after the current train batch (the EMA updates then).
        ema_state: the EMA's ``{"weights", "updates"}`` after the last epoch (None: the stage keeps no EMA).
        nan_skipped: batches skipped by the NaN guard in the current loader.
        resume_payload: returns the state to save after an epoch (set by the runner).
    """

    logdir: Optional[Path] = None
    minimize: bool = True
    stage: Optional["Stage"] = None
    stage_index: int = 0
    stage_start_epoch: int = 0
    batch_offset: int = 0
    sample_offset: int = 0
    best: Dict[str, Any] = field(default_factory=dict)
    stage_best_score: Optional[float] = None
    stage_best_epoch: Optional[int] = None
    early_stopping: Optional[Dict[str, Any]] = None
    kept_weights: Optional[str] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    skip_step: bool = False
    stepped: bool = False
    ema_state: Optional[Dict[str, Any]] = None
    nan_skipped: int = 0
    resume_payload: Optional[Callable[[], Dict[str, Any]]] = None

    @property
    def stage_name(self) -> str:
        """The running stage's name ('?' before the first stage)."""
        return self.stage.name if self.stage is not None else "?"

    def better(self, score: float, than: Optional[float]) -> bool:
        """True when ``score`` is finite and beats ``than`` (None: anything finite does) in the run's direction."""
        if not math.isfinite(score):
            return False
        if than is None:
            return True
        return score < than if self.minimize else score > than

    def offer_best(self, path: Path, score: float, epoch: int) -> None:
        """A stage's new best epoch: keep it as the run's best when it beats the run's."""
        if self.better(score, self.best.get("score")):
            self.best = {"stage": self.stage_name, "epoch": epoch, "score": score, "path": self.relative(path)}

    def relative(self, path: Path) -> str:
        """``path`` relative to the run folder when inside it, so a copied or moved run stays whole."""
        path = Path(path)
        if self.logdir is not None:
            try:
                return path.resolve().relative_to(Path(self.logdir).resolve()).as_posix()
            except ValueError:
                pass
        return str(path)

    def start_stage(self, stage: "Stage", index: int, resumed: Optional[Dict[str, Any]] = None) -> None:
        """Enter ``stage``: reset the per-stage fields, or take them from a resume file of this stage."""
        self.stage, self.stage_index = stage, index
        best = resumed["stage_best"] if resumed else {}
        self.stage_best_score, self.stage_best_epoch = best.get("best_score"), best.get("best_epoch")
        self.early_stopping = resumed["early_stopping"] if resumed else None
        self.skip_step, self.stepped, self.nan_skipped, self.ema_state = False, False, 0, None


__all__ = ["RunState"]
