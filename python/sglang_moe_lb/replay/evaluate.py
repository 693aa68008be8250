"""The *evaluate* stage: one step's batch through every mode, as tokens per slot.

The simulated EP group has ``R`` ranks, each also a DP-attention rank owning a slice of every
batch's tokens (its *source* tokens). Per MoE layer:

1. SGLang maps each rank's logical ids to physical ids (``static``: the rank's own
   nearest-copy table; ``dynamic``: a random copy, seeded per step and layer), optionally
   followed by SGLang's ``WaterfillBalancer`` (``upstream-waterfill*``), on SGLang's own
   placement (``PlacementState.ref_pl``).
2. Our modes call ``chain.balance_layer`` once per rank, exactly as the server plugin does,
   on our placement: global sync with the stacked int32 ``local_stats`` rows of all ranks (the
   one all-gather), local sync with ``gathered=None``. Waterfill alone runs on SGLang's static
   ids; a plan on the step's plans at the level of the batch's largest DP rank.
   One ``MemoSteps`` per step is passed as the chain's ``steps``: each distinct split problem
   is solved once (all of the step's problems batched ahead, ``prewarm``), and every rank
   still runs the whole chain.
3. Every mode's result becomes tokens per slot in the fused layout ``[R, S + 1]``: routed
   tokens received by each copy, and in column ``S`` the shared-expert tokens run on that
   rank (the source rank unless a Waterfill mode moves them). Every mode does the same total
   work, ``(k + 1) * tokens``; loads, tiles and modelled time all derive from these slots.
4. The per-batch LP bounds (``bounds.layer_bounds``) on the same placement.

Gated modes are not evaluated here: per batch they are their opened form (the per-batch
split) or their closed form (the plan, or ``static`` for a per-batch schedule), decided from
the batch size (``aggregate.gate_open``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..chain import balance_layer, effective_tile, layer_stats, local_stats
from ..cost import CostModel
from ..mode import BalanceMode
from ..objective import FloatSteps, SplitSteps, tile_units
from ..placement import Placement
from ..plan import apply_plan, hash_offsets, level_index
from .bounds import layer_bounds
from .memo import MemoSteps
from .mode_names import ReplayMode
from .pool import cpu_count, run_jobs
from .read import Read, count_layers
from .sources import Batch, Trace
from .timeline import PlacementState, PlanState, Timeline

if TYPE_CHECKING:
    from .setup import ReplayConfig, Setup

__all__ = ["EvalContext", "StepResult", "StepArrays", "evaluate_step", "evaluate_all", "make_context",
           "worker_count", "split_sizes", "fused_slots"]


@dataclass
class EvalContext:
    """What every step's evaluation needs (shared by forked workers)."""

    modes: tuple[ReplayMode, ...]  # ungated modes to evaluate, static first
    up: object  # UpstreamSGLang
    timeline: Timeline
    cost: CostModel
    steps: SplitSteps
    E: int
    L: int
    R: int
    S: int
    seed: int = 0
    memo: bool = True
    upstream_steps: frozenset = frozenset()  # steps where SGLang's Waterfill runs
    with_bounds: bool = True
    offsets: dict = field(default_factory=dict)  # (rows, k, rank, W) -> plan.hash_offsets, built once per process


@dataclass
class StepResult:
    """slots: mode -> ``[L, R, S + 1]`` int64 tokens per fused slot; cpu_s: mode -> rank 0's
    decision time for the whole step (this CPU); bounds: ``joint/local/routed`` -> ``[L]``;
    tokens: ``[R]`` tokens per source rank (rows of the batch)."""

    slots: dict[str, np.ndarray]
    cpu_s: dict[str, float]
    bounds: dict[str, np.ndarray] | None
    tokens: np.ndarray
    memo_hits: int = 0
    memo_misses: int = 0


def split_sizes(T: int, R: int, sizes: list[int] | None) -> list[int]:
    """Tokens per source rank: the batch's own split when it fits, else even (first ranks +1)."""
    if sizes is not None and len(sizes) == R and sum(sizes) == T:
        return list(sizes)
    base, extra = divmod(T, R)
    return [base + (1 if r < extra else 0) for r in range(R)]


