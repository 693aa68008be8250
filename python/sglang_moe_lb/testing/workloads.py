"""Synthetic EP workloads for benchmarks and tests: EPLB-like placements and skewed batches.

Placements: a small greedy in the spirit of EPLB (replicate the experts with the most
tokens per copy, then pack copies heaviest-first onto the least-loaded rank with a free
slot). Batches: Zipf-skewed popularity, optionally drifted log-normally from the
placement's, so the per-batch split has real work to do.
"""

from __future__ import annotations

import torch

from ..placement import Placement

__all__ = ["zipf_popularity", "greedy_placement", "zipf_counts", "batch_topk"]


def zipf_popularity(num_experts: int, gen: torch.Generator, s: float = 1.1) -> torch.Tensor:
    """``[E]`` float64 popularity ``1 / rank^s`` over a random ranking of the experts."""
    w = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return w[torch.randperm(num_experts, generator=gen)]


def greedy_placement(popularity: torch.Tensor, num_redundant: int, num_ranks: int) -> Placement:
    """Replicate the busiest experts (by tokens per copy), then pack heaviest-first. ``popularity [E]``."""
    E = popularity.numel()
    P = E + num_redundant
    if P % num_ranks:
        raise ValueError(f"{P} slots cannot be split over {num_ranks} ranks")
    copies = torch.ones(E, dtype=torch.long)
    for _ in range(num_redundant):
        copies[torch.argmax(popularity / copies)] += 1
    items = sorted(((float(popularity[e] / copies[e]), e) for e in range(E) for _ in range(int(copies[e]))), reverse=True)
    S = P // num_ranks
    load, slots = [0.0] * num_ranks, [[] for _ in range(num_ranks)]
    for w, e in items:
        r = min((r for r in range(num_ranks) if len(slots[r]) < S), key=lambda r: load[r])
        slots[r].append(e)
        load[r] += w
    return Placement(torch.tensor([e for rank_slots in slots for e in rank_slots]), num_ranks, E)


def zipf_counts(popularity: torch.Tensor, entries: int, gen: torch.Generator, drift: float = 0.5) -> torch.Tensor:
    """``[E]`` long counts of ``entries`` routed entries drawn from a drifted ``popularity``."""
    w = popularity * torch.exp(drift * torch.randn(popularity.numel(), generator=gen, dtype=torch.float64))
    idx = torch.multinomial(w / w.sum(), entries, replacement=True, generator=gen) if entries else torch.zeros(0, dtype=torch.long)
    return torch.zeros(popularity.numel(), dtype=torch.long).scatter_add_(0, idx, torch.ones_like(idx))


def batch_topk(popularity: torch.Tensor, tokens: int, topk: int, gen: torch.Generator,
               drift: float = 0.5, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``[tokens, topk]`` distinct logical ids per row, drawn from a drifted popularity."""
    E = popularity.numel()
    w = popularity * torch.exp(drift * torch.randn(E, generator=gen, dtype=torch.float64))
    if tokens == 0:
        return torch.zeros(0, topk, dtype=dtype)
    # Gumbel top-k: distinct experts per token with probabilities ~ w
    g = -torch.log(-torch.log(torch.rand(tokens, E, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
    return torch.topk(torch.log(w)[None, :] + g, topk, dim=1).indices.to(dtype)
