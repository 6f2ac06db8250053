"""Per-epoch checkpoints of a staged run: ``last.pth``, ``best.pth`` and the run's ``resume.pth``."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Tuple

from catalyst.core.callback import Callback, CallbackOrder

from cvkit.io import save_checkpoint

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class StageCheckpointCallback(Callback):
    """Every epoch: ``resume.pth`` and the stage's ``last.pth``; ``best.pth`` when the valid metric improves.

    "Improves" is judged in ``runner.run_state``: the stage's best score lives there, and a new
    one is offered as the run's best. The state is serialised once, from
    ``run_state.resume_payload()`` (weights, optimizer, scheduler, counters, history), and written
    atomically; ``last.pth``, ``best.pth`` and ``resume.pth`` are hard links to that one file where
    the filesystem allows, so an epoch costs one write. Files hold plain tensors and numbers:
    ``torch.load(..., weights_only=True)`` reads them. Runs after early stopping and history, so
    the saved state is the epoch's final one.

    ``weights`` names an epoch's candidate weights and the loader that validated each, in order of
    preference on a tie: ``{"raw": loader_key}`` by default, ``{"ema": "valid"}`` with an EMA, and
    ``{"ema": "valid", "raw": "valid_raw"}`` when an EMA stage validates both. The candidate with the
    better ``metric_key`` (in the run's direction) is the epoch's: its score competes for best and its
    name goes in the checkpoint's ``weights`` (and ``run_state.kept_weights``, which the console prints).
    The payload keeps both weights side by side (``model`` raw, ``model_ema`` the average; see
    :mod:`cvkit.resume`); readers take the kept ones, so the next stage starts from whichever validated better.
    """

    def __init__(self, folder: Path, resume_path: Path, loader_key: str, metric_key: str,
                 weights: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(order=CallbackOrder.External + 20)
        self.folder, self.resume_path = Path(folder), Path(resume_path)
        self.loader_key, self.metric_key = loader_key, metric_key
        self.weights = dict(weights or {"raw": loader_key})
        unknown = sorted(set(self.weights) - {"ema", "raw"})
        if unknown:
            raise ValueError(f"StageCheckpointCallback weights: unknown names {unknown}; valid: 'ema', 'raw'")

    def on_experiment_start(self, runner: "IRunner") -> None:
        if runner.run_state.resume_payload is None:
            raise ValueError("StageCheckpointCallback needs runner.run_state.resume_payload (a StagedRunner sets it)")

    def _score(self, runner: "IRunner", loader_key: str) -> float:
        metrics = runner.epoch_metrics.get(loader_key)
        if not metrics or self.metric_key not in metrics:
            have = {k: sorted(v) for k, v in runner.epoch_metrics.items() if k != "_epoch_"}
            raise KeyError(
                f"valid metric {loader_key}/{self.metric_key} was not computed; "
                f"metrics this epoch: {have}"
            )
        return float(metrics[self.metric_key])

    def choose(self, runner: "IRunner") -> Tuple[str, float]:
        """The epoch's weights (``"ema"`` or ``"raw"``) and their score: the better candidate, the first on a tie."""
        state = runner.run_state
        scores = [(name, self._score(runner, loader)) for name, loader in self.weights.items()]
        chosen = scores[0]
        for candidate in scores[1:]:
            if state.better(candidate[1], chosen[1]) or (not math.isfinite(chosen[1]) and math.isfinite(candidate[1])):
                chosen = candidate
        return chosen

    def on_epoch_end(self, runner: "IRunner") -> None:
        state = runner.run_state
        weights, score = self.choose(runner)
        state.kept_weights = weights
        epoch = int(runner.epoch_step)
        better = state.better(score, state.stage_best_score)
        if better:
            state.stage_best_score, state.stage_best_epoch = score, epoch
            state.offer_best(self.folder / "best.pth", score, epoch)
        if not runner.engine.is_main_process:
            return
        payload = state.resume_payload()
        payload["weights"] = weights
        last = self.folder / "last.pth"
        save_checkpoint(last, payload)
        if better:
            link_or_copy(last, self.folder / "best.pth")
        link_or_copy(last, self.resume_path)


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` hold ``source``'s bytes, atomically: a hard link, or a copy if links fail."""
    tmp = target.with_name(f".{target.name}.link")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


__all__ = ["StageCheckpointCallback", "link_or_copy"]
