"""The placement timeline: which expert placement and which dispatch plans serve each step.

Placement follows the server: an initial map (SGLang's EPLB on calibration counts, a
recorded map, the trivial one, or EPLB on the first window), then every ``rebalance_every``
steps SGLang's EPLB on the last ``window`` steps' counts. With ``placement="decode"`` our
modes run on EPLB's result after ``decode_placement.decode_aware_placement`` (same replica
counts, copies moved so plans can switch them off evenly); SGLang's own modes always run on
EPLB's placement, as a server without this package would.

Plans (``plan.solve_plans``) are solved as the plugin solves them: at every rebalance, and
refreshed every ``plan_refresh`` steps in between (no weights move), each from the last
``plan_window`` steps' recorded counts; the first from the initial placement's window
(calibration counts, or uniform shares when there are none).

Placements and plans depend only on the recorded counts (from the read stage), never on a
mode's decisions, so the whole timeline is built first, in order, and every step can then be
evaluated on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cost import CostModel
from ..decode_placement import decode_aware_placement, logical_to_all_physical
from ..placement import Placement
from ..plan import DEFAULT_HASH_SLOTS, DEFAULT_LEVELS, PlanSet, plan_maps, solve_plans
from .bounds import SubsetBound
from .sources import Trace

__all__ = ["PlacementState", "PlanState", "Timeline", "PLACEMENTS", "resolve_init", "build_timeline"]

PLACEMENTS = ("eplb", "decode")  # resolved values (decode_placement.resolve_placement maps "auto")


@dataclass
class PlacementState:
    """One installed placement: ours (``pl`` ``[L, P]``, SGLang's dispatch state on it ``up``,
    the bound matrices), SGLang's own (``ref_pl``, ``ref_up``: the same objects unless a
    post-step moved copies) and how it came about."""

    pl: Placement
    up: object
    bounds: SubsetBound
    how: str
    ref_pl: Placement
    ref_up: object


@dataclass
class PlanState:
    """Plans solved on placement ``states[state]`` from the recorded steps ``window`` (start, end):
    ``plans`` and their maps ``[B, L, E, W]``; ``solve_s``: seconds the solve took here."""

    state: int
    plans: PlanSet
    maps: torch.Tensor
    window: tuple[int, int]
    how: str
    solve_s: float


@dataclass
class Timeline:
    """states, ``state_of_step[t]`` (index into states), the rebalance steps, the initial placement
    used; plans and ``plan_of_step[t]`` (empty without plan modes)."""

    states: list[PlacementState]
    state_of_step: list[int]
    rebalance_steps: list[int]
    init_used: str
    plans: list[PlanState]
    plan_of_step: list[int]


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


def _initial_window(trace: Trace, counts: torch.Tensor, init: str, window: int, L: int, E: int) -> torch.Tensor | None:
    """The counts ``[T, L, E]`` the initial placement came from (None: it came from none)."""
    if init == "calibration":
        return trace.calibration.to(torch.float64).reshape(L, E)[None]
    if init == "first-window":
        return counts[: min(window, trace.num_steps)]
    return None


def _initial_map(trace: Trace, init: str, up, w0: torch.Tensor | None, P: int):
    """(p2l, l2p or None, how) of the initial placement."""
    E, L = trace.num_logical, trace.num_layers
    if init == "calibration":
        p2l, l2p = up.rebalance(w0)
        return p2l, l2p, "SGLang EPLB on the calibration counts"
    if init == "recorded":
        return trace.recorded_placement, None, "the recorded physical_to_logical_map"
    if init == "trivial":
        return (torch.arange(P) % E).repeat(L, 1), None, "trivial (slot p holds expert p mod E)"
    p2l, l2p = up.rebalance(w0)
    return p2l, l2p, f"SGLang EPLB on the first {w0.shape[0]} steps (peeks ahead)"


@dataclass(frozen=True)
class PlanOptions:
    """How plans are made: the cost model, top-k, levels, hash slots, refresh cadence and window
    (steps; ``refresh`` 0 = only at rebalance)."""

    cost: CostModel
    top_k: int
    refresh: int
    window: int
    levels: tuple[int, ...] = DEFAULT_LEVELS
    hash_slots: int = DEFAULT_HASH_SLOTS


def build_timeline(trace: Trace, counts: torch.Tensor, *, up, ep_size: int, num_physical: int, init: str,
                   rebalance_every: int, window: int, placement: str = "eplb", cost: CostModel | None = None,
                   plans: PlanOptions | None = None) -> Timeline:
    """Placements (and plans) of every step from the counts ``[N, L, E]`` of the read stage, in order."""
    E, L, N, R = trace.num_logical, trace.num_layers, trace.num_steps, ep_size
    if placement not in PLACEMENTS:
        raise ValueError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")

    def state(p2l, l2p, w, how) -> PlacementState:
        ref = Placement(p2l, R, E)
        ref_up = up.install(p2l, l2p)
        if placement == "decode" and w is not None and l2p is not None:
            ours = decode_aware_placement(p2l, w, R, top_k=trace.top_k, cost=cost)
            if not torch.equal(ours, p2l.to(ours.dtype)):
                pl = Placement(ours, R, E)
                return PlacementState(pl, up.install(ours, logical_to_all_physical(ours, E)), SubsetBound(pl),
                                      how + " + decode-aware post-step", ref, ref_up)
        return PlacementState(ref, ref_up, SubsetBound(ref), how, ref, ref_up)

    w0 = _initial_window(trace, counts, init, window, L, E)
    p2l, l2p, how = _initial_map(trace, init, up, w0, num_physical)
    states = [state(p2l, l2p, w0, how)]
    state_of_step, rebalance_steps = [], []
    plan_states: list[PlanState] = []
    plan_of_step: list[int] = []

    def solve(t: int, w: torch.Tensor | None, span: tuple[int, int], label: str) -> None:
        t0 = time.perf_counter()
        pl = states[-1].pl
        win = w if w is not None and w.numel() and float(w.sum()) > 0 else torch.ones(L, E)
        ps = solve_plans(pl, win, plans.cost, top_k=plans.top_k, levels=plans.levels, hash_slots=plans.hash_slots)
        plan_states.append(PlanState(len(states) - 1, ps, plan_maps(pl, ps.weights, ps.hash_slots), span, label,
                                     time.perf_counter() - t0))

    if plans is not None:
        solve(0, w0, (0, 0), "initial" if w0 is not None else "initial (uniform shares)")
    for t in range(N):
        rebalanced = bool(rebalance_every and t > 0 and t % rebalance_every == 0)
        if rebalanced:
            w = counts[max(0, t - window) : t]
            p2l, l2p = up.rebalance(w)
            states.append(state(p2l, l2p, w, "rebalance"))
            rebalance_steps.append(t)
        if plans is not None and t > 0 and (rebalanced or (plans.refresh and t % plans.refresh == 0)):
            lo = max(0, t - plans.window)
            solve(t, counts[lo:t], (lo, t), "rebalance" if rebalanced else "refresh")
        state_of_step.append(len(states) - 1)
        if plans is not None:
            plan_of_step.append(len(plan_states) - 1)
    return Timeline(states, state_of_step, rebalance_steps, init, plan_states, plan_of_step)
