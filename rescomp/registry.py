"""Name -> builder registries (DESIGN.md, habit 4): no if/elif chains over names."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from rescomp.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or ''. Candidates that difflib finds alike
    are ranked by edit distance: for 'resnet21', 'resnet20' (one edit) before 'resnet32' (two)."""
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    if not close:
        return ""
    best = min(close, key=lambda c: (_edits(name, c), close.index(c)))
    return f" (did you mean '{best}'?)"


def _edits(a: str, b: str) -> int:
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


class Registry(Generic[T]):
    """A named table of builders. A duplicate name raises; an unknown name lists the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            valid = sorted(self._items)
            raise ConfigError(
                f"unknown {self.kind} '{name}'{suggest(name, valid)}; valid: {', '.join(valid)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
