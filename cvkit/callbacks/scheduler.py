"""Plateau scheduling: which way a monitored metric improves, and the per-batch plateau step."""
from __future__ import annotations

from typing import TYPE_CHECKING, List

from catalyst.core.callback import Callback, CallbackOrder

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


def plateau_mode(metric_key: str, minimize_valid: bool, loss_key: str = "loss") -> str:
    """``"min"`` or ``"max"``: how a plateau scheduler watching ``metric_key`` judges improvement.

    A loss (the runner's ``loss_key``, or any key starting with ``loss``) improves downwards
    whatever the run optimises; any other metric (the valid metric itself included) goes the way
    of the run's valid metric, ``minimize_valid``. An explicit ``mode`` in the stage's
    ``scheduler_kwargs`` overrides this.
    """
    if metric_key == loss_key or metric_key.startswith("loss"):
        return "min"
    return "min" if minimize_valid else "max"


class BatchPlateauCallback(Callback):
    """Step a :class:`cvkit.stages.SmoothedLossPlateau` once per optimizer step with the train loss.

    Under gradient accumulation one optimizer step spans several micro-batches: the scheduler is fed
    the mean loss of the micro-batches that step used, when ``run_state.stepped`` says it
    happened, so its patience counts optimizer steps (with ``accumulate=1``: every train batch). A batch the NaN guard skipped drops the losses
    gathered so far, as the optimizer drops their gradients.

    At stage start it checks that the scheduler's mode follows :func:`plateau_mode` for the loss
    it steps on, so a loss is never treated as a score to maximise.
    """

    def __init__(self, loss_key: str = "loss") -> None:
        super().__init__(order=CallbackOrder.Scheduler + 1)
        self.loss_key = loss_key
        self.reads = (loss_key,)
        self._losses: List[float] = []

    def on_experiment_start(self, runner: "IRunner") -> None:
        expected = plateau_mode(self.loss_key, runner.run_state.minimize, self.loss_key)
        mode = getattr(runner.scheduler, "mode", None)
        if mode != expected:
            raise ValueError(
                f"BatchPlateauCallback steps on the train {self.loss_key!r} (mode {expected!r}) but the "
                f"scheduler {type(runner.scheduler).__name__} has mode {mode!r}"
            )

    def on_loader_start(self, runner: "IRunner") -> None:
        self._losses = []

    def on_batch_end(self, runner: "IRunner") -> None:
        if not runner.is_train_loader:
            return
        if runner.run_state.skip_step:
            self._losses = []
            return
        self._losses.append(float(runner.batch_metrics[self.loss_key]))
        if runner.run_state.stepped:
            runner.scheduler.update(sum(self._losses) / len(self._losses))
            self._losses = []


__all__ = ["BatchPlateauCallback", "plateau_mode"]
