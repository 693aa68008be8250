"""The exact LPLB split: tokens per physical copy that minimise the busiest rank's load.

For one layer, with ``c[e]`` tokens routed to logical expert ``e`` (math.md)::

    minimise M  s.t.  sum_{p in copies(e)} x_p = c[e],   sum_{p on rank r} x_p <= M,   x >= 0

Two solvers of the same problem:

* ``method="fast"`` (hot path, no LP library): block-coordinate descent on
  ``sum_r load_r^2``. One block is one replicated expert, minimised exactly by
  water-filling its tokens into the ranks of its copies. The lexicographically most
  balanced load vector minimises every symmetric convex function of the loads
  (Fujishige), so the descent's limit also minimises the max load. Experts of one
  colour (no shared rank) are updated together, all layers in one tensor op. Each
  sweep ends with an optimality certificate: the densest "top-k ranks by load" set
  gives a lower bound, and we stop once the max load is within ``tol`` of it.
  Layers that do not certify within ``max_sweeps`` are re-solved with HiGHS.
* ``method="highs"``: the LP itself in HiGHS. The test oracle.

(Rebalance-time decisions are dispatch plans, ``plan.py``: which copies are active per
batch-size level, in the cost model's time rather than in tokens.)
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch

from .placement import EXACT_TOKENS, Placement

__all__ = [
    "solve_split",
    "even_split",
    "even_fractions",
    "lower_bound",
    "fractions_to_split",
    "new_highs",
    "SplitError",
]

logger = logging.getLogger(__name__)

_warned: set[str] = set()


class SplitError(RuntimeError):
    """A solve that produced no usable split (solver failure, NaN)."""


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


# ---------------------------------------------------------------------------------------------
# Small helpers shared by both solvers
# ---------------------------------------------------------------------------------------------
def even_fractions(pl: Placement) -> torch.Tensor:
    """The even split table: every copy gets ``1 / copies`` of its expert. ``[L, P]`` float64.

    It is also what a split table starts as before any window has been solved."""
    return 1.0 / pl.num_copies.gather(1, pl.phy2log).to(torch.float64)


def even_split(pl: Placement, counts: torch.Tensor) -> torch.Tensor:
    """Each expert's tokens shared equally by its copies.

    Args:
        counts: ``[L, E]`` tokens per logical expert.
    Returns:
        ``[L, P]`` float64 tokens per physical slot.
    """
    c = counts.to(torch.float64)
    x = c.gather(1, pl.phy2log) * even_fractions(pl)
    return _conserve(x, pl, c) if pl.has_replicas else x  # c/n summed n times need not equal c


def _fixed_rank_load(pl: Placement, c_slot: torch.Tensor) -> torch.Tensor:
    """Load each rank must carry from single-copy experts: ``[L, P] -> [L, R]``."""
    return pl.rank_loads(torch.where(pl.replicated_slot, torch.zeros_like(c_slot), c_slot))


def lower_bound(pl: Placement, counts: torch.Tensor, rank_load: torch.Tensor) -> torch.Tensor:
    """A certified lower bound on the optimal max load, tight at the optimum.

    For any rank set ``S``, ``(fixed load in S + tokens of experts with every copy in S) / |S|``
    bounds every dispatch from below. We evaluate it for the prefixes of the ranks sorted by
    ``rank_load`` (descending); at the optimum the busiest level set is such a prefix.

    Args:
        counts: ``[L, E]``; rank_load: ``[L, R]`` loads of any feasible split.
    Returns:
        ``[L]`` float64.
    """
    L, R = rank_load.shape
    c = counts.to(torch.float64)
    fixed = _fixed_rank_load(pl, even_split(pl, c))
    order = torch.argsort(rank_load, dim=1, descending=True, stable=True)
    pos = torch.empty_like(order).scatter_(1, order, torch.arange(R, device=order.device).expand(L, R))
    blocks = pl.replica_blocks
    contained = torch.zeros(L, R, dtype=torch.float64, device=c.device)
    if blocks.layer.numel():
        pos_ext = torch.cat([pos.reshape(-1), pos.new_full((1,), -1)])  # padding -> dummy rank -> -1
        last = pos_ext[blocks.flat_rank].max(1).values  # the expert is inside prefix k iff last < k
        contained.index_put_((blocks.layer, last), c[blocks.layer, blocks.expert], accumulate=True)
    dens = (torch.cumsum(fixed.gather(1, order), 1) + torch.cumsum(contained, 1)) / torch.arange(
        1, R + 1, device=c.device, dtype=torch.float64
    )
    return dens.max(1).values


def _conserve(x: torch.Tensor, pl: Placement, c: torch.Tensor) -> torch.Tensor:
    """Make every expert's copies sum to its count exactly, in float64.

    Values are snapped to a per-layer dyadic grid ``2^(e - 46)`` with ``max c < 2^e``: then
    every partial sum of an expert's copies is exact in float64 whatever the summation order,
    and the rounding residual (a grid multiple) can go to the expert's largest copy exactly.
    The snap moves each value by at most ~1e-14 of the layer's largest count.
    Args: x ``[L, P]`` float64, c ``[L, E]`` float64. Returns ``[L, P]``.
    """
    cmax = c.amax(1, keepdim=True).clamp(min=1.0)
    grid = torch.exp2(torch.floor(torch.log2(cmax)) + 1 - 46)
    x = torch.round(x.clamp(min=0.0) / grid) * grid
    tot = torch.zeros_like(c).scatter_add_(1, pl.phy2log, x)
    resid = c - tot
    # Largest copy of each expert (ties: lowest slot): the earliest in a stable descending sort.
    by_x = torch.argsort(x, dim=1, descending=True, stable=True)
    grouped = by_x.gather(1, torch.argsort(pl.phy2log.gather(1, by_x), dim=1, stable=True))
    largest = grouped.gather(1, pl.copy_start)  # [L, E] first slot of each expert's group
    x.scatter_add_(1, largest, resid)
    return x


# ---------------------------------------------------------------------------------------------
# Fast exact solver (block-coordinate water-filling)
# ---------------------------------------------------------------------------------------------
def _waterfill_blocks(x_ext: torch.Tensor, load_ext: torch.Tensor, c_blk: torch.Tensor, colour: tuple) -> None:
    """One exact block step for every (layer, expert) of a colour, in place.

    ``x_ext [L*P + 1]`` tokens per slot and ``load_ext [L*R + 1]`` rank loads (last entry:
    the padding dummy), ``c_blk [n]`` tokens of each block's expert. Each expert's tokens
    are re-poured onto its copy ranks, lowest level first; copies on one rank share it.
    """
    _, _, slot, rank, same, pad_big, inv_mult, first = colour
    own_rank = (same * x_ext[slot][:, None, :]).sum(-1)  # this expert's load on each copy's rank
    base = load_ext[rank] - own_rank  # level of the rank without this expert
    bs = torch.sort(base + pad_big, dim=1).values
    k = torch.arange(1, bs.shape[1] + 1, device=bs.device, dtype=bs.dtype)
    # Water level = min_k (c + sum of the k lowest bases) / k; padded terms are ~1e300 and lose.
    level = ((c_blk[:, None] + torch.cumsum(bs, 1)) / k).min(1).values
    new_rank_amt = (level[:, None] - base).clamp_(min=0.0)
    load_ext.index_add_(0, rank.reshape(-1), ((new_rank_amt - own_rank) * first).reshape(-1))
    x_ext[slot.reshape(-1)] = (new_rank_amt * inv_mult).reshape(-1)
    x_ext[-1] = 0.0


def _solve_fast(
    pl: Placement, c: torch.Tensor, tol: float, max_sweeps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-coordinate descent; returns (x ``[L, P]``, certified ``[L]`` bool)."""
    L, P, R = pl.num_layers, pl.num_physical, pl.num_ranks
    x = even_split(pl, c)
    blocks = pl.replica_blocks
    if not blocks.colours:
        return x, torch.ones(L, dtype=torch.bool, device=c.device)
    zero = torch.zeros(1, dtype=torch.float64, device=c.device)
    x_ext = torch.cat([x.reshape(-1), zero])
    load_ext = torch.cat([pl.rank_loads(x).reshape(-1), zero])
    c_blocks = [c[col[0], col[1]] for col in blocks.colours]
    certified = torch.zeros(L, dtype=torch.bool, device=c.device)
    for _ in range(max_sweeps):
        # A layer certified in an earlier sweep keeps that split: every layer then gets what it
        # would get solved alone (layers never interact), so callers may batch independent layers.
        frozen = bool(certified.any())
        if frozen:
            keep_x, keep_load = x_ext[:-1].reshape(L, P)[certified], load_ext[:-1].reshape(L, R)[certified]
        for colour, c_blk in zip(blocks.colours, c_blocks):
            _waterfill_blocks(x_ext, load_ext, c_blk, colour)
        if frozen:
            x_ext[:-1].reshape(L, P)[certified] = keep_x
            load_ext[:-1].reshape(L, R)[certified] = keep_load
        load = load_ext[:-1].reshape(L, R)
        m = load.max(1).values
        lb = lower_bound(pl, c, load)
        certified = certified | (m - lb <= tol * m.clamp(min=1.0))
        if bool(certified.all()):
            break
    return _conserve(x_ext[:-1].reshape(L, P), pl, c), certified


