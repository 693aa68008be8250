"""Replay a trace through every mode, in stages: read -> timeline -> evaluate -> aggregate -> report.

* read: ``sources`` / ``dumps`` give a ``Trace`` (the caller), ``read.read_trace`` draws every
  batch once (in parallel) and counts it;
* setup (``make_setup``): every check that needs the trace's shapes, SGLang's layout, the cost
  model and the overheads, before any work;
* placement timeline (``timeline.build_timeline``): placements and dispatch plans of every step;
* evaluate (``evaluate.evaluate_step``, per step, in forked workers): tokens per fused slot
  of every mode, and the LP bounds;
* aggregate (``aggregate``): token metrics, modelled time with overhead, tile balancedness,
  gated modes;
* report (``report``): the table, JSON and plots.

``--batch-sweep`` repeats evaluate + aggregate at fixed batch sizes (``sweep``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import metrics
from ..decode_placement import PLACEMENT_CHOICES, resolve_placement
from ..mode import ModeError
from ..objective import FloatSteps
from ..plan import plan_cadence
from . import aggregate as agg
from .costs import CostOptions, build_cost_model, build_overheads, check_overheads
from .evaluate import EvalContext, evaluate_step
from .modes import ReplayMode, default_mode_names, parse_modes, server_default
from .pool import cpu_count, run_jobs
from .read import Read, read_trace
from .sources import Trace
from .sweep import evenly_spaced, sized_trace
from .timeline import PlanOptions, Timeline, build_timeline, resolve_init

__all__ = ["ReplayConfig", "ReplayResult", "Setup", "make_setup", "run_replay", "DEFAULT_MODES", "INIT_PLACEMENTS"]

DEFAULT_MODES = tuple(default_mode_names())
INIT_PLACEMENTS = ("auto", "calibration", "recorded", "trivial", "first-window")
AUTO_UPSTREAM_WATERFILL_STEPS = 4  # steps SGLang's Waterfill is scored on by default (Triton interpreter)
AUTO_SWEEP_UPSTREAM_STEPS = 1  # ... per batch size in a sweep
AUTO_SWEEP_UPSTREAM_MAX_TOKENS = 4096  # ... and only up to this many tokens per rank
AUTO_UPSTREAM_WATERFILL_MAX_EP = 16  # beyond this EP size it is skipped unless asked for
MAX_RESULT_BYTES = 4 << 30  # tokens per slot of every mode, step and layer, held for the aggregate


@dataclass
class ReplayConfig:
    """Simulation options (the CLI's flags of the same names)."""

    ep_size: int = 8
    redundant_experts: int = 16
    rebalance_every: int = 50
    window: int | None = None
    eplb_algorithm: str = "auto"
    num_groups: int | None = None
    nnodes: int = 1
    init_placement: str = "auto"
    modes: tuple[str, ...] = DEFAULT_MODES
    upstream_waterfill_steps: int | None = None  # None: 4 up to EP 16, else skipped (interpreter cost)
    lp_method: str = "fast"
    seed: int = 0
    threads: int = 1
    workers: int | None = None
    progress: bool = True
    cost: CostOptions = field(default_factory=CostOptions)
    batch_sweep: tuple[int, ...] = ()
    sweep_steps: int = 8
    memo: bool = True  # share each split problem's solve between ranks and modes (MemoSteps)
    placement: str = "auto"  # our modes' placement: eplb, decode (EPLB + the decode-aware post-step), or auto
    plan_refresh: int | None = None  # steps between plan refreshes (0: only at rebalance; None: rebalance_every / 4)
    plan_window: int | None = None  # recorded steps a plan is solved from (None: plan_refresh, at least 1)

    def plan_cadence(self) -> tuple[int, int]:
        """(refresh, window) in steps, defaults resolved."""
        return plan_cadence(self.rebalance_every or 0, self.plan_refresh, self.plan_window)

    def validate(self) -> None:
        """Flag values alone; raises ``ValueError`` naming the flag."""
        def at_least(name: str, v, lo) -> None:
            if v is not None and v < lo:
                raise ValueError(f"--{name} must be >= {lo}, got {v}")

        at_least("ep-size", self.ep_size, 1)
        at_least("redundant-experts", self.redundant_experts, 0)
        at_least("rebalance-every", self.rebalance_every, 0)
        at_least("window", self.window, 1)
        at_least("workers", self.workers, 1)
        at_least("threads", self.threads, 1)
        at_least("num-groups", self.num_groups, 1)
        at_least("nnodes", self.nnodes, 1)
        at_least("upstream-waterfill-steps", self.upstream_waterfill_steps, -1)
        at_least("sweep-steps", self.sweep_steps, 1)
        at_least("plan-refresh", self.plan_refresh, 0)
        at_least("plan-window", self.plan_window, 1)
        if self.placement not in PLACEMENT_CHOICES:
            raise ValueError(f"--placement must be one of {', '.join(PLACEMENT_CHOICES)}, got {self.placement!r}")
        self.replay_modes()
        if self.init_placement not in INIT_PLACEMENTS:
            raise ValueError(f"--init-placement must be one of {', '.join(INIT_PLACEMENTS)}, got {self.init_placement!r}")
        if self.lp_method not in ("highs", "fast"):
            raise ValueError(f"--lp-method must be highs or fast, got {self.lp_method!r}")
        if self.ep_size % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide --ep-size {self.ep_size}")
        if len(set(self.batch_sweep)) != len(self.batch_sweep) or any(n < 1 for n in self.batch_sweep):
            raise ValueError(f"--batch-sweep needs distinct sizes >= 1, got {list(self.batch_sweep)}")
        _check_eplb_algorithm(self.eplb_algorithm)
        self.cost.validate()

    def replay_modes(self) -> tuple[ReplayMode, ...]:
        try:
            return parse_modes(list(self.modes))
        except ModeError as err:
            msg = str(err)
            raise ValueError(msg if msg.startswith("--modes") else f"--modes: {msg}") from None


def _check_eplb_algorithm(name: str) -> None:
    from .upstream import ensure_triton_interpreter

    ensure_triton_interpreter()  # before anything imports Triton (SGLang does)
    from sglang.srt.eplb.eplb_algorithms import EplbAlgorithm

    known = ["auto"] + [a.name for a in EplbAlgorithm]
    if name not in known:
        raise ValueError(f"--eplb-algorithm must be one of SGLang's {', '.join(known)}; got {name!r}")


@dataclass
class ReplayResult:
    config: dict
    modes: dict
    bound: dict
    bound_local_shared: dict
    bound_routed: dict
    rebalance_steps: list
    phases: list
    sampled_steps: list
    notes: list
    skipped: dict
    wall_s: float
    sweep: list = field(default_factory=list)
    server_default: dict = field(default_factory=dict)
    series: dict = field(repr=False, default_factory=dict)
    worst: dict = field(repr=False, default_factory=dict)
    arrays: dict = field(repr=False, default_factory=dict)
    """Raw numbers (not in the JSON): ``slots[mode]`` ``[steps, L, R, S+1]`` tokens per fused slot,
    ``total[mode]`` / ``routed[mode]`` ``[steps, L, R]`` loads (NaN where not scored),
    ``bound_joint`` / ``bound_local`` / ``bound_routed`` ``[steps, L]`` LP max loads, ``tokens``
    ``[steps, R]``, ``placements`` (each ``[L, P]``) and ``state_of_step``."""

    def to_json(self, per_step: bool = True) -> dict:
        out = {
            "config": self.config,
            "server_default": self.server_default,
            "modes": self.modes,
            "bound": self.bound,
            "bound_local_shared": self.bound_local_shared,
            "bound_routed": self.bound_routed,
            "rebalance_steps": self.rebalance_steps,
            "phases": [{"start_step": s, "label": lab} for s, lab in self.phases],
            "sampled_steps": self.sampled_steps,
            "notes": self.notes,
            "skipped": self.skipped,
            "wall_s": round(self.wall_s, 3),
        }
        if self.sweep:
            out["sweep"] = self.sweep
        if per_step:
            out["per_step"] = {
                "balancedness": {k: [None if math.isnan(v) else round(float(v), 6) for v in s]
                                 for k, s in self.series.items()},
            }
        return out


# ---------------------------------------------------------------------------------------------
# Setup: every check before any work
# ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    cfg: ReplayConfig
    modes: tuple[ReplayMode, ...]  # as asked (gated ones included)
    eval_modes: tuple[ReplayMode, ...]  # what runs per step: ungated, static first
    E: int
    k: int
    L: int
    N: int
    R: int
    P: int
    S: int
    window: int
    init: str
    up: object
    cost: object
    cost_note: str
    overheads: object
    sampled_steps: list[int]
    notes: list[str]
    skipped: dict[str, str]
    seconds: float = 0.0  # time make_setup took (SGLang's import and context included)


def _eval_modes(modes: tuple[ReplayMode, ...]) -> tuple[ReplayMode, ...]:
    """What runs per step: every asked mode's opened form and, for gated ones, its closed form."""
    out: dict[str, ReplayMode] = {}
    for m in sorted(modes, key=lambda m: m.name != "static"):
        for form in (m.ungated, m.closed) if m.gated else (m,):
            out.setdefault(form.name, form)
    return tuple(out.values())


def _layout_checks(cfg: ReplayConfig, E: int, L: int, N: int, modes) -> int:
    """Shapes against the flags; returns P."""
    P = E + cfg.redundant_experts
    if P % cfg.ep_size:
        raise ValueError(f"{E} experts + {cfg.redundant_experts} redundant = {P} physical slots, "
                         f"not divisible by --ep-size {cfg.ep_size}")
    if cfg.num_groups is not None and E % cfg.num_groups:
        raise ValueError(f"--num-groups {cfg.num_groups} must divide the {E} experts")
    S = P // cfg.ep_size
    per_mode = N * L * cfg.ep_size * (S + 1) * 4
    need = per_mode * max(1, len(modes))
    if need > MAX_RESULT_BYTES:
        raise ValueError(
            f"{N} steps x {L} layers x {cfg.ep_size} ranks x {S + 1} slots x {len(modes)} modes would hold "
            f"{need / 2**30:.1f} GiB of results (limit {MAX_RESULT_BYTES / 2**30:.0f} GiB); use fewer --steps or --modes"
        )
    return P


def _dry_run_eplb(up, E: int, L: int) -> None:
    """SGLang's EPLB asserts on layouts it cannot place; try it once on a dummy window first."""
    try:
        up.rebalance(torch.ones(1, L, E, dtype=torch.float64))
    except Exception as err:  # noqa: BLE001 - SGLang asserts or raises anything on a layout it cannot place
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"SGLang's EPLB ({up.algorithm.name}) cannot place {E} experts on this layout "
            f"(--ep-size, --redundant-experts, --num-groups, --nnodes, --eplb-algorithm): {detail}"
        ) from None


