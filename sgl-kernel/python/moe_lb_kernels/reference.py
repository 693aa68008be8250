"""Torch references of the GPU hot path, built from the core's own pieces.

The kernels match these bit for bit. Only one piece is not a plain call into the core:
the per-batch split runs the core's block-coordinate water-filling in **fixed point**
(integers in units of ``2**-SCALE_BITS`` tokens) instead of float64.

Why fixed point: a GPU reduces in a different order than the CPU, so float64 sums differ
in the last bits, and the largest-remainder rounding that follows turns last-bit noise into
a different integer quota. In fixed point every sum is exact in any order, so CPU, GPU and
the Triton interpreter agree exactly, and the split still matches the float solver to
~1e-9 tokens (see ``test/kernels``). The block step is the core's
``quota_dispatch._integer_block_step`` (an exact integer water-fill), fed with counts
scaled by ``2**SCALE_BITS``; the optimality certificate is the core's ``lower_bound``
evaluated exactly in integers.

What follows the split is the core unchanged: largest-remainder rounding (done on the
fixed-point values, same tie rule: larger remainder first, then lower slot), the integer
polish ``quota_dispatch._polish``, ``dispatch``, ``waterfill``.

Semantics vs. ``joint.balance_layer(method="fast")``: the core runs up to 200 sweeps and
then HiGHS for layers the certificate does not prove; here the split runs at most
``max_sweeps`` sweeps (stopping early once certified) and reports the certificate as a
flag instead of calling HiGHS.
"""

from __future__ import annotations

import torch

from sglang_moe_lb import Placement
from sglang_moe_lb.joint import LayerDispatch
from sglang_moe_lb.quota_dispatch import _polish, count_experts, dispatch, dp_offsets
from sglang_moe_lb.waterfill import routed_rank_load, waterfill as waterfill_ranks

__all__ = [
    "SCALE_BITS",
    "TOL_SHIFT",
    "SLACK_UNITS",
    "DEFAULT_SWEEPS",
    "int_block_step",
    "split_fixed",
    "certificate",
    "largest_remainder_fixed",
    "quotas_ref",
    "table_split_fixed",
    "table_quotas_ref",
    "balance_layer_ref",
    "local_stats_ref",
]

SCALE_BITS = 28  # fixed-point unit: 2**-28 tokens (3.7e-9)
TOL_SHIFT = 30  # certificate: relative tolerance 2**-30 (9.3e-10) ...
SLACK_UNITS = 256  # ... plus 256 units (9.5e-7 tokens) absolute
PAD = 1 << 56  # sorts after every real fixed-point load (loads < 2**25 tokens)
DEFAULT_SWEEPS = 16  # cap; stops at the first certified sweep. See docs/kernels.md (sweep study)


# ---------------------------------------------------------------------------------------------
# Split in fixed point
# ---------------------------------------------------------------------------------------------
def int_block_step(q_ext: torch.Tensor, load_ext: torch.Tensor, c_blk: torch.Tensor, colour: tuple) -> None:
    """The core's integer water-fill block step (``_integer_block_step``), in place.

    Identical arithmetic; only the sort padding is ``PAD`` (valid for fixed-point loads up
    to 2**56) instead of the core's 2**50, and padded prefixes are masked, not just large.
    """
    _, _, slot, rank, same_f, _, inv_mult, first_f = colour
    same = same_f.to(torch.long)
    first = first_f.bool()
    C = slot.shape[1]
    dev = q_ext.device
    own_rank = (same * q_ext[slot][:, None, :]).sum(-1)
    base = load_ext[rank] - own_rank
    bs = torch.sort(torch.where(first, base, PAD), dim=1).values
    k = torch.arange(1, C + 1, device=dev)
    lev_k = torch.div(c_blk[:, None] + torch.cumsum(bs, 1), k, rounding_mode="floor")
    lev_k = torch.where(k[None, :] <= first.sum(1, keepdim=True), lev_k, torch.iinfo(torch.long).max)
    level = lev_k.min(1).values
    amt = torch.where(first, (level[:, None] - base).clamp(min=0), 0)
    short = c_blk - amt.sum(1)
    at_level = first & (base <= level[:, None])
    amt = amt + (at_level & (torch.cumsum(at_level.to(torch.long), 1) <= short[:, None])).to(torch.long)
    rank_amt = (same * amt[:, None, :]).sum(-1)
    mult = same.sum(-1).clamp(min=1)
    dup_idx = (same * torch.tril(torch.ones(C, C, dtype=torch.long, device=dev), -1)).sum(-1)
    per_copy = torch.div(rank_amt, mult, rounding_mode="floor") + (dup_idx < rank_amt % mult).to(torch.long)
    valid = inv_mult > 0
    load_ext.index_add_(0, rank.reshape(-1), torch.where(first, amt - own_rank, 0).reshape(-1))
    q_ext[slot.reshape(-1)] = torch.where(valid, per_copy, 0).reshape(-1)
    q_ext[-1] = 0


