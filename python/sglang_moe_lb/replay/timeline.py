"""The placement timeline: which expert placement (and split table) serves each step.

Placement follows the server: an initial map (SGLang's EPLB on calibration counts, a
recorded map, the trivial one, or EPLB on the first window), then every ``rebalance_every``
steps SGLang's EPLB on the last ``window`` steps' counts. ``lplb/table`` modes get a split
table solved at the same moments, as the plugin's rebalance does (``table.solve_table`` per
layer over the window; ``table.even_table`` until the first rebalance).

A placement depends only on the recorded counts (from the read stage), never on a mode's
decisions, so the whole timeline is built first, in order, and every step can then be
evaluated on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..placement import Placement
from ..table import even_table, solve_table
from .bounds import SubsetBound
from .sources import Trace

__all__ = ["PlacementState", "Timeline", "resolve_init", "build_timeline", "split_tables"]

@dataclass
class PlacementState:
    """One installed placement: ours (``pl``, ``[L, P]``), SGLang's dispatch state (``up``),
    the LPLB split tables ``[L, P]`` (None when no table mode runs), the bound matrices and
    how it came about."""

    pl: Placement
    up: object
    tables: torch.Tensor | None
    bounds: SubsetBound
    how: str


@dataclass
class Timeline:
    """states, ``state_of_step[t]`` (index into states), the rebalance steps, the initial placement used."""

    states: list[PlacementState]
    state_of_step: list[int]
    rebalance_steps: list[int]
    init_used: str


def resolve_init(trace: Trace, init: str, L: int, P: int) -> tuple[str, list[str]]:
    """The initial placement ``auto`` stands for, or the one asked for if this input has it.

    Returns (init, notes); raises ``ValueError`` naming ``--init-placement``."""
    rp = trace.recorded_placement
    fits = rp is not None and tuple(rp.shape) == (L, P)
    notes = []
    if init == "auto":
        init = "calibration" if trace.calibration is not None else ("recorded" if fits else "trivial")
        if init == "trivial" and rp is not None:
            notes.append(
                f"the input's recorded map has shape {list(rp.shape)}, not [layers, experts + --redundant-experts] = "
                f"{[L, P]}; starting from the trivial placement instead"
            )
    elif init == "calibration" and trace.calibration is None:
        raise ValueError("--init-placement calibration: this input has no calibration counts")
    elif init == "recorded" and not fits:
        raise ValueError(
            f"--init-placement recorded: the input's map has shape {None if rp is None else list(rp.shape)}, "
            f"the simulation needs {[L, P]} (layers, experts + --redundant-experts)"
        )
    return init, notes


def split_tables(pl: Placement, window: torch.Tensor | None) -> torch.Tensor:
    """``[L, P]`` split tables: each layer's ``solve_table`` over ``window [T, L, E]``, or the
    even split without a window. A layer whose LP fails gets the even split, as the plugin's
    first plan (there is no older table for a new placement)."""
    if window is None or window.shape[0] == 0:
        return even_table(pl).reshape(pl.num_layers, pl.num_physical)
    return torch.stack([solve_table(pl.layer(i), window[:, i], strict=False).reshape(-1)
                        for i in range(pl.num_layers)])


def _initial_map(trace: Trace, counts: torch.Tensor, init: str, up, window: int, E: int, L: int, P: int):
    """(p2l, l2p or None, how) of the initial placement."""
    if init == "calibration":
        p2l, l2p = up.rebalance(trace.calibration.to(torch.float64).reshape(L, E)[None])
        return p2l, l2p, "SGLang EPLB on the calibration counts"
    if init == "recorded":
        return trace.recorded_placement, None, "the recorded physical_to_logical_map"
    if init == "trivial":
        return (torch.arange(P) % E).repeat(L, 1), None, "trivial (slot p holds expert p mod E)"
    n = min(window, trace.num_steps)
    p2l, l2p = up.rebalance(counts[:n])
    return p2l, l2p, f"SGLang EPLB on the first {n} steps (peeks ahead)"


def build_timeline(trace: Trace, counts: torch.Tensor, *, up, ep_size: int, num_physical: int, init: str,
                   rebalance_every: int, window: int, with_tables: bool) -> Timeline:
    """Placements of every step from the counts ``[N, L, E]`` of the read stage, in order."""
    E, L, N, R = trace.num_logical, trace.num_layers, trace.num_steps, ep_size

    def state(p2l, l2p, w, how) -> PlacementState:
        pl = Placement(p2l, R, E)
        tables = split_tables(pl, w) if with_tables else None
        return PlacementState(pl, up.install(p2l, l2p), tables, SubsetBound(pl), how)

    p2l, l2p, how = _initial_map(trace, counts, init, up, window, E, L, num_physical)
    states = [state(p2l, l2p, None, how)]
    state_of_step, rebalance_steps = [], []
    for t in range(N):
        if rebalance_every and t > 0 and t % rebalance_every == 0:
            w = counts[max(0, t - window) : t]
            p2l, l2p = up.rebalance(w)
            states.append(state(p2l, l2p, w, "rebalance"))
            rebalance_steps.append(t)
        state_of_step.append(len(states) - 1)
    return Timeline(states, state_of_step, rebalance_steps, init)
