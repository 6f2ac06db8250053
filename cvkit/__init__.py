"""cvkit: staged fine-tuning and competition tooling for image models on Catalyst, timm, smp and albumentations."""
from typing import Any

from cvkit._version import __version__


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
        import sys

        import cvkit.kfold  # noqa: F401  (binds the package's attribute to the callable module)

        return sys.modules["cvkit.kfold"]
    raise AttributeError(f"module 'cvkit' has no attribute {name!r}")
