"""Split tables for the EPLB rebalance cycle: which recorded steps count, the solve, the score.

One function per fact, shared by the plugin's rebalance (``plugin/rebalance.py``) and
``replay``: ``window_steps`` picks the steps a table is solved on, ``solve_table`` solves a
layer's table on them (the scenario LP, ``lp_split.scenario_split``), ``table_balancedness``
scores a table on them (``metrics.balancedness``).
"""

from __future__ import annotations

import torch

from .lp_split import even_fractions, fractions_to_split, scenario_split
from .metrics import mean_balancedness
from .placement import Placement

__all__ = ["MAX_STEPS", "window_steps", "solve_table", "table_balancedness", "even_table"]

MAX_STEPS = 64  # most recent non-empty recorded steps entering each layer's scenario LP


def window_steps(window_layer: torch.Tensor, max_steps: int = MAX_STEPS) -> torch.Tensor:
    """Recorded steps ``[T, E]`` of one layer with at least one token, the most recent ``max_steps``."""
    w = window_layer.to(torch.float64)
    w = w[w.sum(-1) > 0]
    return w[-max_steps:]


def even_table(pl: Placement) -> torch.Tensor:
    """The table before any window is solved: the even split, ``[P]`` (one layer) or ``[L, P]``."""
    f = even_fractions(pl)
    return f[0] if pl.single_layer else f


def solve_table(pl: Placement, window_layer: torch.Tensor, *, strict: bool = True) -> torch.Tensor:
    """One layer's split fractions ``[P]`` from its recorded steps ``[T, E]``.

    ``pl`` is single-layer. With ``strict`` a failed LP raises ``lp_split.SplitError`` (the
    caller keeps the plan it has); otherwise that layer gets the even split."""
    steps = window_steps(window_layer)
    if steps.shape[0] == 0:
        return even_table(pl)
    return scenario_split(pl, steps, max_steps=MAX_STEPS, strict=strict)


def table_balancedness(pl: Placement, table: torch.Tensor, window_layer: torch.Tensor) -> float | None:
    """Mean balancedness of the window's steps when ``table`` splits each step's counts (None: empty window)."""
    w = window_steps(window_layer)
    if w.shape[0] == 0:
        return None
    loads = torch.stack([pl.rank_loads(fractions_to_split(pl, table.cpu(), counts)) for counts in w])
    return mean_balancedness(loads)