def _fixed_loads(pl: Placement, c_scaled: torch.Tensor) -> torch.Tensor:
    """Per-rank load of single-copy experts, ``[R]``."""
    c_slot = c_scaled[pl.phy2log[0]]
    return pl.rank_loads(torch.where(pl.replicated_slot[0], 0, c_slot))


def certificate(pl: Placement, counts: torch.Tensor, load: torch.Tensor) -> bool:
    """The core's ``lower_bound`` test in exact integers.

    ``counts [E]`` tokens, ``load [R]`` fixed-point rank loads of a feasible split. True when
    ``max(load) - lower_bound <= (max(load) >> TOL_SHIFT) + SLACK_UNITS`` (fixed-point units),
    i.e. when some "top-k ranks by load" set has density ``>= max(load) - tolerance``.
    """
    R = pl.num_ranks
    dev = load.device
    cs = counts.to(torch.long) << SCALE_BITS
    m = int(load.max())
    thr = m - ((m >> TOL_SHIFT) + SLACK_UNITS)
    r = torch.arange(R, device=dev)
    before = (load[None, :] > load[:, None]) | ((load[None, :] == load[:, None]) & (r[None, :] < r[:, None]))
    pos = before.sum(1)  # position of each rank in the order "load desc, rank asc"
    fixed = _fixed_loads(pl, cs)
    k = torch.arange(1, R + 1, device=dev)
    in_prefix = pos[None, :] < k[:, None]  # [k, r]
    dens_num = (in_prefix * fixed[None, :]).sum(1)
    blocks = pl.replica_blocks
    if blocks.layer.numel():
        last = torch.where(blocks.valid, pos[blocks.flat_rank.clamp(max=R - 1)], -1).max(1).values
        contained = last[None, :] < k[:, None]  # [k, expert]
        dens_num = dens_num + (contained * cs[blocks.expert][None, :]).sum(1)
    return bool((dens_num >= k * thr).any())


