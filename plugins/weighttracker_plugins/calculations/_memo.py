"""Reuse a per-evaluation value while its inputs are the very same objects.

Private to ``weighttracker_plugins`` (no hooks here). A calculation that is a pure
function of other calculations' values can skip its kernels when every input is the
object it saw last time: the weight scan hands out the same result tensors while no weight
is zero, and everything downstream of it (active units, cost axes, active MACs, zero
counts) is then unchanged. Values are compared by identity only (no tensor is read), and
the memo holds the inputs, so their ids cannot be reused by other objects. Calculation
values are shared by every consumer and must never be modified in place, which is what
makes handing the same object out again safe.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_MEMO: weakref.WeakKeyDictionary[Any, dict[str, tuple[tuple[Any, ...], Any]]] = weakref.WeakKeyDictionary()


def reuse(structure: Any, name: str, inputs: Sequence[Any], compute: Callable[[], T]) -> T:
    """``compute()``, or its last value for ``structure`` if ``inputs`` are the same objects."""
    memo = _MEMO.get(structure)
    if memo is None:
        memo = _MEMO.setdefault(structure, {})
    last = memo.get(name)
    if last is not None and len(last[0]) == len(inputs) and all(a is b for a, b in zip(last[0], inputs)):
        return last[1]  # type: ignore[no-any-return]
    value = compute()
    memo[name] = (tuple(inputs), value)
    return value


class LastResult:
    """The last value of a pure function of some inputs, reused while they are the same objects.

    For trackers: ``track()`` hands back a fresh copy of the cached dicts (their tensors are
    shared; metrics are read, never modified in place), so a caller that edits the returned
    dict cannot change the next one.
    """

    __slots__ = ("inputs", "value")

    def __init__(self) -> None:
        self.inputs: tuple[Any, ...] | None = None
        self.value: Any = None

    def get(self, inputs: Sequence[Any], compute: Callable[[], T]) -> T:
        last = self.inputs
        if last is not None and len(last) == len(inputs) and all(a is b for a, b in zip(last, inputs)):
            return _fresh(self.value)  # type: ignore[no-any-return]
        value = compute()
        self.inputs, self.value = tuple(inputs), value
        return _fresh(value)  # type: ignore[no-any-return]


def _fresh(value: Any) -> Any:
    """New dicts all the way down (leaves shared)."""
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return value
