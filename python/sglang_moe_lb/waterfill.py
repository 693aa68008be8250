"""Waterfill: run each token's shared expert on a lighter rank instead of always locally.

The shared expert becomes one more top-k slot (SGLang's shared-expert fusion layout):
rank ``r`` owns ``S + 1`` fused slots, its ``S`` routed slots followed by one shared slot,
so routed physical id ``p`` becomes ``p + p // S`` and rank r's shared slot is
``r * (S + 1) + S``.

How many shared slots each rank should take: the shared expert is a logical expert with a
copy on every rank, so the exact answer is one water-fill of the tokens onto the rank
loads (``shared_quotas``), rounded by largest remainder. How tokens meet those quotas
(``assign_shared``):

1. Every source rank keeps its own tokens locally up to its quota (no traffic).
2. The overflow goes to ranks with spare quota:
   * ``all_rank``: any rank. Overflows and spare quotas are matched in prefix order
     (source ranks in order, tokens in order), so quotas are met exactly.
   * ``conservative``: only ranks the token already visits. Spare quota is shared among
     source ranks in proportion to their overflow, then each token takes its candidate
     with the most spare quota left, in a fixed number of rounds; what finds no room
     stays local.

Every rank's final load is at most ``max(always-local max load, its quota level)`` *of the
loads it was given*. Dynamic mode (global loads from the one collective) is therefore never
worse than always-local in the global max. Static mode (``rank_load`` from this rank's own
tokens, no communication) only has that guarantee for its own tokens' view: ranks decide
independently, so the union can overshoot a rank (replay measures how often).
"""

from __future__ import annotations

from typing import Literal

import torch

from .quota_dispatch import largest_remainder

__all__ = [
    "Candidates",
    "shared_quotas",
    "assign_shared",
    "fuse_topk",
    "routed_rank_load",
    "waterfill",
    "LOCAL_SHARED_MARKER",
]

Candidates = Literal["conservative", "all_rank"]
LOCAL_SHARED_MARKER = -1  # a token with no valid routed id gets no shared slot (ignored by dispatch)


def _bins(key: torch.Tensor, n: int) -> torch.Tensor:
    """``bincount(key, minlength=n)`` for keys in ``[0, n)``, with a fixed shape (no host sync)."""
    key = key.reshape(-1).to(torch.long)
    return torch.zeros(n, dtype=torch.long, device=key.device).scatter_add_(0, key, torch.ones_like(key))