def split_fixed(pl: Placement, counts: torch.Tensor, max_sweeps: int = DEFAULT_SWEEPS) -> tuple[torch.Tensor, bool, int]:
    """Fixed-point exact split of one layer.

    Args:
        pl: single-layer placement (the fused one for joint waterfill+lplb).
        counts: ``[E]`` integer tokens per logical expert.
        max_sweeps: sweep cap; stops after the first sweep that certifies.
    Returns:
        (``q [P]`` long fixed-point tokens per slot (units of ``2**-SCALE_BITS``; each
        expert's copies sum to ``counts[e] << SCALE_BITS`` exactly), certified, sweeps run).
    """
    c = counts.to(torch.long).reshape(-1)
    P = pl.num_physical
    cs = c << SCALE_BITS
    p2l = pl.phy2log[0]
    n = pl.num_copies[0][p2l]
    # Copy index of each slot among its expert's copies (ascending slot order).
    copy_idx = torch.empty(P, dtype=torch.long, device=c.device)
    order = pl.copy_order[0]
    copy_idx[order] = torch.arange(P, device=c.device) - pl.copy_start[0][p2l[order]]
    q = torch.div(cs[p2l], n, rounding_mode="floor") + (copy_idx < cs[p2l] % n).to(torch.long)
    blocks = pl.replica_blocks
    if not blocks.colours:
        return q, True, 0
    zero = q.new_zeros(1)
    q_ext = torch.cat([q, zero])
    load_ext = torch.cat([pl.rank_loads(q), zero])
    c_blocks = [cs[col[1]] for col in blocks.colours]
    sweeps = 0
    for _ in range(max_sweeps):
        for colour, c_blk in zip(blocks.colours, c_blocks):
            int_block_step(q_ext, load_ext, c_blk, colour)
        sweeps += 1
        if certificate(pl, c, load_ext[:-1]):
            break
    return q_ext[:-1], certificate(pl, c, load_ext[:-1]), sweeps


