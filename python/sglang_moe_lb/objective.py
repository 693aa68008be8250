"""Per-copy quotas that minimise the busiest rank's tokens, or its grouped-GEMM tiles.

``balanced_quotas`` is the split → quotas step of the one chain, for both objectives:

* ``tokens``: the exact LP split of the tokens, rounded to integers (``integer_quotas``), and
  made integer-optimal where the rounding is not: the best integral max load is
  ``ceil(LP value)`` (the problem is a transportation problem, totally unimodular), and an
  integral max-flow at that level finds it (``_flow_round``).
* ``tiles``: the same exact machinery on **tile counts** ``k_e = ceil(c_e / tile)``: integer
  tiles per copy summing to ``k_e`` that minimise the busiest rank's tiles; ties are broken
  toward fewer active copies (``consolidate_tiles``: each replicated expert's tiles are
  re-poured onto as few copies as the busiest rank's level allows, roomiest rank first),
  then tokens are filled into the chosen tiles (``fill_tiles``: every tile full but one,
  whose shortfall goes to the copy on the rank with the most tokens).

The split-and-round step itself comes from a ``SplitSteps`` object, so the same chain runs
in float64 with HiGHS behind it (``FLOAT_STEPS``, the CPU path and the oracle-checked
semantics) or in the kernels' fixed point (``moe_lb_kernels.reference``); the consolidation
and the fill are integer code shared by both, with no host synchronisation.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .cost import CostModel
from .lp_split import solve_split
from .placement import Placement
from .quota_dispatch import integer_lower_bound, integer_quotas, polish

__all__ = [
    "SplitSteps",
    "FloatSteps",
    "FLOAT_STEPS",
    "balanced_quotas",
    "tile_units",
    "consolidate_tiles",
    "fill_tiles",
    "round_fixed",
]

_PAD = 1 << 60


class SplitSteps(Protocol):
    """How a chain splits and rounds (float64 + HiGHS here; fixed point in the kernels' reference)."""

    name: str

    def split_round(self, pl: Placement, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer units per copy minimising the busiest rank: ``units [L, E]`` long ->
        (``[L, P]`` long summing per expert to ``units``, ``[L]`` bool certified optimal)."""
        ...


# ---------------------------------------------------------------------------------------------
# Exact integral rounding by max-flow (float path only)
# ---------------------------------------------------------------------------------------------
def _max_flow(n: int, edges: list[tuple[int, int, int]], s: int, t: int) -> tuple[int, list[int]]:
    """Dinic's max-flow on a small graph; returns (value, flow per edge in input order)."""
    head: list[list[int]] = [[] for _ in range(n)]
    to, cap = [], []
    for u, v, c in edges:
        head[u].append(len(to))
        to.append(v)
        cap.append(c)
        head[v].append(len(to))
        to.append(u)
        cap.append(0)
    orig = list(cap)
    total = 0
    while True:
        level = [-1] * n
        level[s] = 0
        queue = [s]
        for u in queue:
            for e in head[u]:
                if cap[e] > 0 and level[to[e]] < 0:
                    level[to[e]] = level[u] + 1
                    queue.append(to[e])
        if level[t] < 0:
            break
        it = [0] * n

        def push(u: int, f: int) -> int:
            if u == t:
                return f
            while it[u] < len(head[u]):
                e = head[u][it[u]]
                v = to[e]
                if cap[e] > 0 and level[v] == level[u] + 1:
                    got = push(v, min(f, cap[e]))
                    if got:
                        cap[e] -= got
                        cap[e ^ 1] += got
                        return got
                it[u] += 1
            return 0

        while True:
            f = push(s, 1 << 62)
            if not f:
                break
            total += f
    return total, [orig[2 * i] - cap[2 * i] for i in range(len(edges))]


def _flow_round(pl: Placement, layer: int, units: torch.Tensor, level: int) -> torch.Tensor | None:
    """Integer units per copy of one layer with every rank <= ``level``, or None if none exists.

    Source -> replicated expert (its units) -> the ranks of its copies -> sink (room
    ``level - fixed load``). An integral max-flow saturating the source is such a dispatch;
    a rank's amount goes to the expert's copies on it as evenly as possible.
    """
    R, S = pl.num_ranks, pl.slots_per_rank
    p2l = pl.phy2log[layer].tolist()
    u = units.tolist()
    rep = pl.replicated_slot[layer].tolist()
    fixed = [0] * R
    copies: dict[int, dict[int, list[int]]] = {}
    for p, e in enumerate(p2l):
        if rep[p]:
            copies.setdefault(e, {}).setdefault(p // S, []).append(p)
        else:
            fixed[p // S] += u[e]
    if any(f > level for f in fixed):
        return None
    experts = sorted(copies)
    node_e = {e: 1 + i for i, e in enumerate(experts)}
    node_r0 = 1 + len(experts)
    sink = node_r0 + R
    edges, arcs = [], []
    for e in experts:
        edges.append((0, node_e[e], u[e]))
    for e in experts:
        for r in sorted(copies[e]):
            arcs.append((e, r, len(edges)))
            edges.append((node_e[e], node_r0 + r, 1 << 62))
    for r in range(R):
        edges.append((node_r0 + r, sink, level - fixed[r]))
    value, flow = _max_flow(sink + 1, edges, 0, sink)
    if value != sum(u[e] for e in experts):
        return None
    q = [u[e] if not rep[p] else 0 for p, e in enumerate(p2l)]
    for e, r, idx in arcs:
        slots = copies[e][r]
        base, extra = divmod(flow[idx], len(slots))
        for i, p in enumerate(slots):
            q[p] = base + (1 if i < extra else 0)
    return torch.tensor(q, dtype=torch.long, device=units.device)


def _as_given(pl: Placement, t: torch.Tensor) -> torch.Tensor:
    """``[L, ...]`` -> the shape the placement's public functions take (``[...]`` for one layer)."""
    return t[0] if pl.single_layer else t


class FloatSteps:
    """The core's steps: exact float64 split (fast solver, HiGHS for what it cannot certify),
    largest remainder + polish, then an integral max-flow where the rounding is not optimal,
    so the integer max is always ``ceil(LP value)``."""

    name = "float64"

    def __init__(self, method: str = "fast"):
        self.method = method

    def split_round(self, pl: Placement, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u = units.to(torch.long).reshape(pl.num_layers, pl.num_logical)
        x = solve_split(pl, _as_given(pl, u), self.method).reshape(pl.num_layers, pl.num_physical)
        q = integer_quotas(pl, x, _as_given(pl, u)).reshape(pl.num_layers, pl.num_physical)
        certified = torch.ones(pl.num_layers, dtype=torch.bool, device=u.device)
        if not pl.has_replicas:
            return q, certified
        loads = pl.rank_loads(q)
        top = loads.max(1).values
        bound = integer_lower_bound(pl, u, loads)
        for layer in (top > bound).nonzero().flatten().tolist():
            lp = float(pl.rank_loads(x[layer]).max())
            lo = max(int(bound[layer]), math.ceil(lp - 1e-8 * max(1.0, lp)))
            for level in range(lo, int(top[layer])):
                got = _flow_round(pl, layer, u[layer], level)
                if got is not None:
                    q[layer] = polish(pl.layer(layer), got[None], u[layer][None])[0]
                    break
        return q, certified


FLOAT_STEPS = FloatSteps()


# ---------------------------------------------------------------------------------------------
# Fixed point (integer, no host sync: shared by every SplitSteps)
# ---------------------------------------------------------------------------------------------
def round_fixed(pl: Placement, q_fixed: torch.Tensor, counts: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """Largest-remainder rounding of a fixed-point split ``[L, P]`` (units ``2**-scale_bits``).

    Exactly ``quota_dispatch.largest_remainder``'s rule in integers: each expert's shortfall
    after flooring goes to its copies with the largest remainders, lower slot first on ties.
    Returns ``[L, P]`` long summing per expert to ``counts [L, E]``.
    """
    L, P = pl.num_layers, pl.num_physical
    c = counts.to(torch.long).reshape(L, pl.num_logical)
    fl = q_fixed >> scale_bits
    frac = q_fixed & ((1 << scale_bits) - 1)
    short = c - torch.zeros_like(c).scatter_add_(1, pl.phy2log, fl)
    # Sort key: expert, then remainder descending, then slot: one stable sort.
    idx = torch.arange(P, device=q_fixed.device).expand(L, P)
    key = (pl.phy2log << scale_bits) | (((1 << scale_bits) - 1) - frac)
    order = torch.argsort(key * P + idx, dim=1)  # (expert, remainder desc, slot) ascending
    e_sorted = pl.phy2log.gather(1, order)
    start = (torch.cumsum(pl.num_copies, 1) - pl.num_copies).gather(1, e_sorted)
    rank_in_expert = torch.arange(P, device=q_fixed.device).expand(L, P) - start
    take_sorted = (rank_in_expert < short.gather(1, e_sorted)).to(torch.long)
    take = torch.empty_like(take_sorted).scatter_(1, order, take_sorted)
    return fl + take


# ---------------------------------------------------------------------------------------------
# Tiles (integer, no host sync: shared by every SplitSteps)
# ---------------------------------------------------------------------------------------------
def tile_units(counts: torch.Tensor, tile: int) -> torch.Tensor:
    """Tiles each expert needs: ``ceil(counts / tile)``, same shape, long."""
    c = counts.to(torch.long)
    return torch.div(c + tile - 1, tile, rounding_mode="floor")


def consolidate_tiles(pl: Placement, n: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Re-pour each replicated expert's tiles onto as few copies as the layer's max allows.

    For every colour of ``Placement.replica_blocks`` in order, each expert's tiles are taken
    off its ranks and poured back roomiest rank first (lowest load without it, then copy
    order), each rank up to the layer's busiest load before the pass, all on that rank's
    first copy. The busiest rank's tiles never grow.

    Args: n ``[L, P]`` long tiles per copy, units ``[L, E]`` long. Returns ``[L, P]`` long.
    """
    blocks = pl.replica_blocks
    if not blocks.colours:
        return n
    L, P = pl.num_layers, pl.num_physical
    zero = n.new_zeros(1)
    n_ext = torch.cat([n.reshape(-1), zero])
    load = pl.rank_loads(n)
    load_ext = torch.cat([load.reshape(-1), zero])
    top = load.max(1).values
    for colour in blocks.colours:
        layer, expert, slot, rank, same_f, _, inv_mult, first_f = colour
        same = same_f.to(torch.long)
        first = first_f.bool()
        own_rank = (same * n_ext[slot][:, None, :]).sum(-1)
        base = load_ext[rank] - own_rank
        room = torch.where(first, top[layer][:, None] - base, 0)
        order = torch.sort(torch.where(first, base, _PAD), dim=1, stable=True).indices
        room_sorted = room.gather(1, order)
        before = torch.cumsum(room_sorted, 1) - room_sorted
        take_sorted = torch.minimum(room_sorted, (units[layer, expert][:, None] - before).clamp(min=0))
        take = torch.empty_like(take_sorted).scatter_(1, order, take_sorted)
        take = torch.where(first, take, 0)
        load_ext.index_add_(0, rank.reshape(-1), torch.where(first, take - own_rank, 0).reshape(-1))
        n_ext[slot.reshape(-1)] = torch.where(inv_mult > 0, take, 0).reshape(-1)
        n_ext[-1] = 0
        load_ext[-1] = 0
    return n_ext[:-1].reshape(L, P)


def fill_tiles(pl: Placement, n: torch.Tensor, counts: torch.Tensor, tile: int) -> torch.Tensor:
    """Tokens per copy from tiles per copy: every tile full, except the expert's one partial tile.

    ``n [L, P]`` sums per expert to ``ceil(counts / tile)``. The partial tile (``k_e * tile -
    c_e`` tokens short) goes to the expert's copy, among those with a tile, on the rank
    carrying the most tokens when every tile is full (lower slot on ties); so each copy's
    tiles stay exactly ``n``. Returns ``[L, P]`` long summing per expert to ``counts``.
    """
    L, P = pl.num_layers, pl.num_physical
    c = counts.to(torch.long).reshape(L, pl.num_logical)
    full = n * tile
    short = torch.zeros_like(c).scatter_add_(1, pl.phy2log, full) - c  # [L, E], in [0, tile)
    load = pl.rank_loads(full)
    slot_load = load.gather(1, pl.slot_rank.expand(L, P))
    idx = torch.arange(P, device=n.device)
    score = torch.where(n > 0, slot_load * (P + 1) + (P - idx), -1)
    best = torch.full_like(c, -1).scatter_reduce_(1, pl.phy2log, score, reduce="amax", include_self=True)
    chosen = (score == best.gather(1, pl.phy2log)) & (n > 0)
    return full - torch.where(chosen, short.gather(1, pl.phy2log), 0)


# ---------------------------------------------------------------------------------------------
# Public entries
# ---------------------------------------------------------------------------------------------
def _tile_of(cost: CostModel | None, tile_tokens: int | None) -> int:
    tile = tile_tokens if tile_tokens is not None else (cost.tile_tokens if cost is not None else 1)
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise ValueError(f"tile_tokens must be a positive int, got {tile!r}")
    return tile


def _balanced(pl: Placement, c: torch.Tensor, tile: int, steps: SplitSteps) -> tuple[torch.Tensor, torch.Tensor]:
    """``balanced_quotas`` without checks: ``c [L, E]`` long -> (``[L, P]`` long, ``[L]`` bool)."""
    if tile == 1:
        return steps.split_round(pl, c)
    units = tile_units(c, tile)
    n, cert = steps.split_round(pl, units)
    return fill_tiles(pl, consolidate_tiles(pl, n, units), c, tile), cert


def balanced_quotas(
    pl: Placement,
    counts: torch.Tensor,
    cost: CostModel | None = None,
    *,
    tile_tokens: int | None = None,
    steps: SplitSteps = FLOAT_STEPS,
    return_certified: bool = False,
):
    """Integer tokens per copy minimising the busiest rank's tokens, or (with ``cost``) tiles.

    Args:
        pl: the placement.
        counts: ``[E]`` (single-layer placement) or ``[L, E]`` integer tokens per logical expert.
        cost: a ``CostModel``; its ``tile_tokens`` turns on the tile objective.
        tile_tokens: the tile without a cost model (``1`` = the token objective); overrides ``cost``'s.
        steps: the split-and-round arithmetic (default: float64 + HiGHS, exact).
        return_certified: also return ``[L]`` bool (a 0-dim bool for one layer): whether the
            split was proven optimal (always True with the default steps).
    Returns:
        long ``[P]`` or ``[L, P]``: quotas ``>= 0`` summing per expert to its count,
        deterministic. With the tile objective the busiest rank's tiles are the minimum over
        every integral split (so never more than under the token objective), ties broken
        toward fewer active copies, then toward token balance.
    """
    c = pl.check_counts(counts)
    if c.dtype.is_floating_point and not torch.equal(torch.floor(c), c):
        raise ValueError("counts must be whole numbers of tokens")
    q, cert = _balanced(pl, c.to(torch.long), _tile_of(cost, tile_tokens), steps)
    q = q[0] if pl.single_layer else q
    if return_certified:
        return q, (cert[0] if pl.single_layer else cert)
    return q
