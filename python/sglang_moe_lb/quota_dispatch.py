"""From a fractional split to integer per-copy quotas, and from quotas to physical ids.

* ``integer_quotas``: largest-remainder rounding per expert, so quotas sum exactly to the
  expert's count and every rank exceeds its LP load by less than the number of
  replicated slots it holds (each slot gains < 1 token); then, only where the rounded max
  is above the integer lower bound, integer block-coordinate sweeps (``polish``).
* ``dispatch``: the j-th token routed to expert ``e`` (in a fixed global order: row-major
  over ``topk_ids``, ranks in order under DP attention) goes to the copy whose quota prefix
  covers j. No sampling: every rank computes the same answer.
* ``dp_offsets``: under DP attention a rank only sees its own tokens; an exclusive prefix
  over the gathered per-rank counts gives its global starting index per expert.

The public functions check their arguments (a ``ValueError`` naming the argument); the
``_``-prefixed forms they wrap do no host synchronisation and allocate only fixed-shape
tensors, so the kernels' graph-safe reference path can chain them.
"""

from __future__ import annotations

import torch

from .placement import EXACT_TOKENS, Placement

__all__ = [
    "integer_quotas",
    "largest_remainder",
    "polish",
    "integer_block_step",
    "integer_lower_bound",
    "dispatch",
    "dp_offsets",
    "count_experts",
    "check_topk_ids",
    "count_step",
    "dispatch_step",
]

_PAD = 1 << 60  # sorts after every real (integer or fixed-point) load; never summed


# ---------------------------------------------------------------------------------------------
# Argument checks (host-side; the hot path's callers check once at their entry)
# ---------------------------------------------------------------------------------------------
def check_topk_ids(topk_ids: torch.Tensor, num_experts: int, name: str = "topk_ids") -> torch.Tensor:
    """``topk_ids`` must be an integer ``[T, k]`` tensor of ids in ``[-1, num_experts)``."""
    if not isinstance(topk_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got {topk_ids.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"{name} must be [tokens, k], got shape {list(topk_ids.shape)}")
    if topk_ids.numel():
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"{name} must lie in [-1, {num_experts}) (-1 = padding), found range [{lo}, {hi}]")
    return topk_ids


def _check_quotas(pl: Placement, quotas: torch.Tensor, name: str = "quotas") -> None:
    if not isinstance(quotas, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(quotas).__name__}")
    if quotas.shape[-1:] != (pl.num_physical,) or quotas.dim() > 2:
        raise ValueError(f"{name} must be [{pl.num_physical}] or [layers, {pl.num_physical}], got {list(quotas.shape)}")
    if quotas.dtype.is_floating_point or quotas.dtype == torch.bool:
        raise ValueError(f"{name} must be integer tokens per copy, got {quotas.dtype}")
    if quotas.numel() and int(quotas.min()) < 0:
        raise ValueError(f"{name} has negative entries")


def _check_split(pl: Placement, split: torch.Tensor, name: str = "split") -> torch.Tensor:
    if not isinstance(split, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(split).__name__}")
    want = pl.num_layers * pl.num_physical
    if split.numel() != want or split.shape[-1] != pl.num_physical:
        raise ValueError(
            f"{name} must be [{pl.num_physical}] or [{pl.num_layers}, {pl.num_physical}] for this placement, "
            f"got {list(split.shape)}"
        )
    if split.dtype.is_complex or split.dtype == torch.bool:
        raise ValueError(f"{name} must be real tokens per copy, got {split.dtype}")
    if split.dtype.is_floating_point and not bool(torch.isfinite(split).all()):
        raise ValueError(f"{name} has NaN or inf entries")
    if bool((split < 0).any()):
        raise ValueError(f"{name} has negative entries")
    return split.reshape(pl.num_layers, pl.num_physical)


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def count_step(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The chain's count step: ``count_experts`` without checks (``[T, k] -> [num_experts]``
    long), fixed output shape, no host sync; callers check once at their entry."""
    ids = topk_ids.reshape(-1).to(torch.long)
    key = torch.where(ids >= 0, ids, num_experts)  # padding into an extra bin that we drop
    out = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    return out.scatter_add_(0, key, torch.ones_like(key))[:num_experts]


def count_experts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens per expert id, ignoring ``-1`` (padding) ids: ``[T, k] -> [num_experts]`` long."""
    return count_step(check_topk_ids(topk_ids, num_experts), num_experts)


# ---------------------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------------------
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