def largest_remainder_fixed(pl: Placement, q_fixed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``quota_dispatch.largest_remainder`` on fixed-point values: exact, same tie rule."""
    c = counts.to(torch.long).reshape(-1)
    p2l = pl.phy2log[0]
    fl = q_fixed >> SCALE_BITS
    frac = q_fixed & ((1 << SCALE_BITS) - 1)
    short = c - torch.zeros_like(c).scatter_add_(0, p2l, fl)
    same_e = p2l[None, :] == p2l[:, None]
    idx = torch.arange(p2l.numel(), device=p2l.device)
    ahead = same_e & ((frac[None, :] > frac[:, None]) | ((frac[None, :] == frac[:, None]) & (idx[None, :] < idx[:, None])))
    return fl + (ahead.sum(1) < short[p2l]).to(torch.long)


def quotas_ref(
    pl: Placement, counts: torch.Tensor, max_sweeps: int = DEFAULT_SWEEPS, polish_sweeps: int = 8
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``integer_quotas(pl, solve_split(pl, counts), counts)`` with the fixed-point split.

    Returns (quotas ``[P]`` long, fixed-point split ``[P]`` long, certified).
    """
    c = counts.to(torch.long).reshape(-1)
    qf, cert, _ = split_fixed(pl, c, max_sweeps)
    q = largest_remainder_fixed(pl, qf, c)
    if polish_sweeps > 0 and pl.has_replicas:
        qp = _polish(pl, q[None], c[None], polish_sweeps)[0]
        if int(pl.rank_loads(qp).max()) <= int(pl.rank_loads(q).max()):
            q = qp
    return q, qf, cert


def table_split_fixed(pl: Placement, fractions: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``lp_split.fractions_to_split`` in fixed point: ``[P]`` long, units of ``2**-SCALE_BITS``.

    Each copy gets ``floor(fraction * (count << SCALE_BITS))`` (one float64 product, then floor);
    the expert's remainder goes to its largest copy (lowest slot on ties), as ``_conserve`` does.
    """
    c = counts.to(torch.long).reshape(-1)
    p2l = pl.phy2log[0]
    cs = c << SCALE_BITS
    f = fractions.reshape(-1).to(torch.float64)
    x = torch.floor(f * cs[p2l].to(torch.float64)).to(torch.long).clamp(min=0)
    resid = cs - torch.zeros_like(cs).scatter_add_(0, p2l, x)
    P = p2l.numel()
    idx = torch.arange(P, device=x.device)
    # largest copy of each expert, lowest slot on ties
    better = (p2l[None, :] == p2l[:, None]) & ((x[None, :] > x[:, None]) | ((x[None, :] == x[:, None]) & (idx[None, :] < idx[:, None])))
    largest = ~better.any(1)
    return (x + torch.where(largest, resid[p2l], 0)).clamp(min=0)


def table_quotas_ref(pl: Placement, fractions: torch.Tensor, counts: torch.Tensor, polish_sweeps: int = 8) -> torch.Tensor:
    """``integer_quotas(pl, fractions_to_split(pl, fractions, counts), counts)`` in fixed point."""
    c = counts.to(torch.long).reshape(-1)
    q = largest_remainder_fixed(pl, table_split_fixed(pl, fractions, c), c)
    if polish_sweeps > 0 and pl.has_replicas:
        qp = _polish(pl, q[None], c[None], polish_sweeps)[0]
        if int(pl.rank_loads(qp).max()) <= int(pl.rank_loads(q).max()):
            q = qp
    return q


def local_stats_ref(pl: Placement, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``joint.local_stats`` for one layer (``[E + R + 1]`` long)."""
    from sglang_moe_lb.joint import local_stats

    return local_stats(topk_ids, pl.num_logical, pl.num_ranks, pl.slots_per_rank, phys_ids)


def balance_layer_ref(
    pl: Placement,
    topk_ids: torch.Tensor,
    *,
    source_rank: int = 0,
    lplb: str = "per_batch",
    waterfill: str | None = None,
    gathered: torch.Tensor | None = None,
    phys_ids: torch.Tensor | None = None,
    split_table: torch.Tensor | None = None,
    max_sweeps: int = DEFAULT_SWEEPS,
    polish_sweeps: int = 8,
) -> tuple[LayerDispatch, bool]:
    """``joint.balance_layer`` for a single-layer ``pl`` with the fixed-point split.

    Returns (``LayerDispatch``, certified). ``lplb`` is ``"per_batch"``, ``"table"`` (with
    ``split_table``) or ``"off"``.
    """
    E, R, S = pl.num_logical, pl.num_ranks, pl.slots_per_rank
    dev = topk_ids.device
    if gathered is None:
        counts = count_experts(topk_ids, E)
        offsets = None
        n_valid = (topk_ids >= 0).any(1).sum() if topk_ids.shape[0] else counts.new_zeros(())
        tokens = torch.zeros(R, dtype=torch.long, device=dev)
        tokens[source_rank] = n_valid
        routed = routed_rank_load(phys_ids, R, S) if lplb == "off" else None
    else:
        counts = gathered[:, :E].sum(0)
        offsets = dp_offsets(gathered[:, :E], source_rank)
        tokens = gathered[:, E + R].to(torch.long)
        routed = gathered[:, E : E + R].sum(0)
    quotas = shared_q = None
    cert = True
    if lplb == "per_batch" and waterfill == "all_rank":
        fpl = pl.with_shared_expert
        c_ext = torch.cat([counts.to(torch.long), tokens.sum().reshape(1)])
        q_ext, _, cert = quotas_ref(fpl, c_ext, max_sweeps, polish_sweeps)
        q_ext = q_ext.reshape(R, S + 1)
        quotas, shared_q = q_ext[:, :S].reshape(-1), q_ext[:, S]
    elif lplb == "per_batch":
        quotas, _, cert = quotas_ref(pl, counts, max_sweeps, polish_sweeps)
    elif lplb == "table":
        quotas = table_quotas_ref(pl, split_table, counts, polish_sweeps)
    elif lplb != "off":
        raise ValueError(f"lplb must be 'per_batch', 'table' or 'off', got {lplb!r}")
    if quotas is not None:
        phys_ids = dispatch(pl, topk_ids, quotas, offsets)
        routed = pl.rank_loads(quotas)
    if waterfill is None:
        return LayerDispatch(phys_ids, None, quotas), cert
    shared_rank = waterfill_ranks(phys_ids, R, S, source_rank, waterfill, routed, tokens, shared_q)
    return LayerDispatch(phys_ids, shared_rank, quotas), cert
