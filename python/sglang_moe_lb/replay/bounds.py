"""Per-batch LP bounds on the busiest rank's load, for every layer of a step at once.

The fractional min-max dispatch of a layer (math.md) is a transportation problem: expert e's
``c_e`` tokens go to the ranks holding one of its copies, each rank's load at most M. By
max-flow/min-cut (Hall's condition for supplies), the least feasible M is::

    M* = max over rank sets S of  (tokens of experts with every copy inside S) / |S|

so with R ranks the exact LP value is a maximum over the ``2^R - 1`` rank sets, a matrix
product per placement instead of one LP per (step, layer). Three variants, as in the report:

* ``routed``: routed tokens only;
* ``joint``: plus the shared expert on any rank (one more expert with a copy everywhere:
  it only counts for S = every rank);
* ``local``: plus each rank's shared tokens pinned to that rank (a pseudo-expert per rank).

Beyond ``MAX_SUBSET_WORK`` (large EP) each layer goes to HiGHS through the core's
``solve_split`` instead (same value). A test checks both against an LP written from scratch.
"""

from __future__ import annotations

import torch

from ..lp_split import solve_split
from ..placement import Placement

__all__ = ["SubsetBound", "layer_bounds", "MAX_SUBSET_WORK"]

# Entries (2^R x L x E) of the containment matrix: float64, plus an int64 temporary of the same
# size while it is built, i.e. <= ~1 GiB per placement (the timeline holds one per rebalance).
MAX_SUBSET_WORK = 1 << 26


class SubsetBound:
    """The containment matrix of one placement: ``inside [2^R - 1, L, E]`` (expert e has every
    copy in rank set s) and ``size [2^R - 1]`` (|s|), or None when too large (HiGHS instead)."""

    def __init__(self, pl: Placement):
        self.pl = pl
        R, E, L = pl.num_ranks, pl.num_logical, pl.num_layers
        self.enabled = (1 << R) * L * E <= MAX_SUBSET_WORK
        if not self.enabled:
            return
        rank = pl.slot_rank.reshape(-1).to(torch.long).expand(L, -1)
        present = torch.zeros(L, E, R, dtype=torch.long)
        present[torch.arange(L)[:, None].expand_as(rank), pl.phy2log, rank] = 1
        mask = (present << torch.arange(R)).sum(-1)  # [L, E] bit r: a copy on rank r
        sets = torch.arange(1, 1 << R, dtype=torch.long)
        self.inside = ((mask[None] & ~sets[:, None, None]) == 0).to(torch.float64)  # [S, L, E]
        members = (sets[:, None] >> torch.arange(R)) & 1
        self.members = members.to(torch.float64)  # [S, R]
        self.size = members.sum(1).to(torch.float64)  # [S]
        self.full = sets == (1 << R) - 1


def layer_bounds(sb: SubsetBound, counts: torch.Tensor, shared: torch.Tensor) -> dict[str, torch.Tensor]:
    """LP max loads of one step: counts ``[L, E]``, shared ``[L, R]`` shared-expert tokens per
    source rank -> ``{"joint", "local", "routed"}`` float64 ``[L]``."""
    c = counts.to(torch.float64)
    n = shared.to(torch.float64)
    if sb.enabled:
        contained = torch.einsum("sle,le->sl", sb.inside, c)  # [S, L]
        size = sb.size[:, None]
        routed = (contained / size).amax(0)
        joint = ((contained + sb.full[:, None] * n.sum(1)[None]) / size).amax(0)
        local = ((contained + sb.members @ n.T) / size).amax(0)
        return {"joint": joint, "local": local, "routed": routed}
    return _highs_bounds(sb.pl, c, n)


def _highs_bounds(pl: Placement, c: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same three values from HiGHS, one layer at a time (large EP)."""
    out = {k: torch.zeros(pl.num_layers, dtype=torch.float64) for k in ("joint", "local", "routed")}
    R, S, E = pl.num_ranks, pl.slots_per_rank, pl.num_logical
    pseudo = (E + torch.arange(R)).reshape(R, 1)
    for layer in range(pl.num_layers):
        lp = pl.layer(layer)
        fpl = lp.with_shared_expert
        joint = solve_split(fpl, torch.cat([c[layer], n[layer].sum().reshape(1)]), "highs")
        out["joint"][layer] = fpl.rank_loads(joint).max()
        loc = Placement(torch.cat([lp.phy2log.reshape(R, S), pseudo], 1).reshape(-1), R, E + R)
        out["local"][layer] = loc.rank_loads(solve_split(loc, torch.cat([c[layer], n[layer]]), "highs")).max()
        out["routed"][layer] = lp.rank_loads(solve_split(lp, c[layer], "highs")).max()
    return out
