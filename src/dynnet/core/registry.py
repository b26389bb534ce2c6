"""The one registry type of dynnet: recipes, models, datasets and estimators all use it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError):
    """Raised when a name is not registered; the message lists what is."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A name → object map that raises on duplicates and on unknown names.

    Args:
        kind: what the registry holds ("recipe", "model", ...), used in error messages.

    Example:
        >>> MODELS = Registry("model")
        >>> @MODELS.register("tiny")
        ... def tiny(): ...
        >>> MODELS.get("tiny") is tiny
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted.

        Raises:
            ValueError: if ``name`` is not lowercase or is already registered.
        """
        if not name or name != name.lower() or " " in name:
            raise ValueError(f"{self.kind} names are lowercase without spaces, got {name!r}")

        def _add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        if obj is None:
            return _add
        return _add(obj)

    def get(self, name: str) -> T:
        """Return the object registered under ``name``.

        Raises:
            UnknownNameError: naming the unknown name and listing the known ones.
        """
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a str, got {type(name).__name__}: {name!r}")
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}") from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