# ---------------------------------------------------------------------------------------------
# HiGHS
# ---------------------------------------------------------------------------------------------
_banner_shown = False


def new_highs():
    import highspy

    global _banner_shown
    import threading

    # Only the main thread may borrow fd 1; elsewhere (e.g. a rebalance thread) let it print.
    if not _banner_shown and threading.current_thread() is threading.main_thread():
        # HiGHS prints a copyright banner to fd 1 on its first construction, before any option
        # can be set; keep it out of CLI tables and server logs.
        _banner_shown = True
        import os
        import sys

        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                h = highspy.Highs()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
    else:
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # No "threads" option: HiGHS keeps one process-wide scheduler, and a Highs object asking
    # for a different thread count than the first one fails its run with status "Not Set".
    return h


def _highs_layer(phy2log: np.ndarray, replicated: np.ndarray, fixed: np.ndarray, c: np.ndarray, S: int) -> np.ndarray:
    """Solve one layer's min-max LP in HiGHS.

    Args: phy2log ``[P]``, replicated ``[P]`` bool, fixed ``[R]`` fixed rank loads,
    c ``[E]`` float64 counts, S slots per rank. Returns x ``[P]`` float64.
    """
    import highspy

    R = fixed.shape[0]
    x = np.where(replicated, 0.0, c[phy2log])
    var_slots = np.nonzero(replicated)[0]
    if var_slots.size == 0:
        return x
    nv = var_slots.size
    h = new_highs()
    inf = highspy.kHighsInf
    # Columns: x for each replicated slot, then M.
    h.addVars(nv + 1, np.zeros(nv + 1), np.full(nv + 1, inf))
    cost = np.zeros(nv + 1)
    cost[-1] = 1.0
    h.changeColsCost(nv + 1, np.arange(nv + 1, dtype=np.int32), cost)
    # Rows 1: conservation per replicated expert.
    experts, col_expert = np.unique(phy2log[var_slots], return_inverse=True)
    rows_e = [np.nonzero(col_expert == i)[0] for i in range(experts.size)]
    starts = np.cumsum([0] + [r.size for r in rows_e[:-1]]).astype(np.int32)
    idx = np.concatenate(rows_e).astype(np.int32)
    h.addRows(experts.size, c[experts], c[experts], idx.size, starts, idx, np.ones(idx.size))
    # Rows 2: load of rank r minus M <= -fixed[r].
    ranks = var_slots // S
    idx_r, starts_r = [], []
    for r in range(R):
        starts_r.append(sum(len(v) for v in idx_r))
        idx_r.append(np.concatenate([np.nonzero(ranks == r)[0], [nv]]))
    idx_r_flat = np.concatenate(idx_r).astype(np.int32)
    val_r = np.concatenate([np.r_[np.ones(len(v) - 1), -1.0] for v in idx_r])
    h.addRows(R, np.full(R, -inf), -fixed, idx_r_flat.size, np.array(starts_r, dtype=np.int32), idx_r_flat, val_r)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise SplitError(f"HiGHS returned {h.modelStatusToString(h.getModelStatus())}")
    sol = np.asarray(h.getSolution().col_value, dtype=np.float64)
    if not np.all(np.isfinite(sol)):
        raise SplitError("HiGHS returned a non-finite solution")
    x[var_slots] = sol[:nv]
    return x


