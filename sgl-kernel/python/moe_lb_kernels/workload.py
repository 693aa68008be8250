"""Synthetic EP workloads for the kernel benchmarks and compile checks.

Placements come from a small greedy in the spirit of EPLB (replicate the experts with the
most tokens per copy, then pack copies heaviest-first onto the least-loaded rank with a free
slot); batches are Zipf-skewed routings whose popularity drifts from the one the placement
was built for (log-normal noise), so the per-batch split has real work to do.
"""

from __future__ import annotations

import torch

from sglang_moe_lb import Placement

__all__ = ["greedy_placement", "zipf_popularity", "batch_topk"]


def zipf_popularity(num_experts: int, gen: torch.Generator, s: float = 1.1) -> torch.Tensor:
    w = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return w[torch.randperm(num_experts, generator=gen)]


def greedy_placement(popularity: torch.Tensor, num_redundant: int, num_ranks: int) -> Placement:
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


def batch_topk(popularity: torch.Tensor, tokens: int, topk: int, gen: torch.Generator,
               drift: float = 0.5, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``[tokens, topk]`` distinct logical ids per row, drawn from a drifted popularity."""
    E = popularity.numel()
    w = popularity * torch.exp(drift * torch.randn(E, generator=gen, dtype=torch.float64))
    if tokens == 0:
        return torch.zeros(0, topk, dtype=dtype)
    # Gumbel top-k: distinct experts per token, probabilities ~ w (fast, no per-row multinomial)
    g = -torch.log(-torch.log(torch.rand(tokens, E, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
    return torch.topk(torch.log(w)[None, :] + g, topk, dim=1).indices.to(dtype)
