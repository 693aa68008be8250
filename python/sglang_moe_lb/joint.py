"""One MoE layer's dispatch decision for every mode: ``lplb``, ``waterfill`` and both.

The three ideas (split, quotas, waterfill) live in their own modules; this module only
chains them the same way for the server plugin, ``replay`` and the kernels' reference.

Modes:
* LPLB per batch: exact split of this batch's counts -> integer quotas -> deterministic
  dispatch. LPLB with a split table (rebalance-only): the table's fractions applied to this
  batch's counts, then the same quotas and dispatch.
* Waterfill: shared-expert ranks on top of the routed physical ids (see ``waterfill.py``).
* Joint, ``all_rank``: the shared expert is logical expert ``E`` with a copy on every rank
  (``Placement.with_shared_expert``), so one exact split balances routed and shared tokens
  together. Joint, ``conservative``: split the replicas first, then place the shared slots
  against the resulting (global) rank loads; Waterfill never raises the max, so the
  result is no worse than LPLB alone.

Static vs dynamic: ``gathered=None`` uses only this rank's tokens (no communication).
Dynamic callers all-gather ``local_stats`` rows once per layer and pass ``gathered [D, E+R+1]``;
every rank then derives identical global counts, DP-attention offsets and loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .lp_split import fractions_to_split, solve_split
from .placement import Placement
from .quota_dispatch import count_experts, dispatch, dp_offsets, integer_quotas
from .waterfill import Candidates, routed_rank_load
from .waterfill import waterfill as waterfill_ranks

__all__ = ["LayerDispatch", "local_stats", "balance_layer"]

LplbMode = Literal["off", "table", "per_batch"]


@dataclass
class LayerDispatch:
    """Result for one layer on one rank.

    phys_ids: ``[T, k]`` physical routed ids. shared_rank: ``[T]`` long or None (no
    waterfill). quotas: ``[P]`` global per-copy quotas or None (LPLB off).
    """

    phys_ids: torch.Tensor
    shared_rank: torch.Tensor | None
    quotas: torch.Tensor | None


def local_stats(
    topk_ids: torch.Tensor, num_logical: int, num_ranks: int, slots_per_rank: int, phys_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """This rank's row for the one dynamic collective: ``[E + R + 1]`` long.

    ``[:E]`` tokens per logical expert, ``[E:E+R]`` routed tokens per rank (from
    ``phys_ids``; zeros when LPLB will decide them), ``[E+R]`` tokens with a valid route.
    """
    counts = count_experts(topk_ids, num_logical)
    loads = (
        routed_rank_load(phys_ids, num_ranks, slots_per_rank)
        if phys_ids is not None
        else counts.new_zeros(num_ranks)
    )
    n = (topk_ids >= 0).any(1).sum().reshape(1) if topk_ids.shape[0] else counts.new_zeros(1)
    return torch.cat([counts, loads, n.to(counts.dtype)])


def balance_layer(
    pl: Placement,
    topk_ids: torch.Tensor,
    *,
    layer: int = 0,
    source_rank: int = 0,
    lplb: LplbMode = "per_batch",
    split_table: torch.Tensor | None = None,
    waterfill: Candidates | None = None,
    gathered: torch.Tensor | None = None,
    phys_ids: torch.Tensor | None = None,
    method: Literal["fast", "highs"] = "fast",
) -> LayerDispatch:
    """Decide physical ids (and shared-expert ranks) for this rank's tokens of one layer.

    Args:
        pl: placement (single- or multi-layer; ``layer`` picks the row).
        topk_ids: ``[T, k]`` logical ids of this rank's tokens (-1 = padding).
        source_rank: this rank's index in the EP group.
        lplb: ``"per_batch"`` (solve this batch), ``"table"`` (apply ``split_table``) or
            ``"off"`` (keep ``phys_ids`` from the caller's upstream mapping).
        split_table: ``[P]`` fractions per copy for ``lplb="table"``.
        waterfill: ``"conservative"``, ``"all_rank"`` or None.
        gathered: ``[D, E+R+1]`` all-gathered ``local_stats`` rows (dynamic), or None (static).
        phys_ids: ``[T, k]`` physical ids from the upstream mapping, required when ``lplb="off"``.
        method: split solver for ``lplb="per_batch"``.
    Returns:
        ``LayerDispatch``.
    """
    E, R, S = pl.num_logical, pl.num_ranks, pl.slots_per_rank
    lp = pl.layer(layer) if not pl.single_layer else pl
    if lplb == "off" and phys_ids is None:
        raise ValueError("lplb='off' needs phys_ids from the upstream mapping")
    if lplb == "table" and split_table is None:
        raise ValueError("lplb='table' needs a split_table")
    if gathered is None:
        stats = local_stats(topk_ids, E, R, S, phys_ids if lplb == "off" else None)
        counts, offsets = stats[:E], None
        tokens = torch.zeros(R, dtype=torch.long, device=topk_ids.device)
        tokens[source_rank] = stats[E + R]
        routed = stats[E : E + R]
    else:
        counts, offsets = gathered[:, :E].sum(0), dp_offsets(gathered[:, :E], source_rank)
        tokens, routed = gathered[:, E + R].to(torch.long), gathered[:, E : E + R].sum(0)

    quotas = shared_q = None
    if lplb == "per_batch" and waterfill == "all_rank":
        fpl = lp.with_shared_expert
        c_ext = torch.cat([counts.to(torch.long), tokens.sum().reshape(1)])
        q_ext = integer_quotas(fpl, solve_split(fpl, c_ext, method), c_ext).reshape(R, S + 1)
        quotas, shared_q = q_ext[:, :S].reshape(-1), q_ext[:, S]
    elif lplb == "per_batch":
        quotas = integer_quotas(lp, solve_split(lp, counts, method), counts)
    elif lplb == "table":
        # The table is the plan: round it, but do not re-optimise per batch (that is per_batch).
        quotas = integer_quotas(lp, fractions_to_split(lp, split_table.reshape(-1), counts), counts, polish_sweeps=0)
    elif lplb != "off":
        raise ValueError(f"lplb must be 'off', 'table' or 'per_batch', got {lplb!r}")

    if quotas is not None:
        phys_ids = dispatch(lp, topk_ids, quotas, offsets)
        routed = lp.rank_loads(quotas)
    if waterfill is None:
        return LayerDispatch(phys_ids, None, quotas)
    shared_rank = waterfill_ranks(phys_ids, R, S, source_rank, waterfill, routed, tokens, shared_q)
    return LayerDispatch(phys_ids, shared_rank, quotas)