def fused_slots(phys: list[torch.Tensor], shared: list[torch.Tensor] | None, valid: list[torch.Tensor],
                R: int, S: int) -> torch.Tensor:
    """Tokens per fused slot ``[R, S + 1]`` from per-rank physical ids ``[T_r, k]`` and shared-
    expert ranks ``[T_r]`` (None: the source rank); ``valid [T_r]`` marks tokens with a route."""
    ids = torch.cat([p.reshape(-1) for p in phys])
    routed = torch.bincount(ids[ids >= 0], minlength=R * S).reshape(R, S)
    if shared is None:
        sh = torch.tensor([int(v.sum()) for v in valid], dtype=torch.long)
    else:
        s = torch.cat([x[v] for x, v in zip(shared, valid)])
        sh = torch.bincount(s[s >= 0], minlength=R)
    return torch.cat([routed, sh[:, None]], 1)


def _upstream_slots(fused: list[torch.Tensor], R: int, S: int) -> torch.Tensor:
    """SGLang's Waterfill output ``[T_r, k + 1]`` per rank is already in the fused layout."""
    ids = torch.cat([f.reshape(-1) for f in fused])
    return torch.bincount(ids[ids >= 0], minlength=R * (S + 1)).reshape(R, S + 1)


class _Rows:
    """The stacked ``local_stats`` rows of one layer (the all-gather), built once per kind:
    logical counts (per-batch split), or routed loads of fixed physical ids (SGLang's static
    ids, or the plan's)."""

    def __init__(self, pl, parts, static_phys, plan_phys):
        self.pl, self.parts, self.static_phys, self.plan_phys = pl, parts, static_phys, plan_phys
        self._rows: dict[str, torch.Tensor] = {}

    def get(self, mode: BalanceMode) -> torch.Tensor:
        kind = "logical" if mode.per_batch else "plan" if mode.plan else "static"
        if kind not in self._rows:
            phys = {"logical": [None] * len(self.parts), "plan": self.plan_phys, "static": self.static_phys}[kind]
            self._rows[kind] = torch.stack([local_stats(self.pl, p, mode, phys[r]) for r, p in enumerate(self.parts)])
        return self._rows[kind]


@dataclass
class LayerInputs:
    """One layer of a batch as the ranks see it: the layer's placement (ours), each source rank's
    ids ``[T_r, k]`` and valid-token mask ``[T_r]``, SGLang's static physical ids per rank on our
    placement and on SGLang's (the same list when they are one placement; with the seconds per
    rank they took), the plan's physical ids per rank (None without plans), and the all-gather rows."""

    layer: int
    lp: Placement
    parts: list
    valid: list
    static_phys: list
    ref_static_phys: list
    t_static: float
    plan_phys: list | None
    rows: _Rows


def _offsets(ctx: EvalContext, rows: int, k: int, salt: int, W: int) -> torch.Tensor:
    key = (rows, k, salt, W)
    if key not in ctx.offsets:
        ctx.offsets[key] = hash_offsets(rows, k, W, salt=salt)
    return ctx.offsets[key]


def layer_inputs(ctx: EvalContext, state: PlacementState, plans: PlanState | None, layer: int, ids: torch.Tensor,
                 sizes: list[int]) -> LayerInputs:
    lp = state.pl.layer(layer)
    parts = list(torch.split(ids, sizes))
    t0 = time.perf_counter()
    ref_phys = [ctx.up.to_physical(p, state.ref_up.static_info[r][layer]) for r, p in enumerate(parts)]
    t_static = (time.perf_counter() - t0) / ctx.R
    static_phys = ref_phys if state.up is state.ref_up else [
        ctx.up.to_physical(p, state.up.static_info[r][layer]) for r, p in enumerate(parts)]
    plan_phys = None
    if plans is not None:
        level = level_index(plans.plans.levels, max(sizes))  # the largest DP rank's tokens: rank-consistent
        m = plans.maps[level, layer]
        W = plans.plans.hash_slots
        plan_phys = [apply_plan(m, p.clamp(min=0), _offsets(ctx, p.shape[0], p.shape[1], r, W)).masked_fill(p < 0, -1)
                     for r, p in enumerate(parts)]
    return LayerInputs(layer, lp, parts, [(p >= 0).any(1) for p in parts], static_phys, ref_phys, t_static,
                       plan_phys, _Rows(lp, parts, static_phys, plan_phys))


