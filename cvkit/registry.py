"""One :class:`Registry` class behind every "name -> thing" table in cvkit.

Models, task models, tasks, criteria, metrics, optimizers, schedulers, augmentation presets, TTA
transforms, named versions and ``cvkit`` commands are each a ``Registry``: they register the same
way, list with the same shell-style pattern, fail the same way on an unknown name (naming the
nearest valid one) and refuse a second registration of a name unless ``override=True``::

    from cvkit.registry import Registry

    COLOURS = Registry("colour")

    @COLOURS.register
    def red(): ...

    @COLOURS.register(name="blue", override=True, hex="#00f")   # extra keywords are metadata
    def make_blue(): ...

    COLOURS.create("red")            # calls the entry; COLOURS.get("red") returns it
    COLOURS.list("b*")               # ['blue']
    COLOURS.meta("blue")["hex"]      # '#00f'
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, Generic, Iterator, List, Optional, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate name; the message names the registry and the nearest valid names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Names mapped to entries (a class, a factory function or a value) plus per-entry metadata."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}
        self._meta: Dict[str, Dict[str, Any]] = {}

    def register(self, entry: Optional[T] = None, *, name: str = "", override: bool = False, **meta: Any) -> Any:
        """Add ``entry`` under ``name`` (default: its ``__name__``); usable bare or as ``@register(...)``.

        Registering a taken name raises :class:`RegistryError` unless ``override=True`` (then the
        new entry replaces the old one). Extra keywords are stored as the entry's metadata.
        """

        def add(obj: T) -> T:
            key = name or getattr(obj, "__name__", "")
            if not key:
                raise ValueError(f"{self.kind}: an entry without __name__ needs name=")
            if key in self._entries and self._entries[key] is not obj and not override:
                raise RegistryError(f"{self.kind} {key!r} is already registered; pass override=True to replace it")
            self._entries[key] = obj
            self._meta[key] = dict(meta)
            return obj

        return add(entry) if entry is not None else add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register temporary entries clean up with this)."""
        self.get(name)
        del self._entries[name]
        del self._meta[name]

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name names the nearest valid ones."""
        if not isinstance(name, str) or name not in self._entries:
            raise RegistryError(self.unknown(name))
        return self._entries[name]

    def unknown(self, name: Any) -> str:
        """The message for an unknown ``name``: the nearest registered names, then all of them."""
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} registered: {self.list()}"

    def meta(self, name: str) -> Dict[str, Any]:
        """A copy of the metadata given at registration."""
        self.get(name)
        return dict(self._meta[name])

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry ``name`` with the arguments (keyword arguments that are None are dropped)."""
        factory: Callable[..., Any] = self.get(name)  # type: ignore[assignment]
        return factory(*args, **{k: v for k, v in kwargs.items() if v is not None})

    def list(self, pattern: str = "*") -> List[str]:
        """Registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def items(self) -> List[tuple]:
        """``(name, entry)`` pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.list()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"


__all__ = ["Registry", "RegistryError"]

