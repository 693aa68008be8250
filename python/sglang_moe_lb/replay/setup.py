"""The *setup* stage: the simulation options, and every check before any work.

``ReplayConfig`` holds the simulation's options (the CLI's flags of the same names;
``command.py`` walks the flags once into it). ``make_setup`` checks them against the trace's
shapes, SGLang's layout (a dry run of its EPLB), the cost model and the overheads, and
resolves what the later stages need (``Setup``): the modes evaluated per step, the layout, the
steps SGLang's Waterfill is scored on. Sizes are checked against memory limits here too
(``check_batch_memory``, ``MAX_RESULT_BYTES``), so a run too big fails in one line, up front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..decode_placement import PLACEMENT_CHOICES
from ..mode import ModeError
from ..plan import plan_cadence
from .cost_setup import CostOptions, build_cost_model, build_overheads, check_overheads
from .mode_names import ReplayMode, default_mode_names, parse_modes
from .sampling import MAX_BATCH_BYTES, draw_bytes
from .sources import Trace
from .timeline import resolve_init

__all__ = ["ReplayConfig", "Setup", "make_setup", "evenly_spaced", "check_batch_memory", "DEFAULT_MODES",
           "INIT_PLACEMENTS", "MAX_RESULT_BYTES"]

DEFAULT_MODES = tuple(default_mode_names())
INIT_PLACEMENTS = ("auto", "calibration", "recorded", "trivial", "first-window")
AUTO_UPSTREAM_WATERFILL_STEPS = 4  # steps SGLang's Waterfill is scored on by default (Triton interpreter)
AUTO_UPSTREAM_WATERFILL_MAX_EP = 16  # beyond this EP size it is skipped unless asked for
MAX_RESULT_BYTES = 4 << 30  # tokens per slot of every mode, step and layer, held for the aggregate


@dataclass
class ReplayConfig:
    """Simulation options (the CLI's flags of the same names)."""

    ep_size: int = 8
    redundant_experts: int = 16
    rebalance_every: int | None = 50  # None: a third of the steps (resolved by make_setup)
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


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` evenly spaced indices of ``range(n)`` (all of them when ``k >= n`` or ``k < 0``)."""
    if k < 0 or k >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)}) if k > 0 else []


def check_batch_memory(L: int, T: int, width: int, what: str, unit: str = "experts") -> None:
    """One batch of ``T`` tokens x ``L`` layers drawn over ``width`` columns (the experts for
    sampled tokens) must fit ``MAX_BATCH_BYTES``; raises ``ValueError`` starting with ``what``
    (the flag) before anything is allocated."""
    need = draw_bytes(L, T, width)
    if need > MAX_BATCH_BYTES:
        raise ValueError(
            f"{what}: one batch of {T} tokens x {L} layers x {width} {unit} "
            f"needs ~{need / 2**30:.1f} GiB to draw (limit {MAX_BATCH_BYTES / 2**30:.0f} GiB); use fewer tokens"
        )


@dataclass
class Setup:
    """What every later stage needs, checked: ``cfg`` with its defaults resolved, the modes,
    the layout (E experts, top-k, L layers, N steps, R ranks, P physical slots, S per rank)."""

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
    if cfg.rebalance_every is None:
        cfg = replace(cfg, rebalance_every=max(1, trace.num_steps // 3))
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


