"""dynnet's two registry types: :class:`Registry` (by name: recipes, models, datasets, estimators) and
:class:`TypeRegistry` (by class, along the MRO: residual adapters, spatial chains, early-exit trunks, randomisers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "TypeRegistry", "UnknownNameError"]


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


class TypeRegistry(Generic[T]):
    """A class → value map looked up along the MRO of an object's class (the one lookup rule for "how to handle a
    module of this class": residual adapters, spatial conv chains, early-exit trunks, randomisers).

    Args:
        kind: what it holds ("residual adapter", ...), used in error messages.
        same_forward: a subclass inherits a registered entry only while it runs the registered class's ``forward``
            (a subclass that overrides ``forward`` computes something else, so an adapter that splits the parent's
            computation would be wrong for it); ``False``: any subclass inherits.
        loader: called once, before the first registration or lookup, to register the built-in entries (lazily:
            they may import torchvision or timm).
    """

    def __init__(self, kind: str, *, same_forward: bool = False, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.same_forward = same_forward
        self._items: dict[type, T] = {}
        self._loader = loader

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader()

    def register(self, cls: type, value: T) -> T:
        """Register ``value`` for ``cls``; returns it.

        Raises:
            ValueError: ``cls`` already has an entry.
        """
        self._load()
        if cls in self._items:
            raise ValueError(f"a {self.kind} for {cls.__qualname__} is already registered")
        self._items[cls] = value
        return value

    def unregister(self, cls: type) -> T:
        """Remove and return the entry of ``cls`` (to replace a built-in one).

        Raises:
            KeyError: ``cls`` has none.
        """
        self._load()
        if cls not in self._items:
            raise KeyError(f"no {self.kind} is registered for {cls.__qualname__}")
        return self._items.pop(cls)

    def lookup(self, obj: object) -> T | None:
        """The entry of the nearest registered class in ``type(obj).__mro__`` (``None``: none applies)."""
        self._load()
        own = type(obj)
        for cls in own.__mro__:
            value = self._items.get(cls)
            if value is None:
                continue
            if self.same_forward and getattr(own, "forward", None) is not getattr(cls, "forward", None):
                return None  # a subclass that computes otherwise
            return value
        return None

    def names(self) -> list[str]:
        """Sorted qualified names of the registered classes (for error messages)."""
        self._load()
        return sorted(c.__qualname__ for c in self._items)

    def __contains__(self, cls: object) -> bool:
        self._load()
        return cls in self._items
