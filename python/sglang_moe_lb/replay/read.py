"""The *read* stage: every step's batch drawn once, its per-layer expert counts, and the batches kept.

Batches are deterministic per step (seeded per step, or recorded), so they can be drawn in any
order: forked workers draw them in parallel, the counts go to the placement timeline (which
needs them in order), and the batches themselves are kept (as int16/int32) for the evaluation
when they fit in ``KEEP_BYTES``; otherwise the evaluation draws each again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .pool import run_jobs
from .sources import Batch, Trace

__all__ = ["Read", "count_layers", "read_trace", "KEEP_BYTES"]

KEEP_BYTES = 768 << 20  # keep the drawn batches in memory up to this size


def count_layers(topk: torch.Tensor, E: int) -> torch.Tensor:
    """Per-layer expert counts of ``[L, T, k]`` ids (``-1`` ignored): ``[L, E]`` float64."""
    L = topk.shape[0]
    ids = topk.reshape(L, -1).to(torch.long)
    flat = (ids + E * torch.arange(L)[:, None])[ids >= 0]
    return torch.bincount(flat, minlength=L * E).reshape(L, E).to(torch.float64)


@dataclass
class Read:
    """counts ``[N, L, E]`` float64 per step; kept: per step ``(ids, rank_sizes, label)`` or None."""

    counts: torch.Tensor
    kept: list | None = field(default=None, repr=False)

    def batch(self, trace: Trace, t: int) -> Batch:
        if self.kept is not None:
            ids, sizes, label = self.kept[t]
            return Batch(ids.to(torch.long), sizes, label)
        return trace.batch(t)


def _small(ids: torch.Tensor, E: int) -> torch.Tensor:
    return ids.to(torch.int16 if E < 2**15 else torch.int32)


def read_trace(trace: Trace, workers: int = 1, threads: int = 1, progress: bool = False) -> Read:
    """Draw every batch once (``workers`` processes); see the module docstring."""
    E, N = trace.num_logical, trace.num_steps
    first = trace.batch(0)
    keep = _small(first.topk, E).nbytes * N <= KEEP_BYTES  # estimate from the first batch

    def task(t: int):
        b = first if t == 0 else trace.batch(t)
        return count_layers(b.topk, E), ((_small(b.topk, E), b.rank_sizes, b.label) if keep else None)

    counts = torch.zeros(N, trace.num_layers, E, dtype=torch.float64)
    kept: list | None = [None] * N if keep else None
    jobs = run_jobs(task, range(N), workers, threads, "read" if progress else None)
    with contextlib.closing(jobs):
        for t, (c, small) in jobs:
            counts[t] = c
            if kept is not None:
                kept[t] = small
    return Read(counts, kept)
