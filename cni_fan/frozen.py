"""Immutable value classes with `__slots__`, for the per-call path.

`@dataclass(frozen=True)` generates and compiles its methods when the
class is made, at every start of a standalone call (docs/architecture.md,
"What a standalone call imports"); the few per-call types that need more
than a `NamedTuple` (checks and derived fields in `__init__`) get the same
behaviour from this base instead: fields set once (`_set`), assignment
refused, equality, hash and repr over the constructor's arguments
(`ARGS`), and copies and pickles that go through the constructor.
"""
from __future__ import annotations

from typing import Any


class Frozen:
    __slots__ = ()
    ARGS: tuple[str, ...] = ()  # the constructor's arguments, in order: the value's identity

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name}")

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.ARGS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple[type, tuple]:
        return (type(self), self._key())  # copies and pickles go through the constructor's checks

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in self.ARGS)})"
