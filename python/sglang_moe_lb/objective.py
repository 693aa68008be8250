"""Per-copy quotas that minimise the busiest rank's tokens, or its grouped-GEMM tiles.

``balanced_quotas`` is the split → quotas step of the one chain, for both objectives:

* ``tokens``: the exact LP split of the tokens, rounded to integers (``integer_quotas``), and
  made integer-optimal where the rounding is not: the best integral max load is
  ``ceil(LP value)`` (the problem is a transportation problem, totally unimodular), and
  HiGHS's simplex on that transportation LP finds an integral dispatch at that level
  (``_flow_round``).
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

import numpy as np
import torch

from .cost import CostModel
from .lp_split import SplitError, new_highs, solve_split
from .placement import EXACT_TOKENS, Placement
from .quota_dispatch import integer_lower_bound, integer_quotas, polish

__all__ = [
    "SplitSteps",
    "FloatSteps",
    "FLOAT_STEPS",
    "balanced_quotas",
    "split_step",
    "max_layer_tokens",
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
# Exact integral rounding by a transportation LP (float path only)
# ---------------------------------------------------------------------------------------------
def _transport(supply: np.ndarray, arcs: np.ndarray, room: np.ndarray) -> np.ndarray | None:
    """Ship every expert's ``supply [N]`` over ``arcs [A, 2]`` (expert, rank) within each rank's
    ``room [R]``; returns integer flow per arc ``[A]``, or None when no shipment fits.

    A bipartite transportation problem: its constraint matrix is totally unimodular, so a
    simplex vertex of the LP "max shipped" is integral. HiGHS solves it; the rounded
    solution is checked exactly in integers before it is used.
    """
    import highspy

    N, A, R = supply.size, arcs.shape[0], room.size
    h = new_highs()
    h.addVars(A, np.zeros(A), np.full(A, highspy.kHighsInf))
    h.changeColsCost(A, np.arange(A, dtype=np.int32), np.ones(A))
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    by_e = np.argsort(arcs[:, 0], kind="stable").astype(np.int32)
    starts_e = np.searchsorted(arcs[by_e, 0], np.arange(N)).astype(np.int32)
    h.addRows(N, np.zeros(N), supply.astype(np.float64), A, starts_e, by_e, np.ones(A))
    by_r = np.argsort(arcs[:, 1], kind="stable").astype(np.int32)
    starts_r = np.searchsorted(arcs[by_r, 1], np.arange(R)).astype(np.int32)
    h.addRows(R, np.zeros(R), room.astype(np.float64), A, starts_r, by_r, np.ones(A))
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise SplitError(f"HiGHS: integral rounding LP ended {h.modelStatusToString(h.getModelStatus())}")
    flow = np.rint(np.asarray(h.getSolution().col_value)).astype(np.int64)
    shipped = np.bincount(arcs[:, 0], flow, minlength=N).astype(np.int64)
    used = np.bincount(arcs[:, 1], flow, minlength=R).astype(np.int64)
    if (flow < 0).any() or (used > room).any() or (shipped > supply).any():
        raise SplitError("HiGHS: integral rounding LP returned a non-integral vertex")
    return flow if np.array_equal(shipped, supply) else None


def _flow_round(pl: Placement, layer: int, units: torch.Tensor, level: int) -> torch.Tensor | None:
    """Integer units per copy of one layer with every rank <= ``level``, or None if none exists.

    Each replicated expert ships its units to the ranks holding its copies, each rank taking
    at most ``level`` minus its fixed (single-copy) load (``_transport``); a rank's amount goes
    to the expert's copies on it as evenly as possible, lower slot first.
    """
    R, S = pl.num_ranks, pl.slots_per_rank
    p2l = pl.phy2log[layer].cpu().numpy()
    u = units.cpu().numpy().astype(np.int64)
    rep = pl.replicated_slot[layer].cpu().numpy()
    rank = np.arange(p2l.size) // S
    fixed = np.bincount(rank[~rep], u[p2l[~rep]], minlength=R).astype(np.int64)
    if (fixed > level).any():
        return None
    experts = np.unique(p2l[rep])
    q = np.where(rep, 0, u[p2l])
    if experts.size == 0:
        return torch.from_numpy(q.astype(np.int64)).to(units.device)
    pairs = np.unique(np.stack([p2l[rep], rank[rep]], 1), axis=0)  # (expert, rank) with a copy
    node = np.searchsorted(experts, pairs[:, 0])
    flow = _transport(u[experts], np.stack([node, pairs[:, 1]], 1), level - fixed)
    if flow is None:
        return None
    for (e, r), f in zip(pairs.tolist(), flow.tolist()):
        slots = np.flatnonzero(rep & (p2l == e) & (rank == r))
        base, extra = divmod(f, slots.size)
        q[slots] = base + (np.arange(slots.size) < extra)
    return torch.from_numpy(q.astype(np.int64)).to(units.device)


def _as_given(pl: Placement, t: torch.Tensor) -> torch.Tensor:
    """``[L, ...]`` -> the shape the placement's public functions take (``[...]`` for one layer)."""
    return t[0] if pl.single_layer else t


class FloatSteps:
    """The core's steps: exact float64 split (fast solver, HiGHS for what it cannot certify),
    largest remainder + polish, then an integral transportation LP where the rounding is not optimal,
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


def max_layer_tokens(pl: Placement, tile: int = 1) -> int:
    """The most tokens one layer may carry for ``balanced_quotas`` to be exact: float64's
    integers for the split, and with tiles ``fill_tiles``' int64 score (a rank load times P + 1)."""
    if tile == 1:
        return EXACT_TOKENS
    return min(EXACT_TOKENS, ((1 << 62) // (pl.num_physical + 1)))


def split_step(pl: Placement, c: torch.Tensor, tile: int, steps: SplitSteps) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain's split step: ``balanced_quotas`` without checks, ``c [L, E]`` long ->
    (quotas ``[L, P]`` long, certified ``[L]`` bool); ``tile`` 1 is the token objective."""
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
    tile = _tile_of(cost, tile_tokens)
    c = pl.check_counts(counts, "counts", max_total=max_layer_tokens(pl, tile))
    if c.dtype.is_floating_point and not torch.equal(torch.floor(c), c):
        raise ValueError("counts must be whole numbers of tokens")
    q, cert = split_step(pl, c.to(torch.long), tile, steps)
    q = q[0] if pl.single_layer else q
    if return_certified:
        return q, (cert[0] if pl.single_layer else cert)
    return q
