"""The replay pipeline: setup -> read -> timeline -> evaluate -> aggregate (-> sweep) -> report.

Each stage is its own module (docs/replay.md, "stages"); this one only runs them in order and
times them (``config.stage_s`` of the JSON):

* setup (``setup.make_setup``): every check that needs the trace's shapes, SGLang's layout,
  the cost model and the overheads, before any work;
* read (``read.read_trace``): every batch drawn once (in parallel) and counted;
* placement timeline (``timeline.build_timeline``): placements and dispatch plans of every step;
* evaluate (``evaluate.evaluate_all``, per step, in forked workers): tokens per fused slot of
  every mode, and the LP bounds;
* aggregate (``aggregate.aggregate_run``): token metrics, modelled time with overhead, tile
  balancedness, gated modes;
* sweep (``sweep.run_sweep``, with ``--batch-sweep``): evaluate + aggregate at fixed batch sizes;
* report (``report``): the ``ReplayResult`` printed, written as JSON and plotted by the caller.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict

import torch

from ..decode_placement import resolve_placement
from .aggregate import aggregate_run
from .evaluate import evaluate_all, worker_count
from .mode_names import server_default
from .read import read_trace
from .report import ReplayResult
from .setup import DEFAULT_MODES, INIT_PLACEMENTS, ReplayConfig, Setup, make_setup
from .sources import Trace
from .sweep import run_sweep
from .timeline import PlanOptions, Timeline, build_timeline

__all__ = ["ReplayConfig", "ReplayResult", "Setup", "make_setup", "run_replay", "DEFAULT_MODES", "INIT_PLACEMENTS"]


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timeline(setup: Setup, trace: Trace, counts: torch.Tensor) -> Timeline:
    """The placement timeline stage on the read stage's counts ``[N, L, E]``."""
    cfg = setup.cfg
    refresh, plan_window = cfg.plan_cadence()
    with_plans = any(m.balance is not None and m.balance.plan for m in setup.eval_modes)
    return build_timeline(trace, counts, up=setup.up, ep_size=setup.R, num_physical=setup.P, init=setup.init,
                          rebalance_every=cfg.rebalance_every, window=setup.window,
                          placement=resolve_placement(cfg.placement, cfg.ep_size), cost=setup.cost,
                          plans=PlanOptions(setup.cost, setup.k, refresh, plan_window) if with_plans else None)


def run_replay(trace: Trace, cfg: ReplayConfig, setup: Setup | None = None) -> ReplayResult:
    """Replay ``trace`` through ``cfg.modes`` (module docstring); ``setup`` if already made."""
    setup = setup or make_setup(trace, cfg)
    cfg = setup.cfg  # defaults resolved
    t_start = time.perf_counter()
    stages: dict[str, float] = {"setup": round(setup.seconds, 3)}

    def lap(name: str) -> None:
        stages[name] = round(time.perf_counter() - t_start - sum(v for k, v in stages.items() if k != "setup"), 3)

    workers = worker_count(cfg, setup.N)
    with _torch_threads(cfg.threads):
        read = read_trace(trace, workers, cfg.threads, cfg.progress)
        lap("read")
        timeline = _timeline(setup, trace, read.counts)
        lap("timeline")
        arr = evaluate_all(setup, trace, read, timeline)
        lap("evaluate")
        summary = aggregate_run(setup, arr)
        lap("aggregate")
        sweep, sweep_notes = run_sweep(setup, trace, timeline) if cfg.batch_sweep else ([], [])
        if cfg.batch_sweep:
            lap("sweep")
    notes = setup.notes + [f"initial placement: {timeline.states[0].how}"]
    if workers > 1:
        notes.append(f"batches drawn and steps evaluated by {workers} forked worker processes "
                     "(placements computed in between, in order)")
    notes.append(f"cost model: {setup.cost_note}; overheads: {setup.overheads.source}")
    config = _config_json(setup, trace, memo={"hits": arr.memo_hits, "misses": arr.memo_misses}, stage_s=stages)
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


def _config_json(setup: Setup, trace: Trace, **extra) -> dict:
    """The JSON's ``config``: the options with their defaults resolved, the layout, versions."""
    from .upstream import sglang_version

    cfg = setup.cfg
    config = asdict(cfg)
    config.update(
        modes=[m.name for m in setup.modes], batch_sweep=list(cfg.batch_sweep),
        num_logical_experts=setup.E, top_k=setup.k, num_layers=setup.L, num_steps=setup.N, num_physical_experts=setup.P,
        slots_per_rank=setup.S, window=setup.window, init_placement_used=setup.init, trace=trace.info,
        plan_refresh_used=cfg.plan_cadence()[0], plan_window_used=cfg.plan_cadence()[1],
        placement_used=resolve_placement(cfg.placement, cfg.ep_size),
        sglang_version=sglang_version(), torch_version=torch.__version__,
        eplb_algorithm_resolved=setup.up.algorithm.name, cost_model=setup.cost_note,
        cost_model_params={"weight_bytes": setup.cost.weight_bytes, "flops_per_token": setup.cost.flops_per_token,
                           "bandwidth": setup.cost.bandwidth, "peak_flops": setup.cost.peak_flops,
                           "tile_tokens": setup.cost.tile_tokens},
        overheads_source=setup.overheads.source,
        shared_expert="one per token, same cost as one routed expert slot; runs on the source rank unless a Waterfill mode moves it",
        load_unit="token-slots per rank (routed top-k entries received + shared-expert tokens executed)",
        **extra,
    )
    return config
