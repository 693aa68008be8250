"""Dispatch plans: which copies of each expert serve its tokens, per batch-size level.

A plan is solved off the forward path (at each EPLB rebalance, and refreshed from recent
statistics in between) and applied per batch by the same gather SGLang's static dispatch
runs: a fixed map from (logical expert, hash slot) to a physical copy. Nothing is counted
or solved per batch.

Shapes: ``B`` levels, ``L`` layers, ``E`` logical experts, ``P`` physical slots on ``R``
ranks (``S = P / R`` each), ``W`` hash slots (a power of two), ``k`` routed experts per token.

**What a plan is.** For each level (a batch size in tokens per rank) and layer, every copy
``p`` of expert ``e`` owns ``w_p`` of the ``W`` hash slots, ``sum_p w_p = W``. An entry
``(row, j)`` of ``topk_ids`` routed to ``e`` goes to the copy owning hash slot
``hash(row, j) & (W - 1)`` (``hash_offsets``, fixed at start-up): ``plan_map[e, hash]``,
one gather (``apply_plan``). A copy with ``w_p = 0`` is switched off.

**The model it is solved on.** At ``n`` tokens per rank a batch has ``N = n R`` tokens. From
the window, expert ``e`` receives a share ``s_e`` of the routed entries, so a token includes
it with probability ``pi_e = min(1, k s_e)``, and copy ``p`` receives
``X_p ~ Binomial(N, pi_e w_p / W)`` tokens. Under ``cost.CostModel`` a copy costs one
weight read when it has any token (probability ``a_p = 1 - (1 - pi_e w_p / W)^N``: rare
experts at small levels count only by how often they show up) and ``E[ceil(X_p / tile)]``
tiles. A rank's expected time is the roofline on those expectations::

    t_r = max(read_us * sum_{p on r} a_p,  tile_us * sum_{p on r} E[tiles_p])

The plan minimises the busiest rank's expected time. ``objective="max"`` minimises
``max_r t_r`` itself; ``objective="soft"`` (the default) minimises its smooth upper bound
``LSE_beta(t) = log(sum_r exp(beta t_r)) / beta`` with ``beta`` set from the spread of the
rank times at that level, so that a decision also weighs how likely each rank is to be the
busiest in a real batch (at decode, splitting a rare expert over two tied ranks lowers
``max_r t_r`` but raises the expected maximum: the soft objective keeps it on one copy).

**How.** ``method="fast"`` (the default, deterministic, no LP): replicated experts, hottest
first, each pick the best of a few weightings (all on one copy; a water-filled split over the
``j`` least busy of its copies, ``j = 2..copies``), then block-coordinate sweeps re-choose each
expert against all others (never worse). ``method="milp"``: the exact min-max plan as a HiGHS
MILP (multiple choice of ``w_p`` per copy; ``objective="max"`` only), with a time limit.
``plan_lower_bound`` is the HiGHS LP relaxation of that MILP: a certified lower bound on the
best ``max_r t_r`` any plan on the placement can reach, so every plan's gap is known.

Deterministic: the same placement, window, cost model and levels give bit-identical plans on
every rank (integer weights, fixed iteration order, ties to the lower option).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .cost import CostModel
from .lp_split import new_highs
from .placement import Placement

__all__ = [
    "plan_cadence",
    "DEFAULT_LEVELS",
    "DEFAULT_HASH_SLOTS",
    "PlanError",
    "LayerPlan",
    "PlanSet",
    "window_shares",
    "copy_costs",
    "solve_layer_plan",
    "solve_plans",
    "solve_rows",
    "plan_lower_bound",
    "expected_rank_times",
    "plan_maps",
    "hash_offsets",
    "apply_plan",
    "level_index",
    "static_like_weights",
]

# Batch-size levels (tokens per rank) a plan is solved for: powers of two up to a prefill chunk.
DEFAULT_LEVELS: tuple[int, ...] = tuple(2**i for i in range(13))  # 1 .. 4096
DEFAULT_HASH_SLOTS = 16
_SWEEPS = 3  # block-coordinate sweeps after the greedy (the objective stops moving after 2 on the corpora)
_NEAR = 1e-3  # the max objective treats options this close (relative) as tied
_SOFT_KAPPA = 1.0  # beta = kappa / (spread of a rank's time); 0.5-2 give the same plans on the corpora


def plan_cadence(rebalance_every: int, refresh: int | None = None, window: int | None = None) -> tuple[int, int]:
    """(refresh, window) in forward passes (replay: steps), defaults resolved; the plugin and
    ``replay`` both use this. Default refresh: a quarter of the EPLB interval (0: plans only at
    start-up and rebalances; docs/design.md measured the cadence). Default window: the refresh
    interval (a plan solved from the passes since the last one), at least 1."""
    r = refresh if refresh is not None else max(0, int(rebalance_every)) // 4
    return r, window if window is not None else max(1, r)


class PlanError(ValueError):
    """Inputs a plan cannot be solved from (bad window, levels, hash slots, or a failed MILP)."""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def window_shares(window: torch.Tensor, num_layers: int, num_logical: int) -> torch.Tensor:
    """Share of routed entries per expert: ``[T, L, E]`` or ``[L, E]`` counts -> float64 ``[L, E]``.

    Each row sums to 1; a layer with no recorded entry gets the uniform share."""
    if not isinstance(window, torch.Tensor):
        raise PlanError(f"window must be a torch.Tensor of counts, got {type(window).__name__}")
    w = window.detach().to("cpu")
    if w.dim() == 3:
        w = w.to(torch.float64).sum(0)
    if tuple(w.shape) != (num_layers, num_logical):
        raise PlanError(f"window must be [steps, {num_layers}, {num_logical}] or [{num_layers}, {num_logical}] "
                        f"counts, got {list(window.shape)}")
    w = w.to(torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise PlanError("window counts must be finite and >= 0")
    tot = w.sum(-1, keepdim=True)
    return torch.where(tot > 0, w / torch.where(tot > 0, tot, 1.0), 1.0 / num_logical)


def _check_levels(levels) -> tuple[int, ...]:
    lv = tuple(int(n) for n in levels)
    if not lv or any(n < 1 for n in lv) or list(lv) != sorted(set(lv)):
        raise PlanError(f"levels must be increasing positive tokens-per-rank values, got {list(levels)}")
    return lv


def _check_hash_slots(W: int) -> int:
    if not isinstance(W, int) or isinstance(W, bool) or W < 1 or W & (W - 1) or W > 1024:
        raise PlanError(f"hash_slots must be a power of two in [1, 1024], got {W!r}")
    return W


# ---------------------------------------------------------------------------------------------
# Per-copy expected costs
# ---------------------------------------------------------------------------------------------
def copy_costs(pi: np.ndarray, batch_tokens: np.ndarray, W: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected activation and tiles of one copy owning ``w`` of ``W`` hash slots.

    Args: pi ``[E]`` inclusion probability per token, batch_tokens ``[B]`` (``N``), W, tile.
    Returns: ``(act, tiles)``, float64 ``[B, E, W + 1]``: ``P(X > 0)`` and ``E[ceil(X / tile)]`` for
    ``X ~ Binomial(N, pi w / W)``, ``w = 0..W``. Activation is exact. Tiles equal the activation
    where a copy cannot exceed one tile (``N <= tile``) or its mean is below a quarter tile (its
    chance of a second tile is then under 3e-4, and negligible for 64- or 128-token tiles);
    elsewhere ``sum_{j >= 1} P(X > j tile)`` is added with a continuity-corrected normal tail
    over the ten tile boundaries around the mean, or ``mean / tile + 1/2`` once the spread
    exceeds half a tile (the remainder is then uniform to within 1%).
    """
    N = np.asarray(batch_tokens, dtype=np.float64)[:, None, None]
    p = np.clip(np.asarray(pi, dtype=np.float64)[None, :, None] * (np.arange(W + 1) / W)[None, None, :], 0.0, 1.0)
    with np.errstate(divide="ignore"):
        act = np.where(p >= 1.0, 1.0, -np.expm1(N * np.log1p(-np.minimum(p, 1.0 - 1e-16))))
    N = np.broadcast_to(N, (N.shape[0],) + p.shape[1:])
    p = np.broadcast_to(p, N.shape)
    mu = N * p
    tiles = act.copy()
    big = (mu > tile / 4.0) & (N > tile)
    if big.any():
        m = mu[big] / tile
        s = np.sqrt(mu[big] * (1.0 - p[big])) / tile
        j = np.maximum(1.0, np.floor(m) - 4.0)[:, None] + np.arange(10.0)[None, :]
        z = (j - m[:, None] + 0.5 / tile) / np.maximum(s[:, None], 1e-12)
        tail = np.where(s[:, None] > 0, 0.5 * _erfc(z / math.sqrt(2.0)), (j < m[:, None]).astype(np.float64))
        near = act[big] + (j[:, 0] - 1.0) + tail.sum(1)
        tiles[big] = np.where(s > 0.5, m + 0.5, near)
    return act, np.maximum(tiles, act)