def integer_block_step(q_ext: torch.Tensor, load_ext: torch.Tensor, c_blk: torch.Tensor, colour: tuple) -> None:
    """Integer water-fill of each block's expert onto its copy ranks, in place.

    Same blocks as the fractional solver (``Placement.replica_blocks``). The level is
    ``min_k floor((c + k lowest bases) / k)`` over the expert's ranks; the few tokens left
    after filling to it go, one each, to the ranks at that level in copy order. Copies
    sharing a rank split its amount as evenly as possible, earlier copies first. Any
    integer unit works (tokens, tiles, the kernels' fixed point): padding never enters a sum.

    Args (``n`` blocks, ``C`` copies at most): ``q_ext [L*P + 1]`` per-slot amounts and
    ``load_ext [L*R + 1]`` rank loads (last entry: the padding dummy), ``c_blk [n]`` each
    block's total, ``colour`` one entry of ``Placement.replica_blocks.colours``.
    """
    _, _, slot, rank, same_f, _, inv_mult, first_f = colour
    same = same_f.to(torch.long)
    first = first_f.bool()
    C = slot.shape[1]
    dev = q_ext.device
    own_rank = (same * q_ext[slot][:, None, :]).sum(-1)
    base = load_ext[rank] - own_rank
    n_ranks = first.sum(1, keepdim=True)
    bs = torch.sort(torch.where(first, base, _PAD), dim=1).values
    k = torch.arange(1, C + 1, device=dev)
    real = k[None, :] <= n_ranks  # the first n_ranks sorted entries are real ranks
    csum = torch.cumsum(torch.where(real, bs, 0), 1)
    lev_k = torch.where(real, torch.div(c_blk[:, None] + csum, k, rounding_mode="floor"), torch.iinfo(torch.long).max)
    level = lev_k.min(1).values
    amt = torch.where(first, (level[:, None] - base).clamp(min=0), 0)
    short = c_blk - amt.sum(1)
    at_level = first & (base <= level[:, None])
    amt = amt + (at_level & (torch.cumsum(at_level.to(torch.long), 1) <= short[:, None])).to(torch.long)
    # Spread each rank's amount over this expert's copies on it (the first copy carries the rank total).
    rank_amt = (same * amt[:, None, :]).sum(-1)  # every copy sees its rank's amount
    mult = same.sum(-1).clamp(min=1)
    dup_idx = (same * torch.tril(torch.ones(C, C, dtype=torch.long, device=dev), -1)).sum(-1)
    per_copy = torch.div(rank_amt, mult, rounding_mode="floor") + (dup_idx < rank_amt % mult).to(torch.long)
    valid = inv_mult > 0
    load_ext.index_add_(0, rank.reshape(-1), torch.where(first, amt - own_rank, 0).reshape(-1))
    q_ext[slot.reshape(-1)] = torch.where(valid, per_copy, 0).reshape(-1)
    q_ext[-1] = 0


def integer_lower_bound(pl: Placement, counts: torch.Tensor, rank_load: torch.Tensor) -> torch.Tensor:
    """Integer lower bound on the max rank load of any integral dispatch, tight at the optimum.

    The prefix bound of ``lp_split.lower_bound`` in exact integers, rounded up: for the
    ranks sorted by ``rank_load`` (descending, lower rank first on ties), each prefix ``S``
    must carry its fixed load plus every expert whose copies all lie in ``S``.

    Args: counts ``[L, E]`` long, rank_load ``[L, R]`` long (loads of any dispatch). Returns ``[L]`` long.
    """
    L, R = rank_load.shape
    c = counts.to(torch.long)
    dev = c.device
    c_slot = c.gather(1, pl.phy2log)
    fixed = pl.rank_loads(torch.where(pl.replicated_slot, 0, c_slot))
    order = torch.argsort(rank_load, dim=1, descending=True, stable=True)
    pos = torch.empty_like(order).scatter_(1, order, torch.arange(R, device=dev).expand(L, R))
    contained = torch.zeros(L, R, dtype=torch.long, device=dev)
    blocks = pl.replica_blocks
    if blocks.layer.numel():
        pos_ext = torch.cat([pos.reshape(-1), pos.new_full((1,), -1)])
        last = pos_ext[blocks.flat_rank].max(1).values
        contained.index_put_((blocks.layer, last), c[blocks.layer, blocks.expert], accumulate=True)
    num = torch.cumsum(fixed.gather(1, order), 1) + torch.cumsum(contained, 1)
    k = torch.arange(1, R + 1, device=dev)
    return torch.div(num + k - 1, k, rounding_mode="floor").max(1).values


def _polish_sweeps(pl: Placement, q: torch.Tensor, c: torch.Tensor, max_sweeps: int, early_exit: bool) -> torch.Tensor:
    blocks = pl.replica_blocks
    L, P = pl.num_layers, pl.num_physical
    zero = q.new_zeros(1)
    q_ext = torch.cat([q.reshape(-1), zero])
    load_ext = torch.cat([pl.rank_loads(q).reshape(-1), zero])
    c_blocks = [c[col[0], col[1]] for col in blocks.colours]
    for _ in range(max_sweeps):
        before = q_ext.clone() if early_exit else None
        for colour, c_blk in zip(blocks.colours, c_blocks):
            integer_block_step(q_ext, load_ext, c_blk, colour)
        # A sweep that changes nothing is a fixed point: later sweeps are no-ops, so stopping
        # early and running all ``max_sweeps`` give the same quotas.
        if early_exit and torch.equal(before, q_ext):
            break
    return q_ext[:-1].reshape(L, P)


