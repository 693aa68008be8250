"""The one per-layer chain: count → split → quotas → dispatch → Waterfill, for every mode.

The server plugin, ``replay`` and the kernels' torch reference all call ``balance_layer``;
only the split-and-round arithmetic differs between them (a ``SplitSteps``: float64 with
HiGHS behind it here, fixed point in ``moe_lb_kernels.reference``). The ideas live in their
own modules (``objective``: split + quotas for the token or tile objective; ``quota_dispatch``:
dispatch; ``waterfill``: the shared expert); this module only chains them.

Per mode (``BalanceMode``; a gated mode reaches the chain as its ``opened`` or ``closed``
form, the caller's rank-consistent choice):

* LPLB per batch: this batch's counts (global with ``lplb_sync=global``, this rank's own
  tokens with ``local``) → ``balanced_quotas`` → deterministic ``dispatch``.
* LPLB plan: the installed plan's map for this batch's level, one gather (``plan.apply_plan``);
  nothing is counted.
* Waterfill: shared-expert ranks on top of the routed physical ids (``waterfill.py``): SGLang's
  static ids, or the plan's.
* Joint (Waterfill with per-batch LPLB), ``all_rank``: the shared expert is logical expert
  ``E`` with a copy on every rank (``Placement.with_shared_expert``), so one split balances
  routed and shared tokens together. ``conservative``: split the replicas first, then place
  the shared slots against the resulting rank loads; Waterfill never raises the max, so the
  result is no worse than LPLB alone.

Global sync: each rank all-gathers its ``local_stats`` row (int32, ``stats_width`` columns)
once per layer and passes the rows as ``gathered [D, W]``; every rank then derives identical
counts, DP-attention offsets and loads. Local sync: ``gathered=None``; each rank decides for its own tokens.

With ``check=False`` nothing here synchronises with the host or allocates a data-dependent
shape (given steps that do not either): the kernels' graph-safe reference runs that way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cost import CostModel
from .mode import BalanceMode
from .objective import FLOAT_STEPS, SplitSteps, split_step
from .placement import Placement
from .plan import apply_plan
from .quota_dispatch import check_topk_ids, count_step, dispatch_step
from .waterfill import routed_rank_load
from .waterfill import waterfill as waterfill_ranks

__all__ = ["LayerDispatch", "LayerStats", "local_stats", "stats_width", "layer_stats", "balance_layer", "effective_tile"]


@dataclass
class LayerDispatch:
    """Result for one layer on one rank.

    phys_ids: ``[T, k]`` physical routed ids. shared_rank: ``[T]`` long or None (no
    Waterfill). quotas: ``[P]`` per-copy quotas (global with global sync, this rank's with
    local sync) or None (LPLB off). certified: 0-dim bool tensor, whether the split was
    proven optimal (always True outside per-batch LPLB and with the float steps).
    """

    phys_ids: torch.Tensor
    shared_rank: torch.Tensor | None
    quotas: torch.Tensor | None
    certified: torch.Tensor | bool = True


@dataclass(frozen=True)
class LayerStats:
    """What one rank knows of a layer's batch. counts ``[E]``, offsets ``[E]`` or None (this
    rank's tokens are the whole batch), tokens ``[R]`` tokens with a route per source rank,
    routed ``[R]`` routed load per rank (from the caller's physical ids, zeros otherwise)."""

    counts: torch.Tensor
    offsets: torch.Tensor | None
    tokens: torch.Tensor
    routed: torch.Tensor


def stats_width(pl: Placement, mode: BalanceMode) -> int:
    """Columns of one rank's row in the global-sync collective (``local_stats``).

    Only what the decision needs, in int32: with a per-batch split, tokens per logical expert
    plus the rank's token count (``[E + 1]``); Waterfill on fixed physical ids (SGLang's or a
    plan's), routed tokens per rank plus the token count (``[R + 1]``). Bytes per layer
    gathered: ``4 * width * ranks`` (docs/design.md)."""
    return (pl.num_logical if mode.per_batch else pl.num_ranks) + 1


def local_stats(pl: Placement, topk_ids: torch.Tensor, mode: BalanceMode,
                phys_ids: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's row for the one global-sync collective: int32 ``[stats_width]``.

    With a per-batch split: ``[:E]`` tokens per logical expert of ``topk_ids``, ``[E]`` tokens
    with a valid route. Otherwise (Waterfill on fixed ids): ``[:R]`` routed tokens per rank of
    ``phys_ids`` (SGLang's or the plan's physical ids), ``[R]`` tokens with a valid route."""
    ids = topk_ids if mode.per_batch else phys_ids
    n = (ids >= 0).any(1).sum().reshape(1) if ids.shape[0] else torch.zeros(1, dtype=torch.long, device=ids.device)
    if mode.per_batch:
        head = count_step(topk_ids, pl.num_logical)
    else:
        head = routed_rank_load(phys_ids, pl.num_ranks, pl.slots_per_rank)
    return torch.cat([head, n.to(head.dtype)]).to(torch.int32)


def layer_stats(
    pl: Placement,
    topk_ids: torch.Tensor,
    mode: BalanceMode,
    source_rank: int,
    gathered: torch.Tensor | None,
    phys_ids: torch.Tensor | None,
) -> LayerStats:
    """Counts, offsets, tokens per source and routed loads, from this rank's ids or the gathered rows."""
    E, R, S = pl.num_logical, pl.num_ranks, pl.slots_per_rank
    dev = topk_ids.device
    if gathered is None:
        counts = count_step(topk_ids, E)
        valid = topk_ids if mode.per_batch else phys_ids
        tokens = torch.zeros(R, dtype=torch.long, device=dev)
        tokens[source_rank] = (valid >= 0).any(1).sum() if valid.shape[0] else 0
        routed = torch.zeros(R, dtype=torch.long, device=dev) if mode.per_batch else routed_rank_load(phys_ids, R, S)
        return LayerStats(counts, None, tokens, routed)
    g = gathered.to(torch.long)
    tokens = torch.zeros(R, dtype=torch.long, device=dev)
    tokens[: g.shape[0]] = g[:, -1]
    if mode.per_batch:
        return LayerStats(g[:, :E].sum(0), g[:source_rank, :E].sum(0), tokens, torch.zeros(R, dtype=torch.long, device=dev))
    return LayerStats(count_step(topk_ids, E), None, tokens, g[:, :R].sum(0))


def effective_tile(mode: BalanceMode, cost: CostModel | None, num_sources: int) -> int:
    """The tile the split uses: 1 for the token objective; the GEMM tile for the tile
    objective, and with local sync the share of a tile one of ``num_sources`` DP ranks
    fills (its counts are about 1/D of the layer's), at least 1."""
    if mode.objective != "tiles":
        return 1
    if cost is None:
        raise ValueError(f"mode {mode.name} (tile objective) needs a cost model (cost=CostModel(...))")
    tile = cost.tile_tokens
    if mode.lplb_sync == "local":
        tile = max(1, -(-tile // max(1, num_sources)))
    return tile


def _check_plan_map(pl: Placement, plan_map: torch.Tensor, layer: int) -> None:
    """Every entry of row ``e`` of ``plan_map [E, W]`` must be a physical copy of expert ``e``
    in this layer: a wrong map would route tokens to another expert's weights."""
    if plan_map.dtype.is_floating_point or plan_map.dtype.is_complex or plan_map.dtype == torch.bool:
        raise ValueError(f"plan_map must hold integer physical ids, got {plan_map.dtype}")
    ids = plan_map.to(device=pl.phy2log.device, dtype=torch.long)
    P = pl.num_physical
    inside = (ids >= 0) & (ids < P)
    owner = pl.phy2log[layer][ids.clamp(0, P - 1)]
    own = torch.arange(pl.num_logical, device=ids.device)[:, None]
    bad = ~inside | (owner != own)
    if bool(bad.any()):
        e, w = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"plan_map[{e}, {w}] = {int(ids[e, w])} is not a physical copy of expert {e} in layer "
                         f"{layer} (plan.plan_maps builds the maps)")


def _check(pl: Placement, topk_ids, mode, layer, source_rank, plan_map, offsets, gathered, phys_ids) -> None:
    if not isinstance(mode, BalanceMode):
        raise ValueError(f"mode must be a BalanceMode, got {type(mode).__name__}")
    if mode.gate:
        raise ValueError(f"mode {mode.name} is gated: pass its .opened or .closed form (the gate is the caller's)")
    check_topk_ids(topk_ids, pl.num_logical)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < pl.num_layers:
        raise ValueError(f"layer must be an int in [0, {pl.num_layers}), got {layer!r}")
    if not isinstance(source_rank, int) or isinstance(source_rank, bool) or not 0 <= source_rank < pl.num_ranks:
        raise ValueError(f"source_rank must be an int in [0, {pl.num_ranks}), got {source_rank!r}")
    if mode.plan and phys_ids is None:
        want = (pl.num_logical,)
        if plan_map is None or plan_map.dim() != 2 or tuple(plan_map.shape[:1]) != want:
            raise ValueError(f"mode {mode.name} needs plan_map [{pl.num_logical}, W] (plan.plan_maps at this "
                             f"level and layer), got {None if plan_map is None else list(plan_map.shape)}")
        if offsets is None or offsets.dim() != 2 or offsets.shape[0] < topk_ids.shape[0] \
                or offsets.shape[1] != topk_ids.shape[1]:
            raise ValueError(f"mode {mode.name} needs hash offsets [>= {topk_ids.shape[0]}, {topk_ids.shape[1]}] "
                             f"(plan.hash_offsets), got {None if offsets is None else list(offsets.shape)}")
        _check_plan_map(pl, plan_map, layer)
    if not mode.per_batch and mode.waterfill is not None and not mode.plan:
        if phys_ids is None or tuple(phys_ids.shape) != tuple(topk_ids.shape):
            raise ValueError(f"mode {mode.name} needs phys_ids shaped like topk_ids (SGLang's physical ids)")
    if phys_ids is not None:
        if tuple(phys_ids.shape) != tuple(topk_ids.shape):
            raise ValueError(f"phys_ids must be shaped like topk_ids {list(topk_ids.shape)}, got {list(phys_ids.shape)}")
        check_topk_ids(phys_ids, pl.num_physical, "phys_ids")
    if gathered is not None:
        W = stats_width(pl, mode)
        if gathered.dim() != 2 or gathered.shape[1] != W or not 1 <= gathered.shape[0] <= pl.num_ranks:
            raise ValueError(f"gathered must be [ranks, {W}] local_stats rows for mode {mode.name}, got {list(gathered.shape)}")
        if not mode.collective:
            raise ValueError(f"mode {mode.name} has no collective; pass gathered=None")
        if source_rank >= gathered.shape[0]:
            raise ValueError(f"source_rank {source_rank} out of range for {gathered.shape[0]} gathered rows")


def balance_layer(
    pl: Placement,
    topk_ids: torch.Tensor,
    mode: BalanceMode,
    *,
    layer: int = 0,
    source_rank: int = 0,
    plan_map: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    gathered: torch.Tensor | None = None,
    phys_ids: torch.Tensor | None = None,
    cost: CostModel | None = None,
    steps: SplitSteps = FLOAT_STEPS,
    check: bool = True,
) -> LayerDispatch:
    """Decide physical ids (and shared-expert ranks) for this rank's tokens of one layer.

    Args:
        pl: placement (single- or multi-layer; ``layer`` picks the row).
        topk_ids: ``[T, k]`` logical ids of this rank's tokens (-1 = padding).
        mode: what to do, ungated (``BalanceMode``; a gated mode's ``opened`` or ``closed``);
            ``mode.lplb == "off"`` keeps ``phys_ids``.
        source_rank: this rank's index in the EP group.
        plan_map: ``[E, W]`` the plan's map at this batch's level for this layer (``lplb="plan"``).
        offsets: ``[>= T, k]`` hash slots (``plan.hash_offsets``) for ``lplb="plan"``.
        gathered: ``[D, W]`` all-gathered ``local_stats`` rows (global sync), or None
            (local sync, or tokens that are already global as without an a2a backend).
        phys_ids: ``[T, k]`` physical ids already decided: SGLang's (LPLB off, Waterfill only),
            or the plan's when the caller gathered them first (global-sync Waterfill on a plan).
        cost: the cost model; required by the tile objective (its ``tile_tokens``).
        steps: split-and-round arithmetic (float64 + HiGHS by default).
        check: validate the arguments first (host-side checks; the graph-safe path skips them).
    Returns:
        ``LayerDispatch``.
    """
    if check:
        _check(pl, topk_ids, mode, layer, source_rank, plan_map, offsets, gathered, phys_ids)
    R, S = pl.num_ranks, pl.slots_per_rank
    lp = pl.layer(layer)
    if mode.plan and phys_ids is None:
        phys_ids = apply_plan(plan_map, topk_ids, offsets)
    if mode.plan and mode.waterfill is None:
        return LayerDispatch(phys_ids, None, None, True)
    st = layer_stats(lp, topk_ids, mode, source_rank, gathered, phys_ids)
    routed, tokens = st.routed, st.tokens
    quotas = shared_q = None
    cert: torch.Tensor | bool = True
    if mode.per_batch:
        tile = effective_tile(mode, cost, R)
        if mode.waterfill == "all_rank":
            fpl = lp.with_shared_expert
            c_ext = torch.cat([st.counts.to(torch.long), tokens.sum().reshape(1)])
            q_ext, cert = split_step(fpl, c_ext[None], tile, steps)
            q_ext = q_ext.reshape(R, S + 1)
            quotas, shared_q = q_ext[:, :S].reshape(-1), q_ext[:, S]
        else:
            quotas, cert = split_step(lp, st.counts[None].to(torch.long), tile, steps)
            quotas = quotas.reshape(-1)
        cert = cert.reshape(())
        phys_ids = dispatch_step(lp, topk_ids, quotas, st.offsets)
        routed = lp.rank_loads(quotas)
    if mode.waterfill is None:
        return LayerDispatch(phys_ids, None, quotas, cert)
    shared_rank = waterfill_ranks(phys_ids, R, S, source_rank, mode.waterfill, routed, tokens, shared_q)
    return LayerDispatch(phys_ids, shared_rank, quotas, cert)
