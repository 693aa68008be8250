"""An explicit solve cache for the simulator: a ``SplitSteps`` that remembers its answers.

Every rank of a global-sync mode derives bit-identical split problems from the same gathered
rows; that is the design (each rank computes the same quotas, no broadcast). The simulator
plays all ranks in one process, so it passes one ``MemoSteps`` as the ``steps=`` argument of
``chain.balance_layer`` for every rank and mode of one (step, layer): each distinct problem is
solved once, and every call still runs the whole chain (counts, offsets, dispatch, Waterfill).

The cache key is the exact input: the placement's map and rank count, and the units (or the
table and counts) as bytes. A cached answer is therefore the answer the inner steps would
give (they are deterministic); a test checks that memoised and plain runs agree exactly.

``solve_many`` fills the cache ahead: independent single-layer problems (every layer, every
rank of a local-sync mode) go to the inner steps as the layers of one multi-layer placement,
and each answer is stored under its own single-layer key. The layers of one call never
interact (``lp_split._solve_fast`` freezes a layer once certified; the rounding is per
layer), so that is exactly what each problem gives alone; a test checks it. A problem
predicted wrongly is only a cache miss: the chain then solves it itself.

``take_credit`` returns the solve time saved by hits since its last call, so the simulator
can report what one rank would have spent on its own.
"""

from __future__ import annotations

import time

import torch

from ..objective import FLOAT_STEPS, SplitSteps
from ..placement import Placement

__all__ = ["MemoSteps"]


def _key(*parts) -> tuple:
    out = []
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            out.append((str(t.dtype), tuple(t.shape), t.numpy().tobytes()))
        else:
            out.append(p)
    return tuple(out)


class MemoSteps:
    """Wraps a ``SplitSteps`` (default ``FLOAT_STEPS``) with a per-instance answer cache.

    Make one per (step, layer) or narrower; it never evicts.
    """

    def __init__(self, inner: SplitSteps = FLOAT_STEPS):
        self.inner = inner
        self.name = f"memo({inner.name})"
        self._cache: dict = {}
        self._credit = 0.0
        self.hits = 0
        self.misses = 0

    def _get(self, key: tuple, compute):
        hit = self._cache.get(key)
        if hit is not None:
            self.hits += 1
            self._credit += hit[1]
            return hit[0]
        self.misses += 1
        t0 = time.perf_counter()
        value = compute()
        self._cache[key] = (value, time.perf_counter() - t0)
        return value

    def split_round(self, pl: Placement, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = _key("split", pl.phy2log, pl.num_ranks, units)
        q, cert = self._get(key, lambda: self.inner.split_round(pl, units))
        return q.clone(), cert.clone()

    def solve_many(self, problems: list[tuple[Placement, torch.Tensor]]) -> None:
        """Cache the answers of single-layer problems ``(placement, units [1, E])``, batched per shape."""
        todo: dict[tuple, tuple[Placement, torch.Tensor]] = {}
        for pl, units in problems:
            key = _key("split", pl.phy2log, pl.num_ranks, units)
            if key not in self._cache:
                todo.setdefault(key, (pl, units))
        groups: dict[tuple, list] = {}
        for key, (pl, units) in todo.items():
            groups.setdefault((pl.num_ranks, pl.num_logical, pl.num_physical), []).append((key, pl, units))
        for (R, E, _), items in groups.items():
            p2l = torch.cat([pl.phy2log.reshape(1, -1) for _, pl, _ in items])
            units = torch.cat([u.reshape(1, -1) for _, _, u in items])
            t0 = time.perf_counter()
            q, cert = self.inner.split_round(Placement(p2l, R, E), units)
            share = (time.perf_counter() - t0) / len(items)
            for i, (key, _, _) in enumerate(items):
                self._cache[key] = ((q[i : i + 1].clone(), cert[i : i + 1].clone()), share)
                self.misses += 1

    def take_credit(self) -> float:
        """Seconds of solving that cache hits saved since the last call."""
        c, self._credit = self._credit, 0.0
        return c