def prewarm(ctx: EvalContext, inputs: list[LayerInputs], memo: MemoSteps) -> None:
    """Predict every per-batch split problem of the step the way the chain derives it
    (``chain.layer_stats``, ``effective_tile``, ``tile_units``; ``all_rank``: the fused
    placement with the shared expert's tokens appended) and solve them batched
    (``MemoSteps.solve_many``). Global sync: one problem per layer; local: one per rank."""
    problems = []
    for m in ctx.modes:
        b = m.balance
        if b is None or not b.per_batch:
            continue
        tile = effective_tile(b, ctx.cost, ctx.R)
        for li in inputs:
            gathered = li.rows.get(b) if b.collective else None
            for r in ([0] if gathered is not None else range(ctx.R)):
                st = layer_stats(li.lp, li.parts[r], b, r, gathered, None)
                if b.waterfill == "all_rank":
                    pl, c = li.lp.with_shared_expert, torch.cat([st.counts.to(torch.long), st.tokens.sum().reshape(1)])
                else:
                    pl, c = li.lp, st.counts.to(torch.long)
                problems.append((pl, c[None] if tile == 1 else tile_units(c[None], tile)))
    memo.solve_many(problems)


def _ours(ctx: EvalContext, li: LayerInputs, mode: BalanceMode, steps):
    """Every rank's ``balance_layer`` call for one of our modes: (phys ids, shared ranks or None, rank 0's s).

    A plan's ids were gathered once per rank (``layer_inputs``: the same gather every plan mode
    runs); they are passed as the chain's ``phys_ids``."""
    gathered = li.rows.get(mode) if mode.collective else None
    phys, shared, dt = [], [], 0.0
    for r, ids in enumerate(li.parts):
        own_phys = li.plan_phys[r] if mode.plan else None if mode.per_batch else li.static_phys[r]
        if r == 0 and isinstance(steps, MemoSteps):
            steps.take_credit()  # hits before this call belong to other modes' ranks
        t0 = time.perf_counter()
        if r == 0 and gathered is not None:
            local_stats(li.lp, ids, mode, own_phys)  # rank 0's own row of the all-gather
        d = balance_layer(li.lp, ids, mode, source_rank=r, gathered=gathered, phys_ids=own_phys, cost=ctx.cost,
                          steps=steps)
        if r == 0:
            dt = time.perf_counter() - t0 + (steps.take_credit() if isinstance(steps, MemoSteps) else 0.0)
        phys.append(d.phys_ids)
        shared.append(d.shared_rank)
    return phys, (None if mode.waterfill is None else shared), dt


def _evaluate_layer(ctx: EvalContext, state: PlacementState, t: int, li: LayerInputs, steps,
                    run_upstream: bool) -> tuple[dict, dict]:
    """(slots per mode ``[R, S + 1]``, rank-0 seconds per mode) of one layer."""
    R, S, up, layer = ctx.R, ctx.S, ctx.up, li.layer
    slots, cpu = {}, {}
    for m in ctx.modes:
        shared = None
        if m.sglang == "static":
            phys, dt = li.ref_static_phys, li.t_static
        elif m.sglang == "dynamic":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((ctx.seed * 1_000_003 + t * 131 + layer) % (2**63))
                t0 = time.perf_counter()
                phys = [up.to_physical(p, state.ref_up.dynamic_info[r][layer]) for r, p in enumerate(li.parts)]
                dt = (time.perf_counter() - t0) / R
        elif m.upstream_waterfill:
            if not run_upstream:
                continue
            t0 = time.perf_counter()
            fused = up.waterfill(li.ref_static_phys, layer, dynamic=m.sglang == "upstream-waterfill-dyn")
            cpu[m.name] = (time.perf_counter() - t0) / R
            slots[m.name] = _upstream_slots(fused, R, S)
            continue
        else:
            phys, shared, dt = _ours(ctx, li, m.balance, steps)
        slots[m.name] = fused_slots(phys, shared, li.valid, R, S)
        cpu[m.name] = dt
    return slots, cpu


