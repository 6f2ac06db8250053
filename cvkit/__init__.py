"""cvkit: staged fine-tuning and competition tooling for image models on Catalyst, timm, smp and albumentations."""
from typing import Any

from cvkit._version import __version__


def __getattr__(name: str) -> Any:
    """``cvkit.fine_tune`` and ``cvkit.kfold`` on first use, so ``import cvkit`` stays light (no torch)."""
    if name == "fine_tune":
        from cvkit.finetune import fine_tune

        return fine_tune
    if name == "kfold":
        from cvkit.kfold import kfold

        return kfold
    raise AttributeError(f"module 'cvkit' has no attribute {name!r}")