def _erfc(x: np.ndarray) -> np.ndarray:
    return torch.special.erfc(torch.from_numpy(np.ascontiguousarray(x))).numpy()


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """What the solver needs of one layer's placement, in numpy."""

    R: int
    S: int
    phy2log: np.ndarray  # [P]
    rank: np.ndarray  # [P]
    rep: list  # replicated experts, hottest first: (e, slots [m], unique ranks [U], to_unique [m, U], first [U])
    single_slots: np.ndarray  # slots of single-copy experts


def _layer(pl: Placement, shares: np.ndarray) -> _Layer:
    p2l = pl.phy2log[0].cpu().numpy()
    R, S = pl.num_ranks, pl.slots_per_rank
    rank = np.arange(p2l.size) // S
    copies: dict[int, list[int]] = {}
    for p, e in enumerate(p2l.tolist()):
        copies.setdefault(e, []).append(p)
    rep = []
    for e in sorted((e for e, s in copies.items() if len(s) > 1), key=lambda e: (-shares[e], e)):
        slots = np.array(copies[e])
        r = rank[slots]
        uniq, first = np.unique(r, return_index=True)  # first: each rank's first copy (in slots)
        to_u = (r[:, None] == uniq[None, :]).astype(np.float64)
        rep.append((e, slots, uniq, to_u, first))
    single = np.array([s[0] for e, s in sorted(copies.items()) if len(s) == 1], dtype=np.int64)
    return _Layer(R, S, p2l, rank, rep, single)


