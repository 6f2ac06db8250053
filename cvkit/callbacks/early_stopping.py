"""Early stopping whose counters survive a resume."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from catalyst.callbacks.misc import EarlyStoppingCallback
from catalyst.core.callback import CallbackOrder

if TYPE_CHECKING:
    from catalyst.core.runner import IRunner


class EarlyStopping(EarlyStoppingCallback):
    """Catalyst's early stopping, with its counters kept in ``run_state.early_stopping``.

    At stage start it takes the counters found there (a resumed stage), so the patience counts on
    from where the killed run was; after every epoch it writes them back for ``resume.pth``.
    """

    def __init__(
        self, patience: int, loader_key: str, metric_key: str, minimize: bool, min_delta: float = 1e-6
    ) -> None:
        super().__init__(
            patience=patience, loader_key=loader_key, metric_key=metric_key, minimize=minimize, min_delta=min_delta
        )
        self.order = CallbackOrder.External + 1

    def on_experiment_start(self, runner: "IRunner") -> None:
        super().on_experiment_start(runner)
        saved = runner.run_state.early_stopping
        if saved:
            self.best_score = saved["best_score"]
            self.num_no_improvement_epochs = int(saved["num_no_improvement_epochs"])

    def on_epoch_end(self, runner: "IRunner") -> None:
        super().on_epoch_end(runner)
        runner.run_state.early_stopping = self.state_dict()

    def state_dict(self) -> Dict[str, Any]:
        """The counters to save: best score so far and epochs without improvement."""
        return {"best_score": self.best_score, "num_no_improvement_epochs": self.num_no_improvement_epochs}


__all__ = ["EarlyStopping"]
