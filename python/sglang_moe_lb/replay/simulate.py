"""Feed a trace through every balancing mode, batch by batch, and score the rank loads.

The simulated EP group has ``R`` ranks, each also a DP-attention rank that owns a slice of
every batch's tokens (its "source" tokens). Per step and MoE layer:

1. Upstream SGLang maps each rank's logical ids to physical ids (``static``: the rank's own
   nearest-copy table; ``dynamic``: a random copy), optionally followed by SGLang's Waterfill.
2. Our modes call ``sglang_moe_lb.joint.balance_layer`` once per rank, exactly as the server
   plugin does: the dynamic ones with the stacked ``local_stats`` rows of all ranks (the one
   all-gather), the static Waterfill ones with the rank's own tokens only.
3. Every mode's result becomes a per-rank load: routed token-slots received plus
   shared-expert token-slots executed. Without Waterfill the shared expert runs on the
   token's own (source) rank. So every mode is scored on the same total work,
   ``(k + 1) * tokens``, and a lower max means a faster MoE layer.
4. Two per-batch LP bounds on the same placement (HiGHS): the *joint* bound, where the shared
   expert may run anywhere (no dispatch of any mode can beat it), and the *local-shared*
   bound, where the shared expert stays on the source rank (the best any routed-only mode can
   reach).

Placement follows the server: the initial map (SGLang's EPLB on the calibration counts, a
recorded map, or the trivial one), then every ``rebalance_every`` steps SGLang's EPLB on the
last ``window`` steps' counts. ``lplb-rebalance`` recomputes its split table at the same
moments with ``scenario_split`` over the same window.

All ranks of one mode solve bit-identical split problems (that is the design: every rank
derives the same quotas from the gathered stats). The simulator therefore lets rank 0 solve
and hands the result to ranks 1..R-1 (``_shared_solves``); the measured per-batch overhead is
rank 0's, which includes the solve.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import joint
from ..joint import balance_layer, local_stats
from ..lp_split import scenario_split, solve_split
from ..placement import Placement
from ..quota_dispatch import count_experts
from ..waterfill import routed_rank_load
from .sources import Trace

__all__ = ["Mode", "MODES", "DEFAULT_MODES", "ReplayConfig", "ReplayResult", "run_replay"]


@dataclass(frozen=True)
class Mode:
    """One balancing mode.

    routing: "static" | "dynamic" (SGLang's mapping), "lplb-table" | "lplb" (ours).
    waterfill: None, "conservative" | "all_rank" (ours), "upstream" (SGLang's WaterfillBalancer).
    gathered: ours only; whether the mode uses the all-gathered stats (dynamic) or only the
        rank's own tokens (static Waterfill, no communication).
    """

    name: str
    family: str
    routing: str
    waterfill: str | None
    gathered: bool
    description: str
    upstream_dynamic_waterfill: bool = False

    @property
    def moves_shared(self) -> bool:
        return self.waterfill is not None


_M = Mode
MODES: dict[str, Mode] = {
    m.name: m
    for m in [
        _M("static", "upstream", "static", None, False, "SGLang static dispatch (each rank's nearest copy); shared expert local"),
        _M("dynamic", "upstream", "dynamic", None, False, "SGLang dynamic dispatch (random copy); shared expert local"),
        _M("upstream-waterfill", "upstream", "static", "upstream", False,
           "SGLang static dispatch + SGLang WaterfillBalancer (static, its default)"),
        _M("upstream-waterfill-dyn", "upstream", "static", "upstream", False,
           "SGLang static dispatch + SGLang WaterfillBalancer with SGLANG_DISABLE_STATIC_WATERFILL=1",
           upstream_dynamic_waterfill=True),
        _M("waterfill-cons", "ours", "static", "conservative", True,
           "SGLang static dispatch + our Waterfill, conservative candidates, dynamic (gathered loads)"),
        _M("waterfill-all", "ours", "static", "all_rank", True,
           "SGLang static dispatch + our Waterfill, any rank, dynamic (gathered loads)"),
        _M("waterfill-cons-static", "ours", "static", "conservative", False,
           "SGLang static dispatch + our Waterfill, conservative, static (own tokens only, no collective)"),
        _M("waterfill-all-static", "ours", "static", "all_rank", False,
           "SGLang static dispatch + our Waterfill, any rank, static (own tokens only, no collective)"),
        _M("lplb-rebalance", "ours", "lplb-table", None, True,
           "our LPLB split table, solved at each rebalance over the recorded window (scenario LP)"),
        _M("lplb", "ours", "lplb", None, True, "our exact per-batch LPLB split"),
        _M("waterfill+lplb-cons", "ours", "lplb", "conservative", True,
           "our per-batch LPLB split, then conservative Waterfill on the resulting loads"),
        _M("waterfill+lplb-all", "ours", "lplb", "all_rank", True,
           "our joint per-batch split: shared expert = one more expert with a copy on every rank"),
    ]
}
# The no-argument run leaves out the opt-in variants (SGLang's dynamic Waterfill, our no-collective
# Waterfill) to stay under a minute on 2 cores; docs/replay.md's full table has them all.
OPT_IN_MODES = ("upstream-waterfill-dyn", "waterfill-cons-static", "waterfill-all-static")
DEFAULT_MODES = tuple(m for m in MODES if m not in OPT_IN_MODES)
AUTO_UPSTREAM_WATERFILL_STEPS = 4  # steps SGLang's Waterfill is scored on by default (Triton interpreter)
AUTO_UPSTREAM_WATERFILL_MAX_EP = 16  # beyond this EP size it is skipped unless asked for


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

    def validate(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"--ep-size must be >= 1, got {self.ep_size}")
        if self.redundant_experts < 0:
            raise ValueError(f"--redundant-experts must be >= 0, got {self.redundant_experts}")
        if self.rebalance_every < 0:
            raise ValueError(f"--rebalance-every must be >= 0 (0 = never), got {self.rebalance_every}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"--modes: unknown mode(s) {bad}; choose from {list(MODES)}")
        if "static" not in self.modes:
            raise ValueError("--modes must include 'static' (the reference of the time ratio)")
        if self.init_placement not in ("auto", "calibration", "recorded", "trivial", "first-window"):
            raise ValueError(
                f"--init-placement must be auto, calibration, recorded, trivial or first-window, got {self.init_placement!r}"
            )
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.lp_method not in ("highs", "fast"):
            raise ValueError(f"--lp-method must be highs or fast, got {self.lp_method!r}")


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
    series: dict = field(repr=False, default_factory=dict)
    worst: dict = field(repr=False, default_factory=dict)
    arrays: dict = field(repr=False, default_factory=dict)
    """Raw numbers (not in the JSON): ``total[mode]`` / ``routed[mode]`` ``[steps, L, R]`` loads (NaN where
    not scored), ``bound_joint`` / ``bound_local`` / ``bound_routed`` ``[steps, L]`` LP max loads,
    ``routed_total`` ``[steps, L]`` routed entries, ``placements`` (each ``[L, P]``) and
    ``state_of_step`` (index into ``placements`` per step)."""

    def to_json(self, per_step: bool = True) -> dict:
        out = {
            "config": self.config,
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
        if per_step:
            out["per_step"] = {
                "balancedness": {k: [None if math.isnan(v) else round(float(v), 6) for v in s]
                                 for k, s in self.series.items()},
            }
        return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _shared_solves():
    """Let the R ranks of one mode share one solve (their inputs are bit-identical).

    Wraps the two solver entry points that ``joint.balance_layer`` calls with a cache keyed
    on the placement object and the exact input bytes. ``cache.clear()`` starts a new mode.
    """
    cache: dict = {}
    orig_solve, orig_quota = joint.solve_split, joint.integer_quotas

    def key_of(t: torch.Tensor) -> tuple:
        return (t.dtype, tuple(t.shape), t.detach().cpu().contiguous().numpy().tobytes())

    def solve(pl, counts, method="fast", **kw):
        k = ("solve", id(pl), method, tuple(sorted(kw.items())), key_of(counts))
        if k not in cache:
            cache[k] = orig_solve(pl, counts, method, **kw)
        return cache[k]

    def quota(pl, split, counts, *a, **kw):
        k = ("quota", id(pl), a, tuple(sorted(kw.items())), key_of(split), key_of(counts))
        if k not in cache:
            cache[k] = orig_quota(pl, split, counts, *a, **kw)
        return cache[k]

    joint.solve_split, joint.integer_quotas = solve, quota
    try:
        yield cache
    finally:
        joint.solve_split, joint.integer_quotas = orig_solve, orig_quota


def _local_shared_placement(pl: Placement) -> Placement:
    """The fused layout with rank r's extra slot holding its own pseudo-expert ``E + r``.

    Counting rank r's source tokens as that expert's load pins the shared expert to the
    source rank, so ``solve_split`` on it gives the best max load of any routed-only mode.
    """
    L, R, S, E = pl.num_layers, pl.num_ranks, pl.slots_per_rank, pl.num_logical
    pseudo = (E + torch.arange(R)).reshape(1, R, 1).expand(L, R, 1)
    fused = torch.cat([pl.phy2log.reshape(L, R, S), pseudo], 2).reshape(L, R * (S + 1))
    return Placement(fused, R, E + R)


def _even_table(pl: Placement) -> torch.Tensor:
    """Split fractions of the even split (each copy an equal share): ``[L, P]``."""
    return 1.0 / pl.num_copies.gather(1, pl.phy2log).to(torch.float64)


def _split_ranks(n: int, R: int, sizes: list[int] | None) -> list[int]:
    if sizes is not None and len(sizes) == R and sum(sizes) == n:
        return list(sizes)
    base, extra = divmod(n, R)
    return [base + (1 if r < extra else 0) for r in range(R)]


@dataclass
class _PlacementState:
    pl: Placement
    up: object
    table: torch.Tensor
    local: Placement
    how: str


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def run_replay(trace: Trace, cfg: ReplayConfig) -> ReplayResult:
    """Replay ``trace`` through ``cfg.modes``; see the module docstring."""
    cfg.validate()
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(trace, cfg, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(trace: Trace, cfg: ReplayConfig, t_start: float) -> ReplayResult:
    from .upstream import UpstreamSGLang, sglang_version

    E, k, L, N, R = trace.num_logical, trace.top_k, trace.num_layers, trace.num_steps, cfg.ep_size
    P = E + cfg.redundant_experts
    if P % R:
        raise ValueError(
            f"{E} experts + {cfg.redundant_experts} redundant = {P} physical slots, not divisible by --ep-size {R}"
        )
    S = P // R
    window = cfg.window or cfg.rebalance_every or N
    modes = [MODES[m] for m in cfg.modes]
    notes: list[str] = []
    skipped: dict[str, str] = {}

    up = UpstreamSGLang(
        num_logical=E, num_physical=P, ep_size=R, num_layers=L,
        eplb_algorithm=cfg.eplb_algorithm, num_groups=cfg.num_groups, nnodes=cfg.nnodes,
    )
    upstream_wf = [m for m in modes if m.waterfill == "upstream"]
    sampled_steps: list[int] = []
    if upstream_wf:
        reason = None
        if up.note:
            reason = up.note
        elif R & (R - 1):
            reason = f"SGLang's Waterfill kernel needs a power-of-two EP size (tl.arange over ranks); got {R}"
        elif cfg.upstream_waterfill_steps == 0:
            reason = "skipped by --upstream-waterfill-steps 0"
        elif cfg.upstream_waterfill_steps is None and R > AUTO_UPSTREAM_WATERFILL_MAX_EP:
            reason = (
                f"too slow at EP {R}: SGLang's Waterfill kernel unrolls over the ranks and runs in the Triton "
                f"interpreter on CPU; pass --upstream-waterfill-steps K to run it on K steps anyway"
            )
        if reason:
            for m in upstream_wf:
                skipped[m.name] = reason
            modes = [m for m in modes if m.waterfill != "upstream"]
        else:
            k_steps = AUTO_UPSTREAM_WATERFILL_STEPS if cfg.upstream_waterfill_steps is None else cfg.upstream_waterfill_steps
            n = N if k_steps < 0 else min(N, k_steps)
            sampled_steps = sorted({int(round(x)) for x in np.linspace(0, N - 1, n)}) if n < N else list(range(N))
            if n < N:
                notes.append(
                    f"upstream Waterfill runs SGLang's Triton kernels in the Triton interpreter on CPU "
                    f"(~0.1-0.3 s per rank and layer), so it is scored on {len(sampled_steps)} evenly spaced "
                    f"steps {sampled_steps}; its time ratio and gaps compare against the other modes on those "
                    f"same steps (see 'on_sampled_steps')."
                )

    # -- placement state ------------------------------------------------------------------------
    def make_state(p2l: torch.Tensor, l2p: torch.Tensor | None, table_window: torch.Tensor | None, how: str):
        """Install a placement; the split table is the scenario LP over the window, as the plugin's
        rebalance solves it, or the even split until the first rebalance (the plugin's start)."""
        pl = Placement(p2l, R, E)
        upl = up.install(p2l, l2p)
        if table_window is not None:
            table_window = table_window[table_window.flatten(1).sum(1) > 0]  # skip empty recorded steps
        table = scenario_split(pl, table_window) if table_window is not None and len(table_window) else _even_table(pl)
        return _PlacementState(pl, upl, table.reshape(L, P), _local_shared_placement(pl), how)

    init = cfg.init_placement
    if init == "auto":
        rp = trace.recorded_placement
        init = "calibration" if trace.calibration is not None else (
            "recorded" if rp is not None and tuple(rp.shape) == (L, P) else "trivial"
        )
        if init == "trivial" and rp is not None:
            notes.append(
                f"the input's recorded map has shape {list(rp.shape)}, not [layers, experts + --redundant-experts] = "
                f"{[L, P]}; starting from the trivial placement instead"
            )
    if init == "calibration":
        if trace.calibration is None:
            raise ValueError("--init-placement calibration: this input has no calibration counts")
        calib = trace.calibration.to(torch.float64).reshape(L, E)
        p2l, l2p = up.rebalance(calib[None])
        state = make_state(p2l, l2p, None, "SGLang EPLB on the calibration counts")
    elif init == "recorded":
        rp = trace.recorded_placement
        if rp is None or tuple(rp.shape) != (L, P):
            raise ValueError(
                f"--init-placement recorded: the input's map has shape "
                f"{None if rp is None else list(rp.shape)}, the simulation needs {[L, P]} "
                f"(layers, experts + --redundant-experts)"
            )
        state = make_state(rp, None, None, "the recorded physical_to_logical_map")
    elif init == "trivial":
        p2l = (torch.arange(P) % E).repeat(L, 1)
        state = make_state(p2l, None, None, "trivial (slot p holds expert p mod E)")
    else:  # first-window
        w = torch.stack([count_experts_layers(trace.batch(t).topk, E) for t in range(min(window, N))])
        p2l, l2p = up.rebalance(w)
        state = make_state(p2l, l2p, None, f"SGLang EPLB on the first {min(window, N)} steps (peeks ahead)")
    notes.append(f"initial placement: {state.how}")

    # -- pass 1, in order: traffic counts and the placements they lead to ----------------------------
    # A placement depends only on recorded counts, never on a mode's decisions, so the
    # placements of every step are known before any mode runs.
    counts_hist = torch.zeros(N, L, E, dtype=torch.float64)
    states, state_of_step, rebalance_steps = [state], [], []
    kept: list | None = []
    kept_bytes = 0
    for t in range(N):
        if cfg.rebalance_every and t > 0 and t % cfg.rebalance_every == 0:
            w = counts_hist[max(0, t - window) : t]
            p2l, l2p = up.rebalance(w)
            states.append(make_state(p2l, l2p, w, "rebalance"))
            rebalance_steps.append(t)
        state_of_step.append(len(states) - 1)
        batch = trace.batch(t)
        counts_hist[t] = count_experts_layers(batch.topk, E)
        if kept is not None:
            small = batch.topk.to(torch.int16 if E < 2**15 else torch.int32)
            kept_bytes += small.numel() * small.element_size()
            if kept_bytes < _KEEP_BYTES:
                kept.append((small, batch.rank_sizes))
            else:
                kept = None  # too big to hold: the workers regenerate batches (deterministic)

    # -- pass 2: every mode on every step (steps are independent now; forked workers share them) --
    global _JOB
    _JOB = _Job(trace, kept, states, state_of_step, modes, cfg, up, set(sampled_steps), E, k, L, R, S)
    names = [m.name for m in modes]
    total = {n: np.full((N, L, R), np.nan) for n in names}
    routed = {n: np.full((N, L, R), np.nan) for n in names}
    overhead = {n: np.full(N, np.nan) for n in names}
    bound_joint = np.zeros((N, L))
    bound_local = np.zeros((N, L))
    bound_routed = np.zeros((N, L))
    routed_total = np.zeros((N, L))
    # The slow upstream-Waterfill steps go first so that the workers share them.
    order = sorted(range(N), key=lambda t: (t not in _JOB.sampled, t))
    workers = max(1, min(cfg.workers or (os.cpu_count() or 1), N))
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=N, desc="replay", unit="step", leave=False, dynamic_ncols=True)
    pool = None
    try:
        if workers == 1:
            results_iter = map(_eval_step, order)
        else:
            import multiprocessing as mp

            pool = mp.get_context("fork").Pool(workers)
            results_iter = pool.imap_unordered(_eval_step, order, chunksize=1)
        for t, out in results_iter:
            for name, (tl, rl, dt) in out["modes"].items():
                total[name][t], routed[name][t], overhead[name][t] = tl, rl, dt
            bound_joint[t], bound_local[t], bound_routed[t] = out["bound_joint"], out["bound_local"], out["bound_routed"]
            routed_total[t] = out["routed_total"]
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()  # every result is in (or we are failing): stop the workers now
            pool.join()
        if bar is not None:
            bar.close()
        _JOB = None
    if workers > 1:
        notes.append(f"steps evaluated by {workers} forked worker processes (placements computed first, in order)")

    # -- aggregate ---------------------------------------------------------------------------------
    # Every mode does the same total work per (step, layer): routed entries + one shared slot per token.
    tot_work = np.nansum(total["static"], axis=2)
    mean_load = tot_work / R

    def bal(maxes: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            b = np.where(maxes > 0, mean_load / maxes, 1.0)
        return b

    def summary(maxes: np.ndarray, steps_mask: np.ndarray, class_bound: np.ndarray | None) -> dict:
        b = bal(maxes)[steps_mask].mean(1)
        static_max = np.max(total["static"], axis=2)[steps_mask]
        with np.errstate(divide="ignore", invalid="ignore"):
            gap = np.where(maxes > 0, 1.0 - bound_joint / maxes, 0.0)[steps_mask]
            out = {
                "balancedness_mean": float(b.mean()),
                "balancedness_p5": float(np.percentile(b, 5)),
                "gap_to_bound_mean": float(gap.mean()),
                "moe_time_ratio_vs_static": float(maxes[steps_mask].sum() / static_max.sum()),
            }
            if class_bound is not None:
                cg = np.where(maxes > 0, 1.0 - class_bound / maxes, 0.0)[steps_mask]
                out["gap_to_class_bound_mean"] = float(cg.mean())
        return out

    results: dict[str, dict] = {}
    series: dict[str, np.ndarray] = {}
    worst: dict[str, dict] = {}
    sampled_mask = np.zeros(N, dtype=bool)
    sampled_mask[sampled_steps] = True
    for m in modes:
        maxes = np.max(total[m.name], axis=2)
        mask = ~np.isnan(maxes).any(1)
        if not mask.any():
            continue
        class_bound = bound_joint if m.moves_shared else bound_local
        res = summary(maxes, mask, class_bound)
        rmax = np.max(routed[m.name], axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            rb = np.where(rmax > 0, (routed_total / R) / rmax, 1.0)[mask].mean(1)
        res.update(
            class_bound="joint" if m.moves_shared else "local_shared",
            routed_balancedness_mean=float(rb.mean()),
            overhead_ms_per_batch=float(np.nanmean(overhead[m.name][mask]) * 1e3),
            steps_scored=int(mask.sum()),
            family=m.family,
            description=m.description,
        )
        if m.waterfill == "upstream":
            res["overhead_note"] = "Triton interpreter on CPU; not indicative of GPU cost"
        results[m.name] = res
        s = np.full(N, np.nan)
        s[mask] = bal(maxes)[mask].mean(1)
        series[m.name] = s
        # Worst (step, layer) of this mode, for the load-bar plot.
        bl = np.where(np.isnan(maxes), np.inf, bal(np.where(np.isnan(maxes), 1, maxes)))
        ws, wl = np.unravel_index(int(np.argmin(bl)), bl.shape)
        worst[m.name] = {
            "step": int(ws), "layer": int(wl),
            "routed": routed[m.name][ws, wl].tolist(),
            "shared": (total[m.name][ws, wl] - routed[m.name][ws, wl]).tolist(),
            "mean": float(mean_load[ws, wl]), "bound": float(bound_joint[ws, wl]),
            "balancedness": float(bal(maxes)[ws, wl]),
        }
    on_sampled = {}
    if sampled_steps and len(sampled_steps) < N:
        for m in modes:
            maxes = np.max(total[m.name], axis=2)
            if np.isnan(maxes[sampled_mask]).any():
                continue
            on_sampled[m.name] = summary(maxes, sampled_mask, None)
        on_sampled["bound"] = summary(bound_joint, sampled_mask, None)
        for m in modes:
            if m.waterfill == "upstream" and m.name in results:
                results[m.name]["on_sampled_steps"] = on_sampled
    all_steps = np.ones(N, dtype=bool)
    bound = summary(bound_joint, all_steps, None)
    bound.pop("gap_to_bound_mean")
    bloc = summary(bound_local, all_steps, None)
    bloc.pop("gap_to_bound_mean")
    with np.errstate(divide="ignore", invalid="ignore"):
        brt = np.where(bound_routed > 0, (routed_total / R) / bound_routed, 1.0).mean(1)
    broute = {"routed_balancedness_mean": float(brt.mean())}
    series["bound"] = bal(bound_joint).mean(1)
    series["bound-local-shared"] = bal(bound_local).mean(1)

    config = asdict(cfg)
    config.update(
        modes=list(cfg.modes),
        num_logical_experts=E, top_k=k, num_layers=L, num_steps=N, num_physical_experts=P,
        slots_per_rank=S, window=window, init_placement_used=init, trace=trace.info,
        sglang_version=sglang_version(), torch_version=torch.__version__,
        eplb_algorithm_resolved=up.algorithm.name,
        shared_expert="one per token, same cost as one routed expert slot; runs on the source rank unless a Waterfill mode moves it",
        load_unit="token-slots per rank (routed top-k entries received + shared-expert tokens executed)",
    )
    return ReplayResult(
        config=config, modes=results, bound=bound, bound_local_shared=bloc, bound_routed=broute,
        rebalance_steps=rebalance_steps, phases=list(trace.phases), sampled_steps=sampled_steps,
        notes=notes, skipped=skipped, wall_s=time.perf_counter() - t_start, series=series, worst=worst,
        arrays={
            "total": total, "routed": routed, "bound_joint": bound_joint, "bound_local": bound_local,
            "bound_routed": bound_routed, "routed_total": routed_total,
            "placements": [st.pl.phy2log for st in states], "state_of_step": state_of_step,
        },
    )


def count_experts_layers(topk: torch.Tensor, E: int) -> torch.Tensor:
    """Per-layer expert counts of ``[L, T, k]`` ids: ``[L, E]`` float64."""
    return torch.stack([count_experts(topk[layer], E) for layer in range(topk.shape[0])]).to(torch.float64)


# ---------------------------------------------------------------------------------------------
# One step, all modes (runs in the main process or in a forked worker)
# ---------------------------------------------------------------------------------------------
_KEEP_BYTES = 768 << 20  # keep pass-1 batches in memory up to this size, else regenerate them


@dataclass
class _Job:
    trace: Trace
    kept: list | None
    states: list
    state_of_step: list
    modes: list
    cfg: ReplayConfig
    up: object
    sampled: set
    E: int
    k: int
    L: int
    R: int
    S: int


_JOB: _Job | None = None


def _eval_step(t: int) -> tuple[int, dict]:
    job = _JOB
    assert job is not None
    torch.set_num_threads(job.cfg.threads)
    with _shared_solves() as cache:
        return t, _eval_step_inner(job, t, cache)


def _eval_step_inner(job: _Job, t: int, cache: dict) -> dict:
    E, k, L, R, S, up, cfg = job.E, job.k, job.L, job.R, job.S, job.up, job.cfg
    state = job.states[job.state_of_step[t]]
    if job.kept is not None:
        topk_small, rank_sizes = job.kept[t]
        topk = topk_small.to(torch.long)
    else:
        b = job.trace.batch(t)
        topk, rank_sizes = b.topk.to(torch.long), b.rank_sizes
    T = topk.shape[1]
    sizes = _split_ranks(T, R, rank_sizes)
    out_modes = {m.name: (np.zeros((L, R)), np.zeros((L, R)), 0.0) for m in job.modes
                 if m.waterfill != "upstream" or t in job.sampled}
    bj, bl, br, rt = np.zeros(L), np.zeros(L), np.zeros(L), np.zeros(L)
    for layer in range(L):
        ids = topk[layer]
        parts = list(torch.split(ids, sizes))
        valid = [(p >= 0).any(1) for p in parts]
        n_src = torch.tensor([int(v.sum()) for v in valid], dtype=torch.long)
        c = count_experts(ids, E)
        lp = state.pl.layer(layer)
        rt[layer] = float(c.sum())

        # Bounds: the LP optimum on this placement (HiGHS).
        fpl = lp.with_shared_expert
        bj[layer] = float(fpl.rank_loads(solve_split(fpl, torch.cat([c, n_src.sum().reshape(1)]), "highs")).max())
        lpl = state.local.layer(layer)
        bl[layer] = float(lpl.rank_loads(solve_split(lpl, torch.cat([c, n_src]), "highs")).max())
        br[layer] = float(lp.rank_loads(solve_split(lp, c, "highs")).max())

        # SGLang's mappings; the per-rank overhead is the mean over ranks.
        t0 = time.perf_counter()
        static_phys = [up.to_physical(p, state.up.static_info[r][layer]) for r, p in enumerate(parts)]
        t_static = (time.perf_counter() - t0) / R
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((cfg.seed * 1_000_003 + t * 131 + layer) % (2**63))
            t0 = time.perf_counter()
            dyn_phys = [up.to_physical(p, state.up.dynamic_info[r][layer]) for r, p in enumerate(parts)]
            t_dyn = (time.perf_counter() - t0) / R
        g_lp = g_off = None

        for m in job.modes:
            if m.name not in out_modes:
                continue
            shared = None
            if m.waterfill is None and m.routing in ("static", "dynamic"):
                phys = static_phys if m.routing == "static" else dyn_phys
                dt = t_static if m.routing == "static" else t_dyn
            elif m.waterfill == "upstream":
                t0 = time.perf_counter()
                fused = up.waterfill(static_phys, layer, dynamic=m.upstream_dynamic_waterfill)
                dt = (time.perf_counter() - t0) / R
                rl = sum(routed_rank_load(f[:, :k], R, S + 1) for f in fused)
                tl = sum(routed_rank_load(f, R, S + 1) for f in fused)
                _put(out_modes, m.name, layer, tl, rl, dt)
                continue
            else:
                cache.clear()  # each mode solves for itself; its ranks share the solve
                if m.routing == "static":  # our Waterfill on top of SGLang's static mapping
                    if g_off is None:
                        g_off = torch.stack([local_stats(p, E, R, S, s) for p, s in zip(parts, static_phys)])
                    kw = dict(lplb="off", waterfill=m.waterfill, gathered=g_off if m.gathered else None)
                else:
                    if g_lp is None:
                        g_lp = torch.stack([local_stats(p, E, R, S) for p in parts])
                    kw = dict(
                        lplb="table" if m.routing == "lplb-table" else "per_batch",
                        split_table=state.table[layer] if m.routing == "lplb-table" else None,
                        waterfill=m.waterfill, gathered=g_lp, method=cfg.lp_method,
                    )
                phys, shared, dt = [], [], 0.0
                for r, p in enumerate(parts):
                    t0 = time.perf_counter()
                    if m.gathered:  # this rank's row of the all-gather
                        local_stats(p, E, R, S, static_phys[r] if m.routing == "static" else None)
                    d = balance_layer(
                        lp, p, source_rank=r, phys_ids=static_phys[r] if m.routing == "static" else None, **kw
                    )
                    if r == 0:  # rank 0 solves; the others reuse its (bit-identical) solve
                        dt = time.perf_counter() - t0
                    phys.append(d.phys_ids)
                    shared.append(d.shared_rank)
            rl = sum(routed_rank_load(p, R, S) for p in phys)
            if shared is None or shared[0] is None:
                sl = n_src
            else:
                sl = sum(torch.bincount(s[v], minlength=R) for s, v in zip(shared, valid))
            _put(out_modes, m.name, layer, rl + sl, rl, dt)
    return {"modes": out_modes, "bound_joint": bj, "bound_local": bl, "bound_routed": br, "routed_total": rt}


def _put(out: dict, name: str, layer: int, tl: torch.Tensor, rl: torch.Tensor, dt: float) -> None:
    total, routed, acc = out[name]
    total[layer], routed[layer] = tl.numpy(), rl.numpy()
    out[name] = (total, routed, acc + dt)
