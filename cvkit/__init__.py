"""cvkit: staged fine-tuning and competition tooling for image models on Catalyst, timm, smp and albumentations."""
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``cvkit.fine_tune`` and ``cvkit.kfold`` on first use, so ``import cvkit`` stays light (no torch)."""
    if name == "fine_tune":
        from cvkit.finetune import fine_tune

        return fine_tune
    if name == "kfold":
        from cvkit.kfold import kfold

        return kfold
    raise AttributeError(f"module 'cvkit' has no attribute {name!r}")