def polish(pl: Placement, q: torch.Tensor, counts: torch.Tensor, max_sweeps: int = 8, *,
           early_exit: bool = True, skip_at_bound: bool = True) -> torch.Tensor:
    """The polish policy on rounded quotas ``q [L, P]`` (one rule for every path).

    Layers whose max rank load already equals ``integer_lower_bound`` are optimal and kept
    as they are. The others get up to ``max_sweeps`` integer block-coordinate sweeps, kept
    only when their max rank load is no higher than the rounded one's. ``early_exit=False``
    runs every sweep (same result, no host sync: the graph-safe reference).
    ``skip_at_bound=False`` polishes optimal layers too (the v1 kernels' rule).

    Args: counts ``[L, E]`` long. Returns ``[L, P]`` long.
    """
    if max_sweeps <= 0 or not pl.has_replicas:
        return q
    c = counts.to(torch.long)
    load = pl.rank_loads(q)
    if skip_at_bound:
        need = load.max(1).values > integer_lower_bound(pl, c, load)
    else:
        need = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    if early_exit and not bool(need.any()):
        return q
    qp = _polish_sweeps(pl, q, c, max_sweeps, early_exit)
    better = pl.rank_loads(qp).max(1).values <= load.max(1).values
    return torch.where((need & better)[:, None], qp, q)


def integer_quotas(
    pl: Placement, split: torch.Tensor, logical_counts: torch.Tensor, polish_sweeps: int = 8
) -> torch.Tensor:
    """Integer tokens per physical copy from a fractional split.

    Largest-remainder rounding per expert first: every rank then carries less than its
    split load plus the number of replicated slots it holds. Then ``polish`` (unless
    ``polish_sweeps == 0``) pulls the max rank load down towards ``ceil(LP value)``, the best
    any integral dispatch can reach, on the layers not already there.

    Args:
        split: ``[P]``/``[L, P]`` float tokens per slot (from ``solve_split`` or a split table),
            finite and non-negative.
        logical_counts: ``[E]``/``[L, E]`` integer tokens per logical expert.
        polish_sweeps: cap on integer sweeps (0 disables polishing).
    Returns:
        long ``[P]``/``[L, P]``; per expert the copies sum exactly to its count.
    """
    c = pl.check_counts(logical_counts, max_total=EXACT_TOKENS).to(torch.long)
    x = _check_split(pl, split)
    q = largest_remainder(x, pl.phy2log, c)
    q = polish(pl, q, c, polish_sweeps)
    return q[0] if pl.single_layer else q


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
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


def dispatch_step(pl: Placement, topk_ids: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor | None,
              layer: int = 0) -> torch.Tensor:
    """The chain's dispatch step: ``dispatch`` without checks (``topk_ids [T, k]``, ``q [P]``
    long, ``offsets [E]`` or None -> ``[T, k]``): no host sync, fixed shapes."""
    p2l_order = pl.copy_order[layer]
    start = pl.copy_start[layer]
    ncopy = pl.num_copies[layer]
    E = pl.num_logical
    ids = topk_ids.reshape(-1).to(torch.long)
    valid = ids >= 0
    key = torch.where(valid, ids, E)
    # Occurrence index j of each entry among entries of the same expert, in row-major order.
    perm = torch.argsort(key, stable=True)
    cnt = torch.zeros(E + 1, dtype=torch.long, device=ids.device).scatter_add_(0, key, torch.ones_like(key))
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


def dispatch(
    pl: Placement,
    topk_ids: torch.Tensor,
    quotas: torch.Tensor,
    offsets: torch.Tensor | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Map logical ``topk_ids`` to physical slots so that each copy receives its quota.

    Args:
        topk_ids: ``[T, k]`` logical ids of one layer in ``[-1, E)``; ``-1`` (padding) is kept.
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
    check_topk_ids(topk_ids, pl.num_logical)
    _check_quotas(pl, quotas)
    if not 0 <= layer < pl.num_layers:
        raise ValueError(f"layer {layer} out of range for a placement of {pl.num_layers} layers")
    if offsets is not None and tuple(offsets.shape) != (pl.num_logical,):
        raise ValueError(f"offsets must be [{pl.num_logical}] (one per logical expert), got {list(offsets.shape)}")
    q = quotas.reshape(-1, pl.num_physical)[layer if quotas.dim() > 1 else 0].to(torch.long)
    return dispatch_step(pl, topk_ids, q, offsets, layer)
