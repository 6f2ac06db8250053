"""Plateau scheduling: which way a monitored metric improves, and the per-batch plateau step."""
from __future__ import annotations

from typing import TYPE_CHECKING

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
    """Step a :class:`cvkit.stages.SmoothedLossPlateau` with every train batch's loss.

    At stage start it checks that the scheduler's mode follows :func:`plateau_mode` for the loss
    it steps on, so a loss is never treated as a score to maximise.
    """

    def __init__(self, loss_key: str = "loss") -> None:
        super().__init__(order=CallbackOrder.Scheduler + 1)
        self.loss_key = loss_key
        self.reads = (loss_key,)

    def on_experiment_start(self, runner: "IRunner") -> None:
        expected = plateau_mode(self.loss_key, runner.run_state.minimize, self.loss_key)
        mode = getattr(runner.scheduler, "mode", None)
        if mode != expected:
            raise ValueError(
                f"BatchPlateauCallback steps on the train {self.loss_key!r} (mode {expected!r}) but the "
                f"scheduler {type(runner.scheduler).__name__} has mode {mode!r}"
            )

    def on_batch_end(self, runner: "IRunner") -> None:
        if runner.is_train_loader and not runner.run_state.skip_step:
            runner.scheduler.update(float(runner.batch_metrics[self.loss_key]))


__all__ = ["BatchPlateauCallback", "plateau_mode"]
