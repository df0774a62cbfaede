"""One small registry type for encoders, aggregators and suites.

Example:
    >>> reg = Registry[int]("number")
    >>> reg.register("one", 1)
    1
    >>> reg.get("one")
    1
    >>> reg.get("on")
    Traceback (most recent call last):
    ...
    bench.common.errors.ConfigError: unknown number 'on'; did you mean: one? Known: one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from bench.common.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map that refuses duplicates and suggests close names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Add `obj` under `name`; a second registration of a name is an error."""
        if not name or name != name.strip():
            raise ConfigError(f"{self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in self._items and not replace:
            raise ConfigError(f"{self.kind} {name!r} is already registered; pick another name")
        self._items[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated object."""

        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def get(self, name: str) -> T:
        """Look up `name`, or raise a ConfigError that lists close and known names."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}?" if close else "."
        return f"unknown {self.kind} {name!r}{hint} Known: {', '.join(sorted(self._items))}."

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
