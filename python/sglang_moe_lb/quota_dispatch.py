"""From a fractional split to integer per-copy quotas, and from quotas to physical ids.

* ``integer_quotas``: largest-remainder rounding per expert, so quotas sum exactly to the
  expert's count and every rank exceeds its LP load by less than the number of
  replicated slots it holds (each slot gains < 1 token).
* ``dispatch``: the j-th token routed to expert ``e`` (in a fixed global order: row-major
  over ``topk_ids``, ranks in order under DP attention) goes to the copy whose quota prefix
  covers j. No sampling: every rank computes the same answer.
* ``dp_offsets``: under DP attention a rank only sees its own tokens; an exclusive prefix
  over the gathered per-rank counts gives its global starting index per expert.
"""

from __future__ import annotations

import torch

from .placement import Placement

__all__ = ["integer_quotas", "largest_remainder", "dispatch", "dp_offsets", "count_experts"]


def count_experts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert id, ignoring negative (padding) ids: ``[T, k] -> [num_experts]`` long."""
    ids = topk_ids.reshape(-1).to(torch.long)
    # Padding (-1) is counted into an extra bin that we drop: no boolean indexing, no host sync.
    return torch.bincount(torch.where(ids >= 0, ids, num_experts), minlength=num_experts + 1)[:num_experts]


def largest_remainder(x: torch.Tensor, group: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to integers whose sum per group equals ``totals`` exactly.

    Each group's shortfall after flooring goes, one unit each, to its members with the
    largest fractional parts (ties: lower index first).

    Args:
        x: ``[..., n]`` float, non-negative, summing per group to ``totals`` (up to float noise).
        group: ``[..., n]`` long group id of each entry, in ``[0, G)``.
        totals: ``[..., G]`` integer group totals.
    Returns:
        ``[..., n]`` long.
    """
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n).to(torch.float64)
    g2 = group.reshape(-1, n).expand(x2.shape[0], n).to(torch.long)
    t2 = totals.reshape(x2.shape[0] if totals.dim() > 1 else 1, -1).to(torch.long).expand(x2.shape[0], -1)
    fl = torch.floor(x2)
    frac = x2 - fl
    fl = fl.to(torch.long)
    short = t2 - torch.zeros_like(t2).scatter_add_(1, g2, fl)
    # Rank members of each group by fractional part (desc), stable so lower index wins ties.
    by_frac = torch.argsort(frac, dim=1, descending=True, stable=True)
    by_group = torch.argsort(g2.gather(1, by_frac), dim=1, stable=True)
    order = by_frac.gather(1, by_group)  # grouped, each group sorted by frac desc
    g_sorted = g2.gather(1, order)
    sizes = torch.zeros_like(t2).scatter_add_(1, g2, torch.ones_like(g2))
    start = torch.cumsum(sizes, 1) - sizes
    pos_sorted = torch.arange(n, device=x.device).expand_as(order) - start.gather(1, g_sorted)
    pos = torch.empty_like(order).scatter_(1, order, pos_sorted)
    out = fl + (pos < short.clamp(min=0).gather(1, g2)).to(torch.long)
    return out.reshape(*lead, n)


def _integer_block_step(q_ext: torch.Tensor, load_ext: torch.Tensor, c_blk: torch.Tensor, colour: tuple) -> None:
    """Integer water-fill of each block's expert onto its copy ranks, in place.

    Same blocks as the fractional solver (``Placement.replica_blocks``). The level is
    ``min_k floor((c + k lowest bases) / k)``; the few tokens left after filling to it go,
    one each, to the ranks at that level in copy order. Copies sharing a rank split its
    amount as evenly as possible, earlier copies first.
    """
    _, _, slot, rank, same_f, pad_big, inv_mult, first_f = colour
    same = same_f.to(torch.long)
    first = first_f.bool()
    C = slot.shape[1]
    own_rank = (same * q_ext[slot][:, None, :]).sum(-1)
    base = load_ext[rank] - own_rank
    big = 1 << 50
    bs = torch.sort(torch.where(first, base, big), dim=1).values
    k = torch.arange(1, C + 1, device=q_ext.device)
    level = torch.div(c_blk[:, None] + torch.cumsum(bs, 1), k, rounding_mode="floor").min(1).values
    amt = torch.where(first, (level[:, None] - base).clamp(min=0), 0)
    short = c_blk - amt.sum(1)
    at_level = first & (base <= level[:, None])
    amt = amt + (at_level & (torch.cumsum(at_level.to(torch.long), 1) <= short[:, None])).to(torch.long)
    # Spread each rank's amount over this expert's copies on it (the first copy carries the rank total).
    rank_amt = (same * amt[:, None, :]).sum(-1)  # every copy sees its rank's amount
    mult = same.sum(-1).clamp(min=1)
    dup_idx = (same * torch.tril(torch.ones(C, C, dtype=torch.long, device=q_ext.device), -1)).sum(-1)
    per_copy = torch.div(rank_amt, mult, rounding_mode="floor") + (dup_idx < rank_amt % mult).to(torch.long)
    valid = inv_mult > 0
    load_ext.index_add_(0, rank.reshape(-1), torch.where(first, amt - own_rank, 0).reshape(-1))
    q_ext[slot.reshape(-1)] = torch.where(valid, per_copy, 0).reshape(-1)
    q_ext[-1] = 0


