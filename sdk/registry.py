"""A tiny typed registry: one per seam (exporters, runner backends, meters, transports).

Registries are plain module-level objects; tests may ``clear()`` or ``snapshot()``
them. Unknown keys raise :class:`UnknownKeyError` with the closest valid key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from edgeship.errors import UnknownKeyError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, key: str, obj: T) -> None:
        self.register(key)(obj)

    def get(self, key: str) -> T:
        try:
            return self._items[key]
        except KeyError:
            raise UnknownKeyError(self.kind, key, self._items) from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def keys(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def snapshot(self) -> dict[str, T]:
        return dict(self._items)

    def restore(self, snap: dict[str, T]) -> None:
        self._items = dict(snap)

    def clear(self) -> None:
        self._items.clear()
