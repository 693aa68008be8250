"""Decode-aware placement: a post-step on EPLB's placement that lets plans switch copies off evenly.

At decode sizes a rank pays one weight read per *active* copy (``cost.CostModel``). A plan
(``plan.py``) can switch off a copy only where its expert has another copy to take the
tokens, so a rank holding only single-copy experts keeps all of them active, whatever the
plan. EPLB places copies to balance tokens and pays no attention to this: at EP 32 with 32
redundant experts it leaves some ranks with no replicated copy at all.

This step keeps EPLB's replica counts and re-packs the copies, per layer:

1. **Surplus copies first, evenly.** At a decode level (``level`` tokens per rank) a plan
   keeps ``home_e`` copies of expert ``e`` active: enough that none holds more tokens than
   ``crossover_tokens`` (where its rank would turn compute-bound), at least one. The other
   ``c_e - home_e`` copies are *surplus*: a plan can switch them off. They are dealt to the
   ranks so that every rank holds as many as any other (to within one), hottest expert first,
   the rank with the fewest surplus copies (then the fewest expected tokens) first.
2. **Everything else by tokens.** Home copies and single-copy experts go largest first to
   the rank with the fewest expected tokens that has room (LPT, as EPLB packs): a copy's
   expected tokens are its expert's share split evenly over its copies, what EPLB balances.
3. **Repair.** While the busiest rank's expected tokens exceed EPLB's maximum, swap a copy on
   it with a lighter copy of the same kind (surplus-able or not) on another rank.

A layer keeps EPLB's placement when the repair cannot bring its token maximum back to
EPLB's (times ``1 + tolerance``): prefill token balance never gets worse. No rank ever holds
two copies of one expert. Deterministic (fixed orders, ties to the lower index).
"""

from __future__ import annotations

import numpy as np
import torch

from .cost import CostModel

__all__ = ["DECODE_LEVEL", "PLACEMENT_CHOICES", "DECODE_MIN_RANKS", "resolve_placement", "crossover_tokens",
           "decode_aware_placement", "logical_to_all_physical"]

DECODE_LEVEL = 16  # tokens per rank the surplus copies are counted at
PLACEMENT_CHOICES = ("auto", "eplb", "decode")
# ``auto``: the post-step from this many EP ranks on. Measured (docs/defaults.md, the defaults
# study's 10 layouts): at EP 16 and 32 it lowers the modelled time at 1-16 tokens per rank on
# every layout (by up to 0.13 of static), at EP 8 it gains nothing there and costs up to 0.04
# at prefill sizes.
DECODE_MIN_RANKS = 16


def resolve_placement(choice: str, num_ranks: int) -> str:
    """``eplb`` or ``decode`` for a ``--moe-lb-placement`` / ``replay --placement`` value."""
    if choice not in PLACEMENT_CHOICES:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENT_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "decode" if num_ranks >= DECODE_MIN_RANKS else "eplb"
    return choice


def _homes(copies: np.ndarray, shares: np.ndarray, num_ranks: int, top_k: int, crossover: float,
           level: int) -> np.ndarray:
    """``[E]`` copies of each expert a plan keeps active at ``level`` tokens per rank: enough that
    none holds more than ``crossover`` tokens, at least one, at most all."""
    tokens = level * num_ranks * np.minimum(1.0, top_k * shares)
    return np.clip(np.ceil(tokens / crossover), 1, copies).astype(np.int64)