def _upstream_sampling(cfg: ReplayConfig, modes, up, R: int, N: int, notes: list, skipped: dict) -> tuple:
    """(modes without skipped upstream Waterfill, steps where it runs)."""
    upstream = [m for m in modes if m.upstream_waterfill]
    if not upstream:
        return modes, []
    reason = None
    if up.note:
        reason = up.note
    elif R & (R - 1):
        reason = f"SGLang's Waterfill kernel needs a power-of-two EP size (tl.arange over ranks); got {R}"
    elif cfg.upstream_waterfill_steps == 0:
        reason = "skipped by --upstream-waterfill-steps 0"
    elif cfg.upstream_waterfill_steps is None and R > AUTO_UPSTREAM_WATERFILL_MAX_EP:
        reason = (f"too slow at EP {R}: SGLang's Waterfill kernel unrolls over the ranks and runs in the Triton "
                  f"interpreter on CPU; pass --upstream-waterfill-steps K to run it on K steps anyway")
    if reason:
        for m in upstream:
            skipped[m.name] = reason
        return tuple(m for m in modes if not m.upstream_waterfill), []
    k = AUTO_UPSTREAM_WATERFILL_STEPS if cfg.upstream_waterfill_steps is None else cfg.upstream_waterfill_steps
    sampled = evenly_spaced(N, k)
    if len(sampled) < N:
        notes.append(
            f"upstream Waterfill runs SGLang's Triton kernels in the Triton interpreter on CPU "
            f"(~0.1-0.3 s per rank and layer), so it is scored on {len(sampled)} evenly spaced steps {sampled}; "
            f"its time ratio and gaps compare against the other modes on those same steps (see 'on_sampled_steps')."
        )
    return modes, sampled


