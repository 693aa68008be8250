"""``--batch-sweep``: the trace's routing replayed at fixed batch sizes (tokens per rank).

For each size N every rank serves exactly N tokens per step:

* bundled data and the synthetic generator draw N tokens per rank directly from the same
  per-step popularity (``Trace.regenerate``);
* per_token dumps resample token *rows* (all layers of a token together, so the recorded
  co-occurrence stays) uniformly with replacement, N per source rank from that rank's own
  recorded tokens (from the whole batch when the dump's ranks are re-split, or a rank
  recorded none);
* counts-only dumps (stat, per_pass) draw N x R tokens from each step's recorded per-expert
  distribution (``sampling.inclusion_probabilities`` + ``sample_topk``).

The placement timeline is the one of the recorded trace (a server's placement comes from its
recorded traffic, not from the batch size), and each size is scored on ``sweep_steps``
evenly spaced steps of it. The evaluation and aggregation are the regular ones.
"""

from __future__ import annotations

import numpy as np
import torch

from .sampling import inclusion_probabilities, sample_topk
from .sources import Batch, Trace, step_generator

__all__ = ["sized_trace", "resample_tokens", "resample_counts", "evenly_spaced"]


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)`` (all of them when ``k >= n`` or ``k < 0``)."""
    if k < 0 or k >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}) if k > 0 else []


def resample_tokens(batch: Batch, per_rank: int, num_ranks: int, gen: torch.Generator) -> Batch:
    """N token rows per source rank, drawn with replacement from the batch's own rows."""
    ids = batch.topk
    T = ids.shape[1]
    sizes = batch.rank_sizes if batch.rank_sizes is not None and len(batch.rank_sizes) == num_ranks else None
    starts = np.cumsum([0] + list(sizes))[:-1] if sizes else None
    picks = []
    for r in range(num_ranks):
        if sizes and sizes[r] > 0:
            picks.append(int(starts[r]) + torch.randint(sizes[r], (per_rank,), generator=gen))
        else:
            picks.append(torch.randint(T, (per_rank,), generator=gen))
    return Batch(ids[:, torch.cat(picks)], [per_rank] * num_ranks, batch.label)


def resample_counts(counts: torch.Tensor, per_rank: int, num_ranks: int, top_k: int, gen: torch.Generator,
                    label: str) -> Batch:
    """N x R tokens drawn from a step's per-expert distribution ``counts [L, E]``."""
    w = counts.to(torch.float64)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))  # an empty layer: uniform
    pi = inclusion_probabilities(w, top_k)
    return Batch(sample_topk(pi, per_rank * num_ranks, top_k, gen), [per_rank] * num_ranks, label)


def sized_trace(trace: Trace, per_rank: int, num_ranks: int, seed: int) -> tuple[Trace, str]:
    """(the trace at ``per_rank`` tokens per rank, how it was made)."""
    if trace.regenerate is not None:
        return trace.regenerate(per_rank), "drawn from the generator at this size"
    if trace.step_counts is not None:
        counts = trace.step_counts

        def make(step: int) -> Batch:
            gen = step_generator(seed, step, salt=1000 + per_rank)
            return resample_counts(counts[step], per_rank, num_ranks, trace.top_k, gen, "recorded")

        how = "tokens drawn from each step's recorded per-expert counts"
    else:
        def make(step: int) -> Batch:
            gen = step_generator(seed, step, salt=2000 + per_rank)
            return resample_tokens(trace.batch(step), per_rank, num_ranks, gen)

        how = "recorded token rows resampled with replacement per source rank"
    t = Trace(trace.num_logical, trace.top_k, trace.num_layers, trace.num_steps, make,
              calibration=trace.calibration, recorded_placement=trace.recorded_placement, phases=trace.phases,
              info=trace.info)
    return t, how