def evaluate_step(ctx: EvalContext, t: int, batch: Batch) -> StepResult:
    """Every mode on step ``t``'s batch (module docstring)."""
    tl = ctx.timeline
    state = tl.states[tl.state_of_step[t]]
    plans = tl.plans[tl.plan_of_step[t]] if tl.plans else None
    topk = batch.topk.to(torch.long)
    sizes = split_sizes(topk.shape[1], ctx.R, batch.rank_sizes)
    run_upstream = t in ctx.upstream_steps
    names = [m.name for m in ctx.modes if run_upstream or not m.upstream_waterfill]
    slots = {n: np.zeros((ctx.L, ctx.R, ctx.S + 1), dtype=np.int64) for n in names}
    cpu = dict.fromkeys(names, 0.0)
    inputs = [layer_inputs(ctx, state, plans, layer, topk[layer], sizes) for layer in range(ctx.L)]
    steps = MemoSteps(ctx.steps) if ctx.memo else ctx.steps
    if ctx.memo:
        prewarm(ctx, inputs, steps)
    for li in inputs:
        s, c = _evaluate_layer(ctx, state, t, li, steps, run_upstream)
        for n in names:
            slots[n][li.layer] = s[n].numpy()
            cpu[n] += c[n]
    shared = torch.stack([torch.stack([v.sum() for v in li.valid]) for li in inputs]).to(torch.long)  # [L, R]
    bounds = None
    if ctx.with_bounds:
        bounds = {k: v.numpy() for k, v in layer_bounds(state.bounds, count_layers(topk, ctx.E), shared).items()}
    hits, misses = (steps.hits, steps.misses) if ctx.memo else (0, 0)
    return StepResult(slots, cpu, bounds, np.asarray(sizes, dtype=np.int64), hits, misses)


def make_context(setup: Setup, timeline: Timeline, upstream_steps, with_bounds: bool) -> EvalContext:
    """The evaluation's inputs for this run; SGLang's Waterfill runs on ``upstream_steps`` only."""
    return EvalContext(setup.eval_modes, setup.up, timeline, setup.cost, FloatSteps(setup.cfg.lp_method),
                       setup.E, setup.L, setup.R, setup.S, seed=setup.cfg.seed, memo=setup.cfg.memo,
                       upstream_steps=frozenset(upstream_steps), with_bounds=with_bounds)


@dataclass
class StepArrays:
    """Every step's evaluation, stacked: slots per mode ``[N, L, R, S+1]`` (NaN: not run),
    rank-0 CPU seconds per mode ``[N]``, bounds ``[N, L]``, tokens per source rank ``[N, R]``."""

    slots: dict[str, np.ndarray]
    cpu: dict[str, np.ndarray]
    bounds: dict[str, np.ndarray]
    tokens: np.ndarray
    memo_hits: int = 0
    memo_misses: int = 0

    @classmethod
    def empty(cls, modes, N: int, L: int, R: int, S: int) -> "StepArrays":
        return cls({m.name: np.full((N, L, R, S + 1), np.nan, dtype=np.float32) for m in modes},
                   {m.name: np.full(N, np.nan) for m in modes},
                   {k: np.zeros((N, L)) for k in ("joint", "local", "routed")}, np.zeros((N, R), dtype=np.int64))

    def put(self, i: int, res) -> None:
        for name, s in res.slots.items():
            self.slots[name][i] = s
            self.cpu[name][i] = res.cpu_s[name]
        if res.bounds is not None:
            for key, v in res.bounds.items():
                self.bounds[key][i] = v
        self.tokens[i] = res.tokens
        self.memo_hits += res.memo_hits
        self.memo_misses += res.memo_misses


def worker_count(cfg: ReplayConfig, jobs: int) -> int:
    """Worker processes for ``jobs`` independent jobs (``--workers``, default the CPU count)."""
    return max(1, min(cfg.workers or cpu_count(), jobs))


def evaluate_all(setup: Setup, trace: Trace, read: Read, timeline: Timeline) -> StepArrays:
    """Every mode on every step (sampled steps first, so the slow upstream ones are shared out)."""
    ctx = make_context(setup, timeline, setup.sampled_steps, with_bounds=True)
    out = StepArrays.empty(setup.eval_modes, setup.N, setup.L, setup.R, setup.S)
    order = sorted(range(setup.N), key=lambda t: (t not in ctx.upstream_steps, t))

    def task(t: int):
        return evaluate_step(ctx, t, read.batch(trace, t))

    progress = "replay" if setup.cfg.progress else None
    jobs = run_jobs(task, order, worker_count(setup.cfg, setup.N), setup.cfg.threads, progress)
    with contextlib.closing(jobs):
        for t, res in jobs:
            out.put(t, res)
    return out
