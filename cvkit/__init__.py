"""cvkit: staged fine-tuning and competition tooling for image models on Catalyst, timm, smp and albumentations."""
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``cvkit.fine_tune`` and ``cvkit.kfold`` on first use, so ``import cvkit`` stays light (no torch).

    ``cvkit.kfold`` is the module :mod:`cvkit.kfold`, which calls :func:`cvkit.kfold.kfold` when called:
    importing the submodule rebinds the package's attribute to it, so a function here would turn into
    the module after the first ``import cvkit.kfold``.
    """
    if name == "fine_tune":
        from cvkit.finetune import fine_tune

        return fine_tune
    if name == "kfold":
        import importlib

        return importlib.import_module("cvkit.kfold")
    raise AttributeError(f"module 'cvkit' has no attribute {name!r}")