def _layer(p2l: np.ndarray, shares: np.ndarray, R: int, top_k: int, crossover: float, level: int,
           tol: float) -> np.ndarray:
    """One layer: surplus copies spread evenly over the ranks, then the rest packed for tokens."""
    P = p2l.size
    S = P // R
    E = shares.size
    copies = np.bincount(p2l, minlength=E)
    tok = shares / np.maximum(copies, 1)  # expected tokens of one copy (EPLB's even split)
    old_max = np.bincount(np.arange(P) // S, tok[p2l], R).max()
    home = _homes(copies, shares, R, top_k, crossover, level)
    held = np.zeros((R, E), dtype=bool)
    load = np.zeros(R)
    free = np.full(R, S)
    surplus_on = np.zeros(R, dtype=np.int64)
    slots: list[list[int]] = [[] for _ in range(R)]

    def put(e: int, r: int) -> None:
        held[r, e] = True
        load[r] += tok[e]
        free[r] -= 1
        slots[r].append(e)

    # 1. surplus copies (a plan switches them off at decode): as even a count per rank as possible
    for e in sorted(np.nonzero(copies > home)[0].tolist(), key=lambda e: (-tok[e], e)):
        for _ in range(copies[e] - home[e]):
            ok = (~held[:, e]) & (free > 0)
            if not ok.any():
                return p2l
            key = np.where(ok, surplus_on * 1e6 + load / max(old_max, 1e-300), np.inf)
            r = int(np.argmin(key))
            put(e, r)
            surplus_on[r] += 1
    # 2. every other copy, largest first, onto the least loaded rank with room (LPT)
    rest = [e for e in range(E) for _ in range(int(min(home[e], copies[e])))]
    for e in sorted(rest, key=lambda e: (-tok[e], e)):
        ok = (~held[:, e]) & (free > 0)
        if not ok.any():
            return p2l
        r = int(np.argmin(np.where(ok, load, np.inf)))
        put(e, r)
    out = np.array([e for r in range(R) for e in sorted(slots[r])], dtype=p2l.dtype)
    out, ok = _repair(out, tok, R, old_max * (1 + tol))
    if not ok:
        return p2l  # would unbalance prefill tokens: keep EPLB's placement for this layer
    return out


def _repair(p2l: np.ndarray, tok: np.ndarray, R: int, limit: float) -> tuple[np.ndarray, bool]:
    """Swap copies of equal standing between ranks until the busiest rank's expected tokens are
    at most ``limit``: a swap of a copy on the busiest rank with a lighter copy elsewhere, where
    both copies are replicated or both are single (so every rank keeps its switchable count)."""
    P = p2l.size
    S = P // R
    p2l = p2l.copy()
    rank = np.arange(P) // S
    E = tok.size
    rep = np.bincount(p2l, minlength=E)[p2l] > 1
    t = tok[p2l]
    for _ in range(2 * P):
        load = np.bincount(rank, t, R)
        hi = int(np.argmax(load))
        if load[hi] <= limit + 1e-15:
            return p2l, True
        a = np.nonzero(rank == hi)[0]
        b = np.nonzero(rank != hi)[0]
        d = t[a][:, None] - t[b][None, :]  # tokens hi sheds
        new_max = np.maximum(load[hi] - d, load[rank[b]][None, :] + d)
        held = np.zeros((R, E), dtype=bool)
        held[rank, p2l] = True
        ok = (d > 0) & (new_max < load[hi] - 1e-15) & (rep[a][:, None] == rep[b][None, :])
        ok &= ~held[hi][p2l[b]][None, :] & ~held[rank[b][None, :], p2l[a][:, None]]
        if not ok.any():
            return p2l, False
        i, j = np.unravel_index(int(np.argmin(np.where(ok, new_max, np.inf))), new_max.shape)
        x, y = a[i], b[j]
        p2l[x], p2l[y] = p2l[y], p2l[x]
        t[x], t[y] = t[y], t[x]
        rep[x], rep[y] = rep[y], rep[x]
    load = np.bincount(rank, t, R)
    return p2l, bool(load.max() <= limit + 1e-15)


def crossover_tokens(cost: CostModel, slots_per_rank: int) -> float:
    """Tokens one copy can hold before its rank turns compute-bound, when the rank runs
    ``S - 1`` active copies and the others hold one tile each: ``tile * ((S-1) read/tile_us - (S-2))``."""
    S = slots_per_rank
    return cost.tile_tokens * max(1.0, (S - 1) * cost.weight_read_us / cost.tile_us - (S - 2))


def decode_aware_placement(phy2log: torch.Tensor, window: torch.Tensor, num_ranks: int, *, top_k: int,
                           cost: CostModel, level: int = DECODE_LEVEL, tolerance: float = 0.0) -> torch.Tensor:
    """EPLB's placement with copies moved for decode (module docstring).

    Args:
        phy2log: ``[L, P]`` long, EPLB's physical -> logical map.
        window: ``[T, L, E]`` or ``[L, E]`` counts EPLB placed from.
        num_ranks: EP size R.
        top_k: routed experts per token.
        cost: the cost model (when a copy turns compute-bound: ``crossover_tokens``).
        level: the decode size (tokens per rank) the surplus copies are counted at.
        tolerance: allowed relative growth of the busiest rank's expected tokens (0: none).
    Returns:
        ``[L, P]`` long: the same experts per layer with the same copy counts.
    """
    p2l = phy2log.detach().to("cpu", torch.long)
    L, P = p2l.shape
    w = window.detach().to("cpu", torch.float64)
    if w.dim() == 3:
        w = w.sum(0)
    if tuple(w.shape) != (L, int(w.shape[1])) or w.shape[0] != L:
        raise ValueError(f"window must be [steps, {L}, E] or [{L}, E], got {list(window.shape)}")
    if P % num_ranks:
        raise ValueError(f"{P} slots do not split over {num_ranks} ranks")
    tot = w.sum(-1, keepdim=True)
    shares = torch.where(tot > 0, w / torch.where(tot > 0, tot, 1.0), 1.0 / w.shape[1]).numpy()
    cross = crossover_tokens(cost, P // num_ranks)
    out = [_layer(p2l[i].numpy(), shares[i], num_ranks, top_k, cross, level, tolerance)
           for i in range(L)]
    return torch.from_numpy(np.stack(out)).to(phy2log.dtype)


def logical_to_all_physical(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """``[L, E, X]`` copies of each expert in slot order, ``-1``-padded (``X``: most copies)."""
    p2l = phy2log.to(torch.long).cpu()
    L, P = p2l.shape
    X = int(torch.bincount(p2l.reshape(-1) + torch.arange(L).repeat_interleave(P) * num_logical,
                           minlength=L * num_logical).max())
    out = torch.full((L, num_logical, X), -1, dtype=torch.long)
    for layer in range(L):
        fill = [0] * num_logical
        for p, e in enumerate(p2l[layer].tolist()):
            out[layer, e, fill[e]] = p
            fill[e] += 1
    return out