def _times(A: np.ndarray, T: np.ndarray, read: float, tu: float) -> np.ndarray:
    return np.maximum(read * A, tu * T)


def _options(cur: np.ndarray | None, t_rank: np.ndarray, unit_us: np.ndarray, W: int) -> np.ndarray:
    """Candidate weightings of one expert over the ``U`` ranks holding its copies: ``[B, O, U]`` int.

    The current weights (when placed, so a sweep never gets worse); all W units on each rank;
    and for j = 2..U a water-fill of W units over the j least busy ranks (``t_rank [B, U]`` µs
    now; one unit adds ``unit_us [B]`` µs anywhere), rounded by largest remainder. A rank's
    share goes to one of its copies: splitting inside a rank only adds reads and tiles."""
    B, U = t_rank.shape
    opts = [] if cur is None else [cur[:, None, :]]
    opts.append(np.broadcast_to(np.eye(U, dtype=np.int64)[None] * W, (B, U, U)))
    if U > 1:
        order = np.argsort(t_rank, axis=1, kind="stable")
        b = np.take_along_axis(t_rank, order, 1)  # [B, U] ascending
        u = np.maximum(unit_us, 1e-12)[:, None]
        h = (W * u + np.cumsum(b, 1)) / np.arange(1, U + 1)  # level with the first j ranks filled
        jstar = (h >= b).sum(1)  # ranks the unrestricted fill reaches (a prefix of the order)
        jj = np.minimum(np.arange(2, U + 1)[None, :], jstar[:, None])  # [B, J]
        level = np.take_along_axis(h, jj - 1, 1)
        x = np.clip(level[:, :, None] - b[:, None, :], 0.0, None) / u[:, :, None]  # [B, J, U]
        x = np.where(np.arange(U)[None, None, :] < jj[:, :, None], x, 0.0)
        x = x * (W / np.maximum(x.sum(2, keepdims=True), 1e-300))
        fl = np.floor(x + 1e-9)
        short = W - fl.sum(2, keepdims=True)
        place = np.argsort(np.argsort(fl - x, axis=2, kind="stable"), axis=2, kind="stable")
        units = (fl + (place < short)).astype(np.int64)  # [B, J, U] in sorted order
        split = np.empty_like(units)
        np.put_along_axis(split, np.broadcast_to(order[:, None, :], units.shape), units, 2)
        opts.append(split)
    return np.concatenate(opts, 1)