def routed_rank_load(phys_topk_ids: torch.Tensor, num_ranks: int, slots_per_rank: int) -> torch.Tensor:
    """Routed tokens per rank from physical ids: ``[T, k] -> [R]`` long (padding ignored)."""
    ids = phys_topk_ids.reshape(-1).to(torch.long)
    rank = torch.where(ids >= 0, ids // slots_per_rank, num_ranks)
    return _bins(rank, num_ranks + 1)[:num_ranks]


def shared_quotas(rank_load: torch.Tensor, num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Shared slots per rank that minimise the max of ``rank_load + quota``.

    Args:
        rank_load: ``[R]`` routed load per rank.
        num_tokens: shared slots to place (tokens in the batch), 0-dim tensor or int.
    Returns:
        ``[R]`` long quotas summing to ``num_tokens``.
    """
    load = rank_load.to(torch.float64)
    R = load.shape[0]
    n = torch.as_tensor(num_tokens, dtype=torch.float64, device=load.device)
    # Exact water level: min over k of (n + sum of k lowest loads) / k.
    bs = torch.sort(load).values
    k = torch.arange(1, R + 1, device=load.device, dtype=torch.float64)
    level = ((n + torch.cumsum(bs, 0)) / k).min()
    y = (level - load).clamp(min=0.0)
    group = torch.zeros(R, dtype=torch.long, device=load.device)
    return largest_remainder(y, group, n.to(torch.long).reshape(1))


def _apportion(total: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Split integer ``total [R]`` over D sources by ``weights [D]``: ``[D, R]`` long, exact column sums."""
    w_cum = torch.cumsum(weights.to(torch.long), 0)
    w_all = w_cum[-1].clamp(min=1)
    edges = torch.cat([torch.zeros_like(w_cum[:1]), w_cum])  # [D+1]
    cut = torch.div(total[None, :].to(torch.long) * edges[:, None], w_all, rounding_mode="floor")
    return cut[1:] - cut[:-1]


def assign_shared(
    phys_topk_ids: torch.Tensor,
    quotas: torch.Tensor,
    tokens_per_source: torch.Tensor,
    source_rank: int,
    slots_per_rank: int,
    candidates: Candidates = "conservative",
) -> torch.Tensor:
    """Rank that runs each local token's shared expert.

    Args:
        phys_topk_ids: ``[T, k]`` physical routed ids of this rank's tokens (-1 = padding).
        quotas: ``[R]`` shared slots per rank (``shared_quotas``), global in dynamic mode.
        tokens_per_source: ``[R]`` tokens of each source rank (one-hot on ``source_rank`` in
            static mode). ``tokens_per_source[source_rank]`` must equal ``T``.
        source_rank: this rank.
        slots_per_rank: routed physical slots per rank (S).
        candidates: ``"conservative"`` or ``"all_rank"``.
    Returns:
        ``[T]`` long rank per token.
    """
    T = phys_topk_ids.shape[0]
    dev = phys_topk_ids.device
    R = quotas.shape[0]
    q = quotas.to(torch.long)
    n = tokens_per_source.to(torch.long)
    keep = torch.minimum(n, q)
    over = n - keep  # [R] tokens each source cannot keep
    spare = q - keep  # [R] room each rank has for other sources' tokens
    tok = torch.arange(T, device=dev)
    out = torch.full((T,), source_rank, dtype=torch.long, device=dev)
    j = tok - keep[source_rank]  # overflow index of each local token (< 0: stays local)
    if candidates == "all_rank":
        g = j + (torch.cumsum(over, 0) - over)[source_rank]  # global overflow index
        tgt = torch.searchsorted(torch.cumsum(spare, 0), g, right=True).clamp(max=R - 1)
        return torch.where(j >= 0, tgt, out)
    if candidates != "conservative":
        raise ValueError(f"candidates must be 'conservative' or 'all_rank', got {candidates!r}")
    cap = _apportion(spare, over)[source_rank].clone()  # [R] my share of every rank's spare room
    ids = phys_topk_ids.to(torch.long)
    cand = torch.where(ids >= 0, ids // slots_per_rank, R)  # [T, k]; R = no candidate
    cap_ext = torch.cat([cap, cap.new_zeros(1)])
    todo = j >= 0
    for _ in range(ids.shape[1]):  # each round a token tries its roomiest candidate
        room = torch.where(todo[:, None], cap_ext[cand], -1)
        best = room.argmax(1)
        pick = cand.gather(1, best[:, None]).squeeze(1)
        ok = todo & (room.gather(1, best[:, None]).squeeze(1) > 0)
        pick = torch.where(ok, pick, R)
        perm = torch.argsort(pick, stable=True)  # token order within each picked rank
        cnt = _bins(pick, R + 1)
        first = torch.cumsum(cnt, 0) - cnt
        rank_in_pick = torch.empty_like(perm)
        rank_in_pick[perm] = tok - first[pick[perm]]
        accept = ok & (rank_in_pick < cap_ext[pick])
        out = torch.where(accept, pick, out)
        cap_ext = cap_ext - _bins(torch.where(accept, pick, R), R + 1)
        cap_ext[R] = 0
        todo = todo & ~accept
    return out


def fuse_topk(
    phys_topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    shared_rank: torch.Tensor,
    slots_per_rank: int,
    shared_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared expert as column k in the fused id layout.

    Args:
        phys_topk_ids: ``[T, k]`` physical routed ids; topk_weights ``[T, k]``.
        shared_rank: ``[T]`` rank that runs each token's shared expert.
    Returns:
        ids ``[T, k + 1]`` (routed ``p -> p + p // S``, shared ``r * (S + 1) + S``; a token
        with no valid routed id gets ``LOCAL_SHARED_MARKER``) and weights ``[T, k + 1]``.
    """
    S = slots_per_rank
    ids = phys_topk_ids.to(torch.long)
    valid = ids >= 0
    has_any = valid.any(1)
    routed = torch.where(valid, ids + torch.div(ids, S, rounding_mode="floor"), ids)
    shared = torch.where(has_any, shared_rank.to(torch.long) * (S + 1) + S, LOCAL_SHARED_MARKER)
    out_ids = torch.cat([routed, shared[:, None]], 1).to(phys_topk_ids.dtype)
    w_shared = torch.where(has_any, shared_weight, 0.0).to(topk_weights.dtype)
    out_w = torch.cat([torch.where(valid, topk_weights, torch.zeros_like(topk_weights)), w_shared[:, None]], 1)
    return out_ids, out_w


def waterfill(
    phys_topk_ids: torch.Tensor,
    num_ranks: int,
    slots_per_rank: int,
    source_rank: int,
    candidates: Candidates = "conservative",
    rank_load: torch.Tensor | None = None,
    tokens_per_source: torch.Tensor | None = None,
    quotas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shared-expert rank per token, static or dynamic.

    Args:
        phys_topk_ids: ``[T, k]`` physical routed ids of this rank's tokens (-1 = padding).
        rank_load: ``[R]`` global routed load per rank (dynamic) or None (static: this rank's
            own tokens' load, no communication).
        tokens_per_source: ``[R]`` global tokens (with a valid route) per source rank
            (dynamic) or None (static).
        quotas: ``[R]`` shared slots per rank when already decided (joint all-rank split);
            default ``shared_quotas(rank_load, tokens)``.
    Returns:
        ``[T]`` long rank per token; tokens without a valid route stay on ``source_rank``.
    """
    dev = phys_topk_ids.device
    if (rank_load is None) != (tokens_per_source is None):
        raise ValueError("dynamic waterfill needs both rank_load and tokens_per_source (or neither, for static)")
    valid_tok = (phys_topk_ids >= 0).any(1)
    if rank_load is None:
        rank_load = routed_rank_load(phys_topk_ids, num_ranks, slots_per_rank)
        tokens_per_source = torch.zeros(num_ranks, dtype=torch.long, device=dev)
        tokens_per_source[source_rank] = valid_tok.sum()
    q = shared_quotas(rank_load, tokens_per_source.sum()) if quotas is None else quotas
    # Padding rows need no shared slot: order tokens with a route first.
    order = torch.argsort((~valid_tok).to(torch.long), stable=True)
    ranks_sorted = assign_shared(phys_topk_ids[order], q, tokens_per_source, source_rank, slots_per_rank, candidates)
    out = torch.empty_like(ranks_sorted)
    out[order] = ranks_sorted
    return torch.where(valid_tok, out, source_rank)
