"""The gate's decision and the plan level per shared batch size, memoised.

A batch size every rank shares (``Runtime.shared_tokens``) decides both; each size is priced
once (``gate.Gate.open``, ``plan.level_index``), so a forward pass only reads a dict.
"""

from __future__ import annotations

from ..gate import Gate
from ..plan import level_index

__all__ = ["GateCache"]


class GateCache:
    """``open(n)`` and ``level(n)`` for a batch size ``n`` (tokens per rank).

    gate: the ``gate.Gate`` of this process's mode, or None (no gate: always open).
    levels: the plans' batch-size levels.
    """

    def __init__(self, gate: Gate | None, levels: tuple[int, ...]):
        self.gate = gate
        self.levels = levels
        self._open: dict[int, bool] = {}
        self._level: dict[int, int] = {}

    def open(self, n: int) -> bool:
        if self.gate is None:
            return True
        got = self._open.get(n)
        if got is None:
            got = self._open[n] = bool(self.gate.open(n))
        return got

    def level(self, n: int) -> int:
        got = self._level.get(n)
        if got is None:
            got = self._level[n] = level_index(self.levels, n)
        return got