def _beta(t: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Soft-max temperature per level ``[B, 1]``: kappa / the RMS spread of a rank's time
    (``t``, ``var``: ``[B, R]`` µs and µs^2), no sharper than 2% of the mean time."""
    spread = np.maximum(np.sqrt(var.mean(1)), 0.02 * np.maximum(t.mean(1), 1e-9))
    return (_SOFT_KAPPA / spread)[:, None]


def solve_layer_plan(
    pl: Placement,
    shares: torch.Tensor,
    cost: CostModel,
    *,
    top_k: int,
    levels=DEFAULT_LEVELS,
    hash_slots: int = DEFAULT_HASH_SLOTS,
    objective: str = "soft",
    method: str = "fast",
    time_limit: float | None = 10.0,
) -> "LayerPlan":
    """One layer's plans at every level.

    Args:
        pl: single-layer placement.
        shares: ``[E]`` share of routed entries per expert (``window_shares``).
        cost: the cost model (weight read, tile time, tile size).
        top_k: routed experts per token.
        levels: tokens per rank of each plan (increasing).
        hash_slots: W, a power of two.
        objective: ``soft`` (default) or ``max`` (module docstring).
        method: ``fast`` (default) or ``milp`` (HiGHS, objective ``max``, ``time_limit`` seconds per level).
    Returns:
        ``LayerPlan``.
    """
    if not pl.single_layer:
        raise PlanError(f"solve_layer_plan needs a single-layer placement, got {pl}")
    lv = _check_levels(levels)
    W = _check_hash_slots(hash_slots)
    if objective not in ("soft", "max"):
        raise PlanError(f"objective must be soft or max, got {objective!r}")
    if method not in ("fast", "milp"):
        raise PlanError(f"method must be fast or milp, got {method!r}")
    if method == "milp" and objective != "max":
        raise PlanError("method milp solves the max objective only (objective='max')")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= pl.num_logical:
        raise PlanError(f"top_k must be an int in [1, {pl.num_logical}], got {top_k!r}")
    lay, act, til, mu = _level_costs(pl, shares, cost, top_k, lv, W)
    if method == "milp":
        weights = np.stack([_milp_level(lay, act[b], til[b], cost, W, time_limit) for b in range(len(lv))])
    else:
        weights, beta = _fast(lay, act, til, mu, cost, W, objective)
        # Never worse than using every copy evenly (SGLang's use of the replicas), by the objective.
        even = np.broadcast_to(_even(lay, W), weights.shape)
        t_fast = expected_rank_times_np(lay, weights, act, til, cost)
        t_even = expected_rank_times_np(lay, even, act, til, cost)
        worse = _score(t_even, beta) < _score(t_fast, beta)
        weights = np.where(worse[:, None], even, weights)
    exp_t = expected_rank_times_np(lay, weights, act, til, cost)
    return LayerPlan(lv, W, torch.from_numpy(weights), torch.from_numpy(exp_t.max(1)))


def _score(t: np.ndarray, beta: np.ndarray | None) -> np.ndarray:
    """``[B]`` the objective of rank times ``t [B, R]``: max, or the soft maximum at ``beta [B, 1]``."""
    if beta is None:
        return t.max(1)
    top = t.max(1, keepdims=True)
    return (top + np.log(np.exp(beta * (t - top)).sum(1, keepdims=True)) / beta)[:, 0]


def _fast(lay: _Layer, act: np.ndarray, til: np.ndarray, mu: np.ndarray, cost: CostModel, W: int,
          objective: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Greedy, hottest replicated expert first, block-coordinate sweeps, then augmenting chains:
    (``[B, P]`` int weights, the soft objective's ``beta [B, 1]`` or None)."""
    B = act.shape[0]
    R, P = lay.R, lay.phy2log.size
    read, tu, tile = cost.weight_read_us, cost.tile_us, cost.tile_tokens
    rows = np.arange(B)
    weights = np.zeros((B, P), dtype=np.int64)
    weights[:, lay.single_slots] = W
    A = np.zeros((B, R))
    T = np.zeros((B, R))
    s_e, s_r = lay.phy2log[lay.single_slots], lay.rank[lay.single_slots]
    np.add.at(A.T, s_r, act[:, s_e, W].T)
    np.add.at(T.T, s_r, til[:, s_e, W].T)
    beta = None
    if objective == "soft":
        # Temperature from the spread of rank times with every replica evenly used (the static-like state).
        ev = expected_rank_times_np(lay, np.broadcast_to(_even(lay, W), (B, P)), act, til, cost)
        a_c = np.take_along_axis(act.reshape(B, -1), lay.phy2log[None, :] * (W + 1) + _even(lay, W)[None, :], 1)
        mu_c = mu[:, lay.phy2log] * _even(lay, W)[None, :] / W
        vA = np.zeros((B, R))
        vT = np.zeros((B, R))
        np.add.at(vA.T, lay.rank, (a_c * (1 - a_c)).T)
        np.add.at(vT.T, lay.rank, (mu_c / (tile * tile) + a_c / 12.0).T)
        A_ev = np.zeros((B, R))
        np.add.at(A_ev.T, lay.rank, a_c.T)
        read_bound = read * A_ev >= ev - 1e-12
        beta = _beta(ev, np.where(read_bound, read * read * vA, tu * tu * vT))
    for sweep in range(_SWEEPS + 1):
        changed = False
        for e, slots, uniq, to_u, first in lay.rep:
            cur = weights[:, slots]
            if sweep:  # take the expert off its ranks
                A[:, uniq] -= act[:, e][rows[:, None], cur] @ to_u
                T[:, uniq] -= til[:, e][rows[:, None], cur] @ to_u
            t_now = _times(A[:, uniq], T[:, uniq], read, tu)
            cur_u = cur[:, first] if sweep else None  # a rank's share sits on its first copy
            opts_u = _options(cur_u, t_now, tu * til[:, e, W] / W, W)  # [B, O, U]
            opts = np.zeros(opts_u.shape[:2] + (len(slots),), dtype=np.int64)
            opts[:, :, first] = opts_u
            dA = act[:, e][rows[:, None, None], opts] @ to_u  # [B, O, U]
            dT = til[:, e][rows[:, None, None], opts] @ to_u
            t_new = _times(A[:, None, uniq] + dA, T[:, None, uniq] + dT, read, tu)  # [B, O, U]
            if beta is not None:
                top = t_new.max((1, 2))[:, None, None]
                best = _argmin_first(np.exp(beta[:, :, None] * (t_new - top)).sum(2))
            else:
                mx = t_new.max(2)
                ok = mx <= mx.min(1, keepdims=True) * (1 + _NEAR)  # near-ties: the lower sum of squares
                best = _argmin_first(np.where(ok, (t_new * t_new).sum(2), np.inf))
            choice = opts[rows, best]
            if sweep and not np.array_equal(choice, cur):
                changed = True
            weights[:, slots] = choice
            A[:, uniq] += dA[rows, best]
            T[:, uniq] += dT[rows, best]
        if sweep and not changed:
            break
    for b in range(B):
        _augment(lay, weights[b], A[b], T[b], act[b], til[b], read, tu, W)
    return weights, beta


_MAX_PATH = 6  # switches in one augmenting chain


def _augment(lay: _Layer, w: np.ndarray, A: np.ndarray, T: np.ndarray, act: np.ndarray, til: np.ndarray,
             read: float, tu: float, W: int) -> None:
    """Chains of switches that lower the busiest rank, in place (one level).

    A *switch* moves an expert's whole weight from its one active copy, on rank u, to another of
    its copies, on rank v. One switch can leave the maximum where it is (v becomes as busy as u
    was); a chain u0 -> u1 -> ... -> uk, where each rank after the first takes one expert and
    gives one, finds what one-expert-at-a-time sweeps cannot (an augmenting path). Breadth-first
    from the busiest rank, shortest chain first, each rank visited once; stops when no chain
    lowers the maximum."""
    copies = {e: slots for e, slots, _, _, _ in lay.rep}
    moves: dict[int, list] = {}  # rank -> switches out of it: (expert, from slot, to slot, to rank)

    def add_moves(e: int, src: int) -> None:
        for q in copies[e]:
            if lay.rank[q] != lay.rank[src]:
                moves.setdefault(int(lay.rank[src]), []).append((e, src, int(q), int(lay.rank[q])))

    for e, slots in copies.items():
        on = np.nonzero(w[slots])[0]
        if on.size == 1:
            add_moves(e, int(slots[on[0]]))
    for _ in range(lay.R):
        t = _times(A, T, read, tu)
        hi = int(np.argmax(t))
        chain = _find_chain(hi, t[hi] * (1 - 1e-12), moves, A, T, act, til, read, tu, W)
        if chain is None:
            return
        for e, src, dst, v in chain:
            u = int(lay.rank[src])
            w[src], w[dst] = 0, W
            A[u] -= act[e, W]
            T[u] -= til[e, W]
            A[v] += act[e, W]
            T[v] += til[e, W]
            moves[u] = [m for m in moves[u] if m[0] != e]
            add_moves(e, dst)


def _find_chain(hi: int, top: float, moves: dict, A, T, act, til, read: float, tu: float, W: int) -> list | None:
    """The shortest chain of switches out of rank ``hi`` after which every rank on it is below ``top``."""
    frontier = [(hi, 0.0, 0.0, [])]  # rank, what it takes in (activation, tiles), the chain so far
    seen = {hi}
    for _ in range(_MAX_PATH):
        nxt = []
        for u, in_a, in_t, chain in frontier:
            used = {m[0] for m in chain}
            for m in moves.get(u, []):
                e, _, _, v = m
                if e in used or v in seen:
                    continue
                ea, et = act[e, W], til[e, W]
                if max(read * (A[u] + in_a - ea), tu * (T[u] + in_t - et)) >= top:
                    continue  # u would stay at the maximum
                if max(read * (A[v] + ea), tu * (T[v] + et)) < top:
                    return chain + [m]
                seen.add(v)
                nxt.append((v, ea, et, chain + [m]))
        if not nxt:
            return None
        frontier = nxt
    return None


def _even(lay: _Layer, W: int) -> np.ndarray:
    """``[P]`` hash slots per copy when every copy of an expert gets an equal share."""
    w = np.full(lay.phy2log.size, W, dtype=np.int64)
    for _, slots, _, _, _ in lay.rep:
        base, extra = divmod(W, len(slots))
        w[slots] = base + (np.arange(len(slots)) < extra)
    return w


def _argmin_first(score: np.ndarray) -> np.ndarray:
    """argmin over the last axis, first index on exact ties (deterministic)."""
    return np.argmin(score, axis=-1)


def expected_rank_times_np(lay: _Layer, weights: np.ndarray, act: np.ndarray, til: np.ndarray,
                           cost: CostModel) -> np.ndarray:
    """``[B, R]`` expected rank times of ``weights [B, P]``."""
    B = weights.shape[0]
    e = np.broadcast_to(lay.phy2log, weights.shape)
    a = np.take_along_axis(act.reshape(B, -1), (e * (act.shape[2]) + weights), 1)
    t = np.take_along_axis(til.reshape(B, -1), (e * (til.shape[2]) + weights), 1)
    A = np.zeros((B, lay.R))
    T = np.zeros((B, lay.R))
    np.add.at(A.T, lay.rank, a.T)
    np.add.at(T.T, lay.rank, t.T)
    return _times(A, T, cost.weight_read_us, cost.tile_us)


# ---------------------------------------------------------------------------------------------
# HiGHS: the exact min-max plan (MILP) and its LP relaxation (a certified lower bound)
# ---------------------------------------------------------------------------------------------
def _mip_model(lay: _Layer, act: np.ndarray, til: np.ndarray, cost: CostModel, W: int, integer: bool):
    """Columns: z[p, w] (copy p owns w slots) for every replicated copy, then M. Rows: one choice
    per copy, W slots per replicated expert, read * A_r <= M and tile_us * T_r <= M per rank."""
    import highspy

    read, tu = cost.weight_read_us, cost.tile_us
    R = lay.R
    fixA = np.zeros(R)
    fixT = np.zeros(R)
    e_s = lay.phy2log[lay.single_slots]
    np.add.at(fixA, lay.rank[lay.single_slots], act[e_s, W])
    np.add.at(fixT, lay.rank[lay.single_slots], til[e_s, W])
    cols = []  # (slot, e, w)
    for e, slots, _, _, _ in lay.rep:
        for p in slots:
            for w in range(W + 1):
                cols.append((int(p), e, w))
    n = len(cols)
    h = new_highs()
    inf = highspy.kHighsInf
    lower = np.zeros(n + 1)
    upper = np.ones(n + 1)
    upper[n] = inf
    costv = np.zeros(n + 1)
    costv[n] = 1.0
    h.addVars(n + 1, lower, upper)
    h.changeColsCost(n + 1, np.arange(n + 1, dtype=np.int32), costv)
    if integer:
        h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.full(n, highspy.HighsVarType.kInteger))
    col_of = {}
    for i, (p, e, w) in enumerate(cols):
        col_of.setdefault(p, []).append(i)
    for idx in col_of.values():
        h.addRow(1.0, 1.0, len(idx), np.array(idx, dtype=np.int32), np.ones(len(idx)))
    for e, slots, _, _, _ in lay.rep:
        idx = [i for p in slots for i in col_of[int(p)]]
        vals = [float(cols[i][2]) for i in idx]
        h.addRow(W, W, len(idx), np.array(idx, dtype=np.int32), np.array(vals))
    for r in range(R):
        idx = [i for i, (p, _, _) in enumerate(cols) if lay.rank[p] == r]
        for unit, tab, fix in ((read, act, fixA), (tu, til, fixT)):
            vals = [unit * tab[cols[i][1], cols[i][2]] for i in idx] + [-1.0]
            h.addRow(-inf, -unit * fix[r], len(idx) + 1, np.array(idx + [n], dtype=np.int32), np.array(vals))
    lower_m = max(float((read * fixA).max()), float((tu * fixT).max()))
    h.changeColBounds(n, lower_m, inf)
    return h, cols


