"""The metrics every report uses, defined once: balancedness, tiles, time ratios, gaps.

``balancedness`` is SGLang's utilisation rate (``expert_distribution.compute_utilization_rate``):
mean rank load over max rank load, per (step, layer), 1.0 when perfectly even; averaged over
layers and steps. The plugin's rebalance log and ``replay`` both report it this way.
"""

from __future__ import annotations

import torch

from .cost import CostModel

__all__ = ["balancedness", "mean_balancedness", "tile_loads", "gap_to_bound", "time_ratio"]


def balancedness(loads: torch.Tensor) -> torch.Tensor:
    """Mean over max of ``loads [..., R]`` -> float64 ``[...]``; 1.0 where nothing is loaded."""
    x = loads.to(torch.float64)
    top = x.amax(-1)
    return torch.where(top > 0, x.mean(-1) / torch.where(top > 0, top, 1.0), torch.ones_like(top))


def mean_balancedness(loads: torch.Tensor) -> float:
    """``balancedness`` averaged over every leading dimension (steps, layers): a float."""
    return float(balancedness(loads).mean()) if loads.numel() else 1.0


def tile_loads(q: torch.Tensor, cost: CostModel, slots_per_rank: int) -> torch.Tensor:
    """Grouped-GEMM tiles per rank from tokens per slot: ``[..., P] -> [..., R]`` long."""
    t = cost.tiles(q)
    return t.reshape(*t.shape[:-1], -1, slots_per_rank).sum(-1)


def gap_to_bound(achieved_max: torch.Tensor, bound_max: torch.Tensor) -> torch.Tensor:
    """``1 - bound / achieved`` (0 where nothing is loaded): how far from the LP optimum."""
    a = achieved_max.to(torch.float64)
    return torch.where(a > 0, 1.0 - bound_max.to(torch.float64) / torch.where(a > 0, a, 1.0), torch.zeros_like(a))


def time_ratio(times: torch.Tensor, reference: torch.Tensor) -> float:
    """Summed time over summed reference time (e.g. a mode's layer times over static's)."""
    ref = float(reference.to(torch.float64).sum())
    return float(times.to(torch.float64).sum()) / ref if ref > 0 else 1.0
