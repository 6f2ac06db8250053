"""Checks of a stage's callback list, run before its first batch.

A callback may declare ``reads`` and ``writes``: tuples of the ``runner.batch`` /
``runner.batch_metrics`` keys it takes and fills (e.g. ``("logits", "targets")`` and ``("loss",)``).
Callbacks that declare nothing are taken to read nothing.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from catalyst.core.callback import Callback


def _label(name: str, callback: Callback) -> str:
    return f"{name!r} ({type(callback).__name__})"


def check_orders(callbacks: Mapping[str, Callback], where: str = "") -> None:
    """Raise ValueError naming the first two callbacks that share an ``order`` (their run order would be arbitrary)."""
    seen: dict = {}
    for name, callback in callbacks.items():
        other = seen.setdefault(callback.order, name)
        if other != name:
            raise ValueError(
                f"{where}callbacks {_label(other, callbacks[other])} and {_label(name, callback)} share order "
                f"{int(callback.order)}; give each callback a distinct order"
            )


def check_keys(callbacks: Mapping[str, Callback], provided: Iterable[str], where: str = "") -> None:
    """Raise ValueError when a callback reads a batch key that neither the runner (``provided``) nor an
    earlier callback (lower ``order``) writes."""
    written = list(dict.fromkeys(provided))
    for name, callback in sorted(callbacks.items(), key=lambda item: item[1].order):
        for key in getattr(callback, "reads", ()):
            if key not in written:
                raise ValueError(
                    f"{where}callback {_label(name, callback)} reads {key!r} but nothing writes it (written: {written})"
                )
        written += [key for key in getattr(callback, "writes", ()) if key not in written]


def check_callbacks(callbacks: Mapping[str, Callback], provided: Iterable[str], where: str = "") -> None:
    """Both checks: distinct orders, then every read key written before it is read."""
    check_orders(callbacks, where)
    check_keys(callbacks, provided, where)


__all__ = ["check_callbacks", "check_keys", "check_orders"]