def _milp_level(lay: _Layer, act: np.ndarray, til: np.ndarray, cost: CostModel, W: int,
                time_limit: float | None) -> np.ndarray:
    import highspy

    P = lay.phy2log.size
    weights = np.zeros(P, dtype=np.int64)
    weights[lay.single_slots] = W
    if not lay.rep:
        return weights
    h, cols = _mip_model(lay, act, til, cost, W, integer=True)
    h.setOptionValue("mip_rel_gap", 1e-9)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    h.run()
    status = h.getModelStatus()
    sol = h.getSolution()
    if status != highspy.HighsModelStatus.kOptimal and not sol.value_valid:
        raise PlanError(f"HiGHS MILP found no plan ({h.modelStatusToString(status)})")
    x = np.asarray(sol.col_value[: len(cols)])
    for i, (p, _, w) in enumerate(cols):
        if x[i] > 0.5:
            weights[p] = w
    return weights


def _level_costs(pl: Placement, shares: torch.Tensor, cost: CostModel, top_k: int, lv: list[int],
                 W: int) -> tuple["_Layer", np.ndarray, np.ndarray, np.ndarray]:
    """The layer's slots (``_Layer``) and, per level, each expert's expected weight reads and
    tiles by the hash slots it gets (``copy_costs``: ``[B, E, W + 1]`` each) and its tokens per
    batch (``[B, E]``), from ``shares [E]``."""
    s = shares.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if s.shape != (pl.num_logical,) or not np.isfinite(s).all() or (s < 0).any():
        raise PlanError(f"shares must be {pl.num_logical} finite non-negative numbers")
    pi = np.minimum(1.0, top_k * s)
    N = np.array(lv, dtype=np.float64) * pl.num_ranks
    act, til = copy_costs(pi, N, W, cost.tile_tokens)
    return _layer(pl, s), act, til, N[:, None] * pi[None, :]


