"""How long a replay will take, estimated before any work (part of the *setup* stage).

A run's cost is almost all per-(step, layer, rank, mode) work, so the estimate counts those
units from the checked setup and prices them with per-unit CPU seconds calibrated on the stage
timings replay records (``config.stage_s`` of the JSON; two busy cores, docs/replay.md):

* evaluate: one rank's ``chain.balance_layer`` call for one of our modes costs
  ``CHAIN_S + ENTRY_S x (tokens per rank x k) + SLOT_S x P`` (SGLang's static and dynamic a
  quarter of it); SGLang's Waterfill in the Triton interpreter ``UPSTREAM_S + UPSTREAM_TOKEN_S x
  tokens per rank`` per sampled (step, layer, rank); the LP bounds per (step, layer) by rank
  sets (``2^R x L x E`` products) or, beyond ``bounds.MAX_SUBSET_WORK``, by HiGHS (that much +
  ``HIGHS_SLOT_S x P`` per layer);
* read: ``DRAW_S`` per (layer, token, expert) drawn;
* timeline: ``PLAN_S + PLAN_SLOT_S x P`` per plan solve (13 levels, every layer);
* sweep: evaluate again per size, at that size, on ``--sweep-steps`` steps.

Read, evaluate and sweep are shared by the workers; the timeline runs in order. Calibration
points (bundled default 60 x 3 x 8 ranks: evaluate 82 s measured, 73 s estimated; the sweep
of docs/replay.md: 259 s CPU, 270 s; ``--synthetic --steps 12``: 34-42 s, 27 s): within ~2x, which
is what a "this will take minutes" line needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bounds import MAX_SUBSET_WORK
from .setup import Setup
from .sources import Trace

__all__ = ["Estimate", "estimate_run", "mean_tokens", "long_run_line", "WARN_ABOVE_S"]

WARN_ABOVE_S = 60.0  # say so up front above this
CHAIN_S = 2e-3
ENTRY_S = 0.3e-6
SLOT_S = 50e-6
SGLANG_SHARE = 0.25
UPSTREAM_S = 0.1
UPSTREAM_TOKEN_S = 0.18e-3
SUBSET_S = 1e-8
HIGHS_SLOT_S = 1e-4
DRAW_S = 3e-7
PLAN_S = 3e-3
PLAN_SLOT_S = 2e-5
PLAN_LEVELS = 13


@dataclass(frozen=True)
class Estimate:
    """Estimated wall seconds per stage (after setup) and their sum."""

    read_s: float
    timeline_s: float
    evaluate_s: float
    sweep_s: float
    workers: int

    @property
    def total_s(self) -> float:
        return self.read_s + self.timeline_s + self.evaluate_s + self.sweep_s


def mean_tokens(trace: Trace) -> float:
    """Mean tokens per batch (all ranks), from what the trace knows without drawing."""
    span = trace.info.get("tokens_per_batch")
    if span:
        return (float(span[0]) + float(span[1])) / 2
    if trace.step_counts is not None:  # counts-only dump: entries / k (float: no int64 sums here)
        return float((trace.step_counts.double().sum(-1).amax(-1) / trace.top_k).mean())
    return float(trace.batch(0).topk.shape[1])


def _step_eval_s(setup: Setup, per_rank: float, upstream: bool, bounds: bool) -> float:
    """CPU seconds to evaluate one step at ``per_rank`` tokens per rank."""
    ours = sum(m.balance is not None for m in setup.eval_modes)
    sglang = sum(m.balance is None and not m.upstream_waterfill for m in setup.eval_modes)
    up = sum(m.upstream_waterfill for m in setup.eval_modes) if upstream else 0
    call = CHAIN_S + ENTRY_S * per_rank * setup.k + SLOT_S * setup.P
    s = setup.L * setup.R * (ours + SGLANG_SHARE * sglang) * call
    s += setup.L * setup.R * up * (UPSTREAM_S + UPSTREAM_TOKEN_S * per_rank)
    if bounds:
        sets = 2.0 ** min(setup.R, 1023) * setup.E * setup.L  # bounds.SubsetBound's work per step
        # bounds.py switches to HiGHS where the rank sets get too many: at least as costly as the limit
        s += (sets * SUBSET_S if sets <= MAX_SUBSET_WORK
              else MAX_SUBSET_WORK * SUBSET_S + setup.L * HIGHS_SLOT_S * setup.P)
    return s


def estimate_run(setup: Setup, tokens_per_batch: float, workers: int) -> Estimate:
    """The run's estimated wall seconds after setup (module docstring for the model)."""
    cfg, N, R = setup.cfg, setup.N, setup.R
    w = max(1, workers)
    per_rank = tokens_per_batch / R
    read = N * setup.L * tokens_per_batch * setup.E * DRAW_S
    sampled = set(setup.sampled_steps)
    evaluate = sum(_step_eval_s(setup, per_rank, up, True) * n
                   for up, n in ((True, len(sampled)), (False, N - len(sampled))))
    timeline = 0.0
    if any(m.balance is not None and m.balance.plan for m in setup.eval_modes):
        refresh = cfg.plan_cadence()[0]
        solves = 1 + (N // cfg.rebalance_every if cfg.rebalance_every else 0) + (N // refresh if refresh else 0)
        timeline = solves * PLAN_LEVELS * setup.L * (PLAN_S + PLAN_SLOT_S * setup.P)
    sweep = 0.0
    steps = min(cfg.sweep_steps, N)
    for n in cfg.batch_sweep:
        sweep += steps * (_step_eval_s(setup, n, False, False) + setup.L * n * R * setup.E * DRAW_S)
        sweep += _step_eval_s(setup, n, True, False) - _step_eval_s(setup, n, False, False)  # 1 upstream step
    return Estimate(read / w, timeline, evaluate / w, sweep / w, w)


def _duration(seconds: float) -> str:
    if seconds < 90 * 60:
        return f"~{max(1, round(seconds / 60))} min"
    hours = seconds / 3600
    return f"~{hours:.0f} h" if hours < 48 else f"~{hours / 24:.0f} days"


def long_run_line(setup: Setup, est: Estimate) -> str | None:
    """The one warning line for a run estimated above ``WARN_ABOVE_S``, else None."""
    if est.total_s <= WARN_ABOVE_S:
        return None
    cfg = setup.cfg
    shape = f"{setup.N} steps x {setup.L} layers x {setup.R} ranks x {len(setup.eval_modes)} evaluated modes"
    if cfg.batch_sweep:
        shape += f", {len(cfg.batch_sweep)} sweep sizes x {min(cfg.sweep_steps, setup.N)} steps"
    shape += f", {est.workers} worker{'s' if est.workers > 1 else ''}"
    return (f"sglang-moe-lb replay: this run is estimated to take {_duration(est.total_s)} ({shape}); "
            "fewer --steps, --modes, --ep-size or --batch-sweep sizes make it shorter, Ctrl-C stops it")