def make_setup(trace: Trace, cfg: ReplayConfig) -> Setup:
    """Every check that needs the trace (shapes, SGLang's layout, cost model, overheads)."""
    from .upstream import UpstreamSGLang

    t0 = time.perf_counter()
    cfg.validate()
    modes = cfg.replay_modes()
    E, k, L, N, R = trace.num_logical, trace.top_k, trace.num_layers, trace.num_steps, cfg.ep_size
    P = _layout_checks(cfg, E, L, N, modes)
    S = P // R
    init, notes = resolve_init(trace, cfg.init_placement, L, P)
    notes = list(trace.info.get("notes", [])) + notes
    cost, cost_note = build_cost_model(cfg.cost, trace.info)
    overheads = build_overheads(cfg.cost)
    check_overheads(overheads, modes, R)
    up = UpstreamSGLang(num_logical=E, num_physical=P, ep_size=R, num_layers=L,
                        eplb_algorithm=cfg.eplb_algorithm, num_groups=cfg.num_groups, nnodes=cfg.nnodes)
    _dry_run_eplb(up, E, L)
    skipped: dict[str, str] = {}
    modes, sampled = _upstream_sampling(cfg, modes, up, R, N, notes, skipped)
    window = cfg.window or cfg.rebalance_every or N
    return Setup(cfg, modes, _eval_modes(modes), E, k, L, N, R, P, S, window, init, up, cost, cost_note, overheads,
                sampled, notes, skipped, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Evaluate every step
# ---------------------------------------------------------------------------------------------
def _context(setup: Setup, timeline: Timeline, upstream_steps, with_bounds: bool) -> EvalContext:
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


def _workers(cfg: ReplayConfig, jobs: int) -> int:
    return max(1, min(cfg.workers or cpu_count(), jobs))


def evaluate_all(setup: Setup, trace: Trace, read: Read, timeline: Timeline) -> StepArrays:
    """Every mode on every step (sampled steps first, so the slow upstream ones are shared out)."""
    ctx = _context(setup, timeline, setup.sampled_steps, with_bounds=True)
    out = StepArrays.empty(setup.eval_modes, setup.N, setup.L, setup.R, setup.S)
    order = sorted(range(setup.N), key=lambda t: (t not in ctx.upstream_steps, t))

    def task(t: int):
        return evaluate_step(ctx, t, read.batch(trace, t))

    jobs = run_jobs(task, order, _workers(setup.cfg, setup.N), setup.cfg.threads, "replay" if setup.cfg.progress else None)
    with contextlib.closing(jobs):
        for t, res in jobs:
            out.put(t, res)
    return out


# ---------------------------------------------------------------------------------------------
# Aggregate
# ---------------------------------------------------------------------------------------------
def _mode_slots(setup: Setup, arr: StepArrays, tokens_per_rank: np.ndarray) -> tuple[dict, dict, dict]:
    """(slots, gate-open mask, overhead µs per step) of every asked mode; gated ones derived."""
    c = setup.cfg.cost
    f64: dict[str, np.ndarray] = {}  # one float64 copy per evaluated (ungated) mode

    def as_f64(name: str) -> np.ndarray:
        if name not in f64:
            f64[name] = arr.slots[name].astype(np.float64)
        return f64[name]

    slots, open_, ovh = {}, {}, {}
    for m in setup.modes:
        base = as_f64(m.ungated.name)
        o = agg.gate_open(m, tokens_per_rank, setup.cost, setup.overheads, setup.k, setup.S, setup.R, c.expected_gain)
        slots[m.name] = agg.gated_slots(base, as_f64(m.closed.name), o) if m.gated else base
        open_[m.name] = o
        ovh[m.name] = agg.step_overheads(m, tokens_per_rank, o, setup.overheads, setup.R)
    return slots, open_, ovh


def _bound_summary(bound: np.ndarray, mean_load: np.ndarray, static_max: np.ndarray, mask: np.ndarray) -> dict:
    b = agg.mean_over_max(mean_load, bound)[mask].mean(1)
    return {"balancedness_mean": float(b.mean()), "balancedness_p5": float(np.percentile(b, 5)),
            "moe_time_ratio_vs_static": metrics.time_ratio(torch.from_numpy(bound[mask]),
                                                           torch.from_numpy(static_max[mask]))}


def _summaries(setup: Setup, arr: StepArrays, slots: dict, open_: dict, ovh: dict) -> dict:
    bj, bl = arr.bounds["joint"], arr.bounds["local"]
    static = slots["static"]
    out = {}
    for m in setup.modes:
        s = slots[m.name]
        mask = ~np.isnan(s).any((1, 2, 3))
        if not mask.any():
            continue
        res = agg.token_summary(s, static, mask, bj, bj if m.moves_shared else bl)
        _, routed = agg.rank_loads(s[mask])
        rb = agg.step_balancedness(routed)
        base_cpu = arr.cpu[m.ungated.name][mask]
        closed = ~open_[m.name][mask] if m.gated else np.zeros(int(mask.sum()), dtype=bool)
        cpu = np.where(closed, arr.cpu[m.closed.name][mask], base_cpu)
        res.update(
            class_bound="joint" if m.moves_shared else "local_shared",
            routed_balancedness_mean=float(rb.mean()),
            overhead_ms_per_batch=float(np.nanmean(cpu) * 1e3),
            steps_scored=int(mask.sum()),
            family=m.family,
            description=m.description,
        )
        res.update(agg.time_summary(s, static, mask, ovh[m.name], open_[m.name], setup.cost))
        if m.gated:
            res["gate_open_share"] = float(open_[m.name][mask].mean())
        if m.upstream_waterfill:
            res["overhead_note"] = "CPU time: Triton interpreter, not indicative of GPU cost"
        out[m.name] = res
    return out


def _series_and_worst(setup: Setup, slots: dict, mean_load: np.ndarray, bj: np.ndarray, bl: np.ndarray):
    series, worst = {}, {}
    for m in setup.modes:
        s = slots[m.name]
        scored = ~np.isnan(s).any((1, 2, 3))
        if not scored.any():
            continue
        total, routed = agg.rank_loads(np.nan_to_num(s))
        mx = total.max(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            bal = np.where(mx > 0, mean_load / mx, 1.0)
        series[m.name] = np.where(scored, bal.mean(1), np.nan)
        b = np.where(scored[:, None], bal, np.inf)
        ws, wl = np.unravel_index(int(np.argmin(b)), b.shape)
        worst[m.name] = {"step": int(ws), "layer": int(wl), "routed": routed[ws, wl].tolist(),
                         "shared": (total[ws, wl] - routed[ws, wl]).tolist(), "mean": float(mean_load[ws, wl]),
                         "bound": float(bj[ws, wl]), "balancedness": float(bal[ws, wl])}
    series["bound"] = agg.mean_over_max(mean_load, bj).mean(1)
    series["bound-local-shared"] = agg.mean_over_max(mean_load, bl).mean(1)
    return series, worst


def _on_sampled(setup: Setup, slots: dict, arr: StepArrays, mean_load, static_max) -> dict:
    mask = np.zeros(setup.N, dtype=bool)
    mask[setup.sampled_steps] = True
    bj = arr.bounds["joint"]
    out = {}
    for m in setup.modes:
        s = slots[m.name]
        if np.isnan(s[mask]).any():
            continue
        out[m.name] = agg.token_summary(s, slots["static"], mask, bj, None)
    b = _bound_summary(bj, mean_load, static_max, mask)
    b["gap_to_bound_mean"] = 0.0
    out["bound"] = b
    return out


def aggregate_run(setup: Setup, arr: StepArrays) -> dict:
    """Summaries, bounds, per-step series and worst steps of the main replay."""
    tokens_per_rank = arr.tokens.max(1).astype(np.float64)
    slots, open_, ovh = _mode_slots(setup, arr, tokens_per_rank)
    static_total, static_routed = agg.rank_loads(slots["static"])
    mean_load = static_total.sum(-1) / setup.R
    static_max = static_total.max(-1)
    modes = _summaries(setup, arr, slots, open_, ovh)
    all_steps = np.ones(setup.N, dtype=bool)
    bj, bl, br = arr.bounds["joint"], arr.bounds["local"], arr.bounds["routed"]
    brt = agg.mean_over_max(static_routed.sum(-1) / setup.R, br).mean(1)
    if setup.sampled_steps and len(setup.sampled_steps) < setup.N:
        on = _on_sampled(setup, slots, arr, mean_load, static_max)
        for m in setup.modes:
            if m.upstream_waterfill and m.name in modes:
                modes[m.name]["on_sampled_steps"] = on
    series, worst = _series_and_worst(setup, slots, mean_load, bj, bl)
    return {
        "modes": modes,
        "bound": _bound_summary(bj, mean_load, static_max, all_steps),
        "bound_local_shared": _bound_summary(bl, mean_load, static_max, all_steps),
        "bound_routed": {"routed_balancedness_mean": float(brt.mean())},
        "series": series, "worst": worst,
        "arrays": {"slots": slots, "total": {k: v.sum(-1) for k, v in slots.items()},
                   "routed": {k: v[..., :-1].sum(-1) for k, v in slots.items()},
                   "bound_joint": bj, "bound_local": bl, "bound_routed": br, "tokens": arr.tokens},
    }


# ---------------------------------------------------------------------------------------------
# The batch sweep
# ---------------------------------------------------------------------------------------------
def run_sweep(setup: Setup, trace: Trace, timeline: Timeline) -> tuple[list[dict], list[str]]:
    """One row per ``--batch-sweep`` size (schema in docs/replay.md), and notes."""
    cfg = setup.cfg
    steps = evenly_spaced(setup.N, cfg.sweep_steps)
    explicit = cfg.upstream_waterfill_steps is not None
    up_k = cfg.upstream_waterfill_steps if explicit else AUTO_SWEEP_UPSTREAM_STEPS
    up_steps = [steps[i] for i in evenly_spaced(len(steps), up_k)] if any(m.upstream_waterfill for m in setup.modes) else []
    sized = {n: sized_trace(trace, n, setup.R, cfg.seed) for n in cfg.batch_sweep}
    # SGLang's Waterfill in the Triton interpreter costs ~3 s per rank and layer at 16k tokens per rank.
    up_sizes = [n for n in cfg.batch_sweep if explicit or n <= AUTO_SWEEP_UPSTREAM_MAX_TOKENS] if up_steps else []
    ctxs = {n: _context(setup, timeline, up_steps if n in up_sizes else [], with_bounds=False) for n in cfg.batch_sweep}
    arrays = {n: StepArrays.empty(setup.eval_modes, len(steps), setup.L, setup.R, setup.S) for n in cfg.batch_sweep}
    index = {t: i for i, t in enumerate(steps)}
    # Slow items first (SGLang's Waterfill, big batches), so the workers share them out.
    items = sorted(((n, t) for n in cfg.batch_sweep for t in steps),
                   key=lambda it: (it[1] not in ctxs[it[0]].upstream_steps, -it[0], it[1]))

    def task(item):
        n, t = item
        return evaluate_step(ctxs[n], t, sized[n][0].batch(t))

    jobs = run_jobs(task, items, _workers(cfg, len(items)), cfg.threads, "sweep" if cfg.progress else None)
    with contextlib.closing(jobs):
        for (n, t), res in jobs:
            arrays[n].put(index[t], res)
    rows = [_sweep_row(setup, n, arrays[n], steps) for n in cfg.batch_sweep]
    how = sorted({h for _, h in sized.values()})
    notes = [f"batch sweep: {len(steps)} steps per size {steps}, {'; '.join(how)}; placements of the recorded trace"]
    if up_sizes:
        skipped = [n for n in cfg.batch_sweep if n not in up_sizes]
        notes.append(f"batch sweep: SGLang's Waterfill scored on steps {up_steps} of sizes {up_sizes} (Triton interpreter)"
                     + (f"; not at {skipped} tokens per rank (pass --upstream-waterfill-steps K to run it there too)"
                        if skipped else ""))
    return rows, notes


def _sweep_row(setup: Setup, n: int, arr: StepArrays, steps: list[int]) -> dict:
    tokens_per_rank = np.full(len(steps), float(n))
    slots, open_, ovh = _mode_slots(setup, arr, tokens_per_rank)
    row_modes = {}
    for m in setup.modes:
        s = slots[m.name]
        mask = ~np.isnan(s).any((1, 2, 3))
        if not mask.any():
            continue
        t = agg.time_summary(s, slots["static"], mask, ovh[m.name], open_[m.name], setup.cost)
        total, _ = agg.rank_loads(s[mask])
        static_total, _ = agg.rank_loads(slots["static"][mask])
        t.update(balancedness_mean=float(agg.step_balancedness(total).mean()),
                 moe_time_ratio_vs_static=metrics.time_ratio(torch.from_numpy(total.max(-1)),
                                                             torch.from_numpy(static_total.max(-1))),
                 steps_scored=int(mask.sum()))
        if m.gated:
            t["gate_open"] = bool(open_[m.name][mask].all())
        row_modes[m.name] = t
    return {"tokens_per_rank": n, "server_default": server_default("lplb"),
            "server_default_waterfill_lplb": server_default("waterfill+lplb"), "modes": row_modes}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_replay(trace: Trace, cfg: ReplayConfig, setup: Setup | None = None) -> ReplayResult:
    """Replay ``trace`` through ``cfg.modes`` (module docstring); ``setup`` if already made."""
    t_start = time.perf_counter()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = round(time.perf_counter() - t_start - sum(v for k, v in stages.items() if k != "setup"), 3)

    setup = setup or make_setup(trace, cfg)
    t_start = time.perf_counter()
    stages["setup"] = round(setup.seconds, 3)
    with _torch_threads(cfg.threads):
        read = read_trace(trace, _workers(cfg, setup.N), cfg.threads, cfg.progress)
        lap("read")
        refresh, plan_window = cfg.plan_cadence()
        with_plans = any(m.balance is not None and m.balance.plan for m in setup.eval_modes)
        timeline = build_timeline(trace, read.counts, up=setup.up, ep_size=setup.R, num_physical=setup.P, init=setup.init,
                                  rebalance_every=cfg.rebalance_every, window=setup.window,
                                  placement=resolve_placement(cfg.placement, cfg.ep_size),
                                  cost=setup.cost,
                                  plans=PlanOptions(setup.cost, setup.k, refresh, plan_window) if with_plans else None)
        lap("timeline")
        notes = setup.notes + [f"initial placement: {timeline.states[0].how}"]
        arr = evaluate_all(setup, trace, read, timeline)
        lap("evaluate")
        summary = aggregate_run(setup, arr)
        lap("aggregate")
        sweep, sweep_notes = run_sweep(setup, trace, timeline) if cfg.batch_sweep else ([], [])
        if cfg.batch_sweep:
            lap("sweep")
    workers = _workers(cfg, setup.N)
    if workers > 1:
        notes.append(f"batches drawn and steps evaluated by {workers} forked worker processes "
                     "(placements computed in between, in order)")
    notes.append(f"cost model: {setup.cost_note}; overheads: {setup.overheads.source}")
    config = asdict(cfg)
    config.update(
        modes=[m.name for m in setup.modes], batch_sweep=list(cfg.batch_sweep),
        num_logical_experts=setup.E, top_k=setup.k, num_layers=setup.L, num_steps=setup.N, num_physical_experts=setup.P,
        slots_per_rank=setup.S, window=setup.window, init_placement_used=setup.init, trace=trace.info,
        plan_refresh_used=cfg.plan_cadence()[0], plan_window_used=cfg.plan_cadence()[1],
        placement_used=resolve_placement(cfg.placement, cfg.ep_size),
        sglang_version=_sglang_version(), torch_version=torch.__version__,
        eplb_algorithm_resolved=setup.up.algorithm.name, cost_model=setup.cost_note,
        cost_model_params={"weight_bytes": setup.cost.weight_bytes, "flops_per_token": setup.cost.flops_per_token,
                           "bandwidth": setup.cost.bandwidth, "peak_flops": setup.cost.peak_flops,
                           "tile_tokens": setup.cost.tile_tokens},
        overheads_source=setup.overheads.source,
        memo={"hits": arr.memo_hits, "misses": arr.memo_misses}, stage_s=stages,
        shared_expert="one per token, same cost as one routed expert slot; runs on the source rank unless a Waterfill mode moves it",
        load_unit="token-slots per rank (routed top-k entries received + shared-expert tokens executed)",
    )
    return ReplayResult(
        config=config, modes=summary["modes"], bound=summary["bound"], bound_local_shared=summary["bound_local_shared"],
        bound_routed=summary["bound_routed"], rebalance_steps=timeline.rebalance_steps, phases=list(trace.phases),
        sampled_steps=setup.sampled_steps, notes=notes + sweep_notes, skipped=setup.skipped,
        wall_s=time.perf_counter() - t_start, sweep=sweep,
        server_default={"lplb": server_default("lplb"), "waterfill+lplb": server_default("waterfill+lplb")},
        series=summary["series"], worst=summary["worst"],
        arrays=dict(summary["arrays"], placements=[st.pl.phy2log for st in timeline.states],
                    state_of_step=timeline.state_of_step),
    )


def _sglang_version() -> str:
    from .upstream import sglang_version

    return sglang_version()