def plan_lower_bound(pl: Placement, shares: torch.Tensor, cost: CostModel, *, top_k: int,
                     levels=DEFAULT_LEVELS, hash_slots: int = DEFAULT_HASH_SLOTS) -> torch.Tensor:
    """``[B]`` µs: the LP relaxation of the min-max plan (HiGHS), below ``max_r t_r`` of every
    plan of this layer at each level (any ``objective``, any ``method``)."""
    import highspy

    lv = _check_levels(levels)
    W = _check_hash_slots(hash_slots)
    lay, act, til, _ = _level_costs(pl, shares, cost, top_k, lv, W)
    out = []
    for b in range(len(lv)):
        if not lay.rep:
            out.append(float(expected_rank_times_np(lay, np.full((1, lay.phy2log.size), W), act[b:b + 1],
                                                     til[b:b + 1], cost).max()))
            continue
        h, _ = _mip_model(lay, act[b], til[b], cost, W, integer=False)
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            raise PlanError(f"HiGHS LP relaxation failed ({h.modelStatusToString(h.getModelStatus())})")
        out.append(float(h.getInfo().objective_function_value))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """One layer's plans. levels ``(B,)``; weights ``[B, P]`` long, hash slots per copy (sum per
    expert = W); expected_us ``[B]`` float64, the plan's ``max_r t_r`` (module docstring)."""

    levels: tuple[int, ...]
    hash_slots: int
    weights: torch.Tensor
    expected_us: torch.Tensor