def _solve_highs(pl: Placement, c: torch.Tensor, layers: list[int] | None = None) -> torch.Tensor:
    x = even_split(pl, c)
    fixed = _fixed_rank_load(pl, x).cpu().numpy()
    p2l = pl.phy2log.cpu().numpy()
    rep = pl.replicated_slot.cpu().numpy()
    cn = c.cpu().numpy()
    out = x.cpu().numpy().copy()
    for layer in range(pl.num_layers) if layers is None else layers:
        out[layer] = _highs_layer(p2l[layer], rep[layer], fixed[layer], cn[layer], pl.slots_per_rank)
    return _conserve(torch.from_numpy(out).to(c.device), pl, c)


# ---------------------------------------------------------------------------------------------
# Public entry
# ---------------------------------------------------------------------------------------------
def solve_split(
    pl: Placement,
    logical_counts: torch.Tensor,
    method: Literal["fast", "highs"] = "fast",
    *,
    tol: float = 1e-9,
    max_sweeps: int = 200,
) -> torch.Tensor:
    """Tokens per physical slot that minimise the max rank load.

    Args:
        pl: the placement.
        logical_counts: ``[E]`` (single-layer placement) or ``[L, E]`` tokens per logical expert.
        method: ``"fast"`` (block-coordinate water-filling with a certificate; uncertified
            layers go to HiGHS) or ``"highs"``.
        tol: relative optimality gap at which ``fast`` stops.
        max_sweeps: sweep cap for ``fast``.
    Returns:
        float64 ``[P]`` or ``[L, P]``: tokens per physical slot. Every expert's copies sum
        exactly to its count. A failed solve falls back to the even split with one warning.
    """
    c = pl.check_counts(logical_counts, max_total=EXACT_TOKENS).to(torch.float64)
    if method not in ("fast", "highs"):
        raise ValueError(f"method must be 'fast' or 'highs', got {method!r}")
    try:
        if not pl.has_replicas:
            x = even_split(pl, c)  # no replicas: the static mapping, nothing to solve
        elif method == "fast":
            x, ok = _solve_fast(pl, c, tol, max_sweeps)
            if not bool(ok.all()):
                bad = (~ok).nonzero().flatten().tolist()
                logger.debug("fast split did not certify layers %s; using HiGHS for them", bad)
                xh = _solve_highs(pl, c, bad)
                x[bad] = xh[bad]
        else:
            x = _solve_highs(pl, c)
        if not bool(torch.isfinite(x).all()):
            raise SplitError("split has non-finite entries")
    except (SplitError, ImportError) as err:
        _warn_once(f"{method}:{type(err).__name__}", f"LPLB {method} split failed ({err}); using the even split")
        x = even_split(pl, c)
    return x[0] if pl.single_layer else x


def fractions_to_split(pl: Placement, fractions: torch.Tensor, logical_counts: torch.Tensor) -> torch.Tensor:
    """Apply a split table (share of each expert's tokens per copy) to this batch's counts.

    Args: fractions ``[P]``/``[L, P]`` (each expert's copies sum to 1), logical_counts ``[E]``/``[L, E]``.
    Returns: float64 tokens per slot, same leading shape.
    """
    c = pl.check_counts(logical_counts, max_total=EXACT_TOKENS).to(torch.float64)
    if not isinstance(fractions, torch.Tensor) or fractions.numel() != pl.num_layers * pl.num_physical:
        raise ValueError(
            f"fractions must be [{pl.num_physical}] or [{pl.num_layers}, {pl.num_physical}] for this placement, "
            f"got {list(getattr(fractions, 'shape', []))}"
        )
    f = fractions.reshape(pl.num_layers, pl.num_physical).to(torch.float64)
    if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
        raise ValueError("fractions must be finite and non-negative")
    x = _conserve(f * c.gather(1, pl.phy2log), pl, c)
    return x[0] if pl.single_layer else x