def _polish(pl: Placement, q: torch.Tensor, c: torch.Tensor, max_sweeps: int) -> torch.Tensor:
    """Integer block-coordinate descent from quotas ``q [L, P]``; never raises the max rank load."""
    blocks = pl.replica_blocks
    L, P, R = pl.num_layers, pl.num_physical, pl.num_ranks
    zero = q.new_zeros(1)
    q_ext = torch.cat([q.reshape(-1), zero])
    load_ext = torch.cat([pl.rank_loads(q).reshape(-1), zero])
    c_blocks = [c[col[0], col[1]] for col in blocks.colours]
    for _ in range(max_sweeps):
        before = q_ext.clone()
        for colour, c_blk in zip(blocks.colours, c_blocks):
            _integer_block_step(q_ext, load_ext, c_blk, colour)
        if torch.equal(before, q_ext):
            break
    return q_ext[:-1].reshape(L, P)


def integer_quotas(
    pl: Placement, split: torch.Tensor, logical_counts: torch.Tensor, polish_sweeps: int = 8
) -> torch.Tensor:
    """Integer tokens per physical copy from a fractional split.

    Largest-remainder rounding per expert first: every rank then carries less than its
    split load plus the number of replicated slots it holds. Then, unless
    ``polish_sweeps == 0``, integer block-coordinate sweeps (the integer analogue of the
    fast solver) pull the max rank load down towards ``ceil(LP value)``, the best any
    integral dispatch can reach; per layer the polished quotas are kept only when their max
    rank load is no higher than the rounded ones'.

    Args:
        split: ``[P]``/``[L, P]`` float tokens per slot (from ``solve_split`` or a split table).
        logical_counts: ``[E]``/``[L, E]`` integer tokens per logical expert.
        polish_sweeps: cap on integer sweeps (0 disables polishing).
    Returns:
        long ``[P]``/``[L, P]``; per expert the copies sum exactly to its count.
    """
    c = pl.check_counts(logical_counts).to(torch.long)
    x = split.reshape(pl.num_layers, pl.num_physical)
    q = largest_remainder(x, pl.phy2log, c)
    if polish_sweeps > 0 and pl.has_replicas:
        qp = _polish(pl, q, c, polish_sweeps)
        better = pl.rank_loads(qp).max(1).values <= pl.rank_loads(q).max(1).values
        q = torch.where(better[:, None], qp, q)
    return q[0] if pl.single_layer else q


def dp_offsets(per_rank_counts: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's global starting index per expert under DP attention.

    Args:
        per_rank_counts: ``[D, ...]`` tokens per expert seen by each of D ranks (all-gathered).
        rank: this rank's index in ``[0, D)``.
    Returns:
        ``[...]``: tokens of lower ranks per expert (exclusive prefix).
    """
    if not 0 <= rank < per_rank_counts.shape[0]:
        raise ValueError(f"rank {rank} out of range for {per_rank_counts.shape[0]} gathered ranks")
    return per_rank_counts[:rank].sum(0)


def dispatch(
    pl: Placement,
    topk_ids: torch.Tensor,
    quotas: torch.Tensor,
    offsets: torch.Tensor | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Map logical ``topk_ids`` to physical slots so that each copy receives its quota.

    Args:
        topk_ids: ``[T, k]`` logical ids of one layer; negative ids (padding) are kept.
        quotas: ``[P]`` (or ``[L, P]`` with ``layer``) integer tokens per copy, summing per
            expert to the number of tokens routed to it (globally, under DP attention).
        offsets: ``[E]`` this rank's global starting index per expert (``dp_offsets``);
            None when this rank sees every token.
        layer: which layer of a multi-layer placement.
    Returns:
        ``[T, k]`` physical ids, same dtype as ``topk_ids``. Every token lands on a copy of
        its own logical expert, also when quotas do not match the tokens (it then stays on
        the expert's last copy in range rather than being dropped).
    """
    p2l_order = pl.copy_order[layer]
    start = pl.copy_start[layer]
    ncopy = pl.num_copies[layer]
    q = quotas.reshape(-1, pl.num_physical)[layer if quotas.dim() > 1 else 0].to(torch.long)
    E = pl.num_logical
    ids = topk_ids.reshape(-1).to(torch.long)
    valid = ids >= 0
    key = torch.where(valid, ids, E)
    # Occurrence index j of each entry among entries of the same expert, in row-major order.
    perm = torch.argsort(key, stable=True)
    cnt = torch.bincount(key, minlength=E + 1)
    first = torch.cumsum(cnt, 0) - cnt
    occ = torch.empty_like(perm)
    occ[perm] = torch.arange(ids.numel(), device=ids.device) - first[key[perm]]
    e = key.clamp(max=E - 1)
    if offsets is not None:
        occ = occ + offsets.to(torch.long)[e]
    cum = torch.cumsum(q[p2l_order], 0)  # inclusive prefix of quotas, copies grouped by expert
    base = cum[start] - q[p2l_order[start]]  # tokens before expert e's first copy
    pos = torch.searchsorted(cum, base[e] + occ, right=True)
    pos = torch.minimum(torch.maximum(pos, start[e]), start[e] + ncopy[e] - 1)
    phys = p2l_order[pos]
    out = torch.where(valid, phys, ids)
    return out.reshape(topk_ids.shape).to(topk_ids.dtype)