@dataclass(frozen=True)
class PlanSet:
    """Plans of every layer: levels ``(B,)``, weights ``[B, L, P]`` long, expected_us ``[B, L]``."""

    levels: tuple[int, ...]
    hash_slots: int
    weights: torch.Tensor
    expected_us: torch.Tensor

    def layer(self, i: int) -> LayerPlan:
        return LayerPlan(self.levels, self.hash_slots, self.weights[:, i], self.expected_us[:, i])


def solve_plans(pl: Placement, window: torch.Tensor, cost: CostModel, *, top_k: int, levels=DEFAULT_LEVELS,
                hash_slots: int = DEFAULT_HASH_SLOTS, objective: str = "soft", method: str = "fast") -> PlanSet:
    """Plans of every layer of ``pl`` from a statistics window ``[T, L, E]`` / ``[L, E]`` counts."""
    shares = window_shares(window, pl.num_layers, pl.num_logical)
    per = [solve_layer_plan(pl.layer(i), shares[i], cost, top_k=top_k, levels=levels, hash_slots=hash_slots,
                            objective=objective, method=method) for i in range(pl.num_layers)]
    return PlanSet(per[0].levels, per[0].hash_slots, torch.stack([p.weights for p in per], 1),
                   torch.stack([p.expected_us for p in per], 1))


def solve_rows(rows: dict[int, torch.Tensor], window: torch.Tensor, cost: CostModel, *, num_ranks: int,
               num_logical: int, top_k: int, levels=DEFAULT_LEVELS, hash_slots: int = DEFAULT_HASH_SLOTS,
               stop=None) -> dict[int, tuple[torch.Tensor | None, str | None]]:
    """Plans of some layers, each from its own placement row: what one EPLB-cycle solve does.

    Args:
        rows: layer -> ``[P]`` physical->logical row being served.
        window: ``[T, L, E]`` / ``[L, E]`` recorded counts (``L`` covers every layer in ``rows``).
        stop: a callable; the solve ends early (remaining layers unsolved) when it returns True.
    Returns:
        layer -> (weights ``[B, P]`` long, None), or (None, "ErrorType: message") for a layer that
        failed (its caller keeps the plan it serves).
    """
    out: dict[int, tuple[torch.Tensor | None, str | None]] = {}
    try:
        w = window.detach().to("cpu", torch.float64)
        w = w[None] if w.dim() == 2 else w
        shares = window_shares(w, w.shape[1], num_logical)
    except Exception as err:  # a bad window: every layer keeps its plan
        return {layer: (None, f"{type(err).__name__}: {err}") for layer in rows}
    for layer, row in sorted(rows.items()):
        if stop is not None and stop():
            break
        try:
            if not 0 <= layer < shares.shape[0]:
                raise PlanError(f"the counts window has {shares.shape[0]} layers, no layer {layer}")
            lp = solve_layer_plan(Placement(row, num_ranks, num_logical), shares[layer], cost, top_k=top_k,
                                  levels=levels, hash_slots=hash_slots)
            out[layer] = (lp.weights, None)
        except Exception as err:  # this layer keeps its plan
            out[layer] = (None, f"{type(err).__name__}: {err}")
    return out


def expected_rank_times(pl: Placement, weights: torch.Tensor, shares: torch.Tensor, cost: CostModel, *,
                        top_k: int, levels=DEFAULT_LEVELS, hash_slots: int = DEFAULT_HASH_SLOTS) -> torch.Tensor:
    """``[B, R]`` expected µs per rank (``t_r``) of one layer's plan ``weights [B, P]``."""
    lv = _check_levels(levels)
    W = _check_hash_slots(hash_slots)
    lay, act, til, _ = _level_costs(pl, shares, cost, top_k, lv, W)
    return torch.from_numpy(expected_rank_times_np(lay, weights.cpu().numpy().astype(np.int64), act, til, cost))


def static_like_weights(pl: Placement, levels=DEFAULT_LEVELS, hash_slots: int = DEFAULT_HASH_SLOTS) -> torch.Tensor:
    """``[B, L, P]``: every copy of an expert gets an equal share of the hash slots (the plan
    before any window: SGLang's even use of the replicas)."""
    lv = _check_levels(levels)
    W = _check_hash_slots(hash_slots)
    L, P = pl.num_layers, pl.num_physical
    w = torch.zeros(L, P, dtype=torch.long)
    for layer in range(L):
        p2l = pl.phy2log[layer].cpu()
        order = pl.copy_order[layer].cpu()
        for e in range(pl.num_logical):
            start, n = int(pl.copy_start[layer, e]), int(pl.num_copies[layer, e])
            slots = order[start:start + n]
            base, extra = divmod(W, n)
            w[layer, slots] = torch.tensor([base + (1 if i < extra else 0) for i in range(n)])
        assert int(w[layer].sum()) == W * pl.num_logical and bool((p2l >= 0).all())
    return w[None].expand(len(lv), L, P).clone()


# ---------------------------------------------------------------------------------------------
# Applying a plan: the map and the one gather
# ---------------------------------------------------------------------------------------------
def plan_maps(pl: Placement, weights: torch.Tensor, hash_slots: int) -> torch.Tensor:
    """Physical slot per (expert, hash slot): weights ``[..., L, P]`` -> long ``[..., L, E, W]``.

    Copy ``p`` of ``e`` owns ``weights[p]`` consecutive hash slots, copies in slot order."""
    W = _check_hash_slots(hash_slots)
    L, P, E = pl.num_layers, pl.num_physical, pl.num_logical
    lead = weights.shape[:-2]
    w = weights.reshape(-1, L, P).to(torch.long).cpu().numpy()
    order = pl.copy_order.cpu().numpy()  # [L, P]: slots grouped by expert, slot order inside a group
    p2l = pl.phy2log.cpu().numpy()
    sums = np.zeros((w.shape[0], L, E), dtype=np.int64)
    for layer in range(L):
        np.add.at(sums[:, layer].T, p2l[layer], w[:, layer].T)
    if (w < 0).any() or not (sums == W).all():
        raise PlanError(f"plan weights must be >= 0 and sum to {W} per expert")
    out = np.empty((w.shape[0], L, E * W), dtype=np.int64)
    for x in range(w.shape[0]):
        for layer in range(L):
            out[x, layer] = np.repeat(order[layer], w[x, layer, order[layer]])
    return torch.from_numpy(out.reshape(*lead, L, E, W))


def hash_offsets(max_rows: int, top_k: int, hash_slots: int, salt: int = 0) -> torch.Tensor:
    """``[max_rows, top_k]`` long hash slot of each (row, k) position: a fixed mix of the position
    and ``salt`` (the source rank where ranks may disagree), masked to ``W - 1``. Built once."""
    W = _check_hash_slots(hash_slots)
    if max_rows < 0 or top_k < 1:
        raise PlanError(f"hash_offsets needs max_rows >= 0 and top_k >= 1, got {max_rows}, {top_k}")
    with np.errstate(over="ignore"):  # splitmix64 finaliser, modulo 2^64
        i = np.arange(max_rows * top_k, dtype=np.uint64) + np.uint64(salt & 0xFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        z = i + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    h = (z & np.uint64(W - 1)).astype(np.int64)
    return torch.from_numpy(h.reshape(max_rows, top_k))


def apply_plan(level_map: torch.Tensor, topk_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Physical ids of ``topk_ids [T, k]`` under one (level, layer) map ``[E, W]``: one gather.

    ``offsets`` is ``hash_offsets`` (at least T rows). Ids of -1 alias the last expert, exactly as
    SGLang's static gather does: the caller masks padded rows after it, as SGLang does."""
    return level_map[topk_ids, offsets[: topk_ids.shape[0]]]


def level_index(levels, tokens_per_rank: float) -> int:
    """The level whose plan serves a batch of ``tokens_per_rank`` (nearest in log scale, ties up)."""
    n = max(1.0, float(tokens_per_rank))
    best, best_d = 0, math.inf
    for i, lv in enumerate(levels):
        d = abs(math.log(n / lv))
        if d <= best_d + 1e-12:
            best, best_d = i, d
    return best
