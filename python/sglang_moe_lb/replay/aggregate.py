"""The *aggregate* stage: per-mode summaries from tokens per fused slot.

Input per mode: ``slots [N, L, R, S + 1]`` (float64, NaN on steps the mode did not run): the
tokens each copy received and, in the last column, the shared-expert tokens each rank ran.
Every number below comes from them through the core's ``metrics`` and ``cost`` modules:

* token metrics: rank load = routed + shared token-slots; ``metrics.balancedness`` per (step,
  layer), averaged over layers, then mean and 5th percentile over steps; ``gap_to_bound``
  against the joint LP bound and the mode's class bound; the token-based MoE time ratio
  (summed max loads over static's, ``metrics.time_ratio``);
* modelled time: ``CostModel.rank_time`` on the fused slots (busiest rank), plus the mode's
  per-layer overhead (``cost_setup.mode_overhead_us``, zero where a gate is closed), summed over
  (step, layer) and divided by SGLang static's on the same steps;
* tile balancedness: ``metrics.balancedness`` of ``metrics.tile_loads``;
* break-even overhead: the largest per-layer µs, on the layers where the mode balances, at
  which its summed time would still equal static's: ``(sum static - sum mode) / layers``.

Gated modes take their opened form's slots where ``gate.Gate(...).open(N)`` is true for the
step's batch size N (the largest DP rank's tokens, as the server decides) and their closed
form's where it is false: SGLang static (time ratio exactly 1 on those steps, no overhead),
or for a plan schedule the plan (with the plan's overhead, 0 until measured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import metrics
from ..cost import CostModel
from ..gate import Gate, Overheads
from .cost_setup import mode_overhead_us
from .mode_names import ReplayMode

if TYPE_CHECKING:
    from .evaluate import StepArrays
    from .setup import Setup

__all__ = ["scored", "gate_open", "gated_slots", "rank_loads", "mean_over_max", "step_balancedness", "token_summary",
           "time_summary", "step_overheads", "mode_slots", "aggregate_run"]


def gate_open(mode: ReplayMode, tokens_per_rank: np.ndarray, cost: CostModel, ov: Overheads, top_k: int,
              S: int, R: int, expected_gain: float | None) -> np.ndarray:
    """``[N]`` bool: does the mode balance each step (always True without a gate)."""
    if not mode.gated:
        return np.ones(len(tokens_per_rank), dtype=bool)
    g = Gate(mode.balance, cost, ov, top_k=top_k, slots_per_rank=S, num_ranks=R, expected_gain=expected_gain)
    return np.array([g.open(float(n)) for n in tokens_per_rank], dtype=bool)


def gated_slots(opened: np.ndarray, closed: np.ndarray, open_: np.ndarray) -> np.ndarray:
    """``[N, L, R, S+1]``: the opened form's slots on open steps, the closed form's on closed ones."""
    return np.where(open_[:, None, None, None], opened, closed)


def step_overheads(mode: ReplayMode, tokens_per_rank: np.ndarray, open_: np.ndarray, ov: Overheads, R: int) -> np.ndarray:
    """``[N]`` µs per layer the mode adds on each step (its closed form's where the gate is closed)."""
    return np.array([mode_overhead_us(ov, mode.ungated if o else mode.closed, float(n), R)
                     for n, o in zip(tokens_per_rank, open_)])


def rank_loads(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(total, routed) token-slots per rank ``[..., R]`` from ``[..., R, S + 1]``."""
    return slots.sum(-1), slots[..., :-1].sum(-1)


def step_balancedness(loads: np.ndarray) -> np.ndarray:
    """Balancedness per step (layer mean) from ``[N, L, R]`` loads: ``[N]``."""
    return metrics.balancedness(torch.from_numpy(loads)).mean(-1).numpy()


def mean_over_max(mean: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``metrics.balancedness`` from a mean load and a max load given apart (e.g. an LP bound's
    max), elementwise; 1.0 where the max is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(top > 0, mean / top, 1.0)


def token_summary(slots: np.ndarray, static: np.ndarray, mask: np.ndarray, bound_joint: np.ndarray,
                  class_bound: np.ndarray | None) -> dict:
    """The token metrics of one mode on the steps in ``mask`` (``[N]`` bool)."""
    total, _ = rank_loads(slots[mask])
    b = step_balancedness(total)
    mx = total.max(-1)
    gap = metrics.gap_to_bound(torch.from_numpy(mx), torch.from_numpy(bound_joint[mask])).numpy()
    out = {
        "balancedness_mean": float(b.mean()),
        "balancedness_p5": float(np.percentile(b, 5)),
        "gap_to_bound_mean": float(gap.mean()),
        "moe_time_ratio_vs_static": metrics.time_ratio(torch.from_numpy(mx),
                                                       torch.from_numpy(rank_loads(static[mask])[0].max(-1))),
    }
    if class_bound is not None:
        cg = metrics.gap_to_bound(torch.from_numpy(mx), torch.from_numpy(class_bound[mask])).numpy()
        out["gap_to_class_bound_mean"] = float(cg.mean())
    return out


def layer_times(slots: np.ndarray, cost: CostModel) -> np.ndarray:
    """Busiest rank's modelled µs per (step, layer): ``[..., R, S+1] -> [...]``."""
    q = torch.from_numpy(slots.reshape(*slots.shape[:-2], -1)).to(torch.long)
    return cost.layer_time(q, slots.shape[-1]).numpy()


def time_summary(slots: np.ndarray, static: np.ndarray, mask: np.ndarray, overhead_us: np.ndarray,
                 open_: np.ndarray, cost: CostModel) -> dict:
    """Modelled time (with overhead) vs static, tile balancedness and break-even overhead."""
    t_mode = layer_times(slots[mask], cost)  # [n, L]
    t_static = layer_times(static[mask], cost)
    ovh = np.broadcast_to(overhead_us[mask][:, None], t_mode.shape)
    tiles = metrics.tile_loads(torch.from_numpy(slots[mask].reshape(*t_mode.shape, -1)).to(torch.long), cost,
                               slots.shape[-1])
    balanced = np.broadcast_to(open_[mask][:, None], t_mode.shape)
    n_bal = int(balanced.sum())
    gain = float((t_static - t_mode)[balanced].sum())
    return {
        "time_vs_static": metrics.time_ratio(torch.from_numpy(t_mode + ovh), torch.from_numpy(t_static)),
        "time_vs_static_no_overhead": metrics.time_ratio(torch.from_numpy(t_mode), torch.from_numpy(t_static)),
        "overhead_us_per_layer": float(ovh.mean()) if ovh.size else 0.0,
        "tile_balancedness": metrics.mean_balancedness(tiles),
        "break_even_overhead_us": gain / n_bal if n_bal else None,
        "layer_time_us_mean": float(t_mode.mean()) if t_mode.size else 0.0,
        "static_layer_time_us_mean": float(t_static.mean()) if t_static.size else 0.0,
        "balanced_share": n_bal / t_mode.size if t_mode.size else 0.0,
    }


def mode_slots(setup: Setup, arr: StepArrays, tokens_per_rank: np.ndarray) -> tuple[dict, dict, dict]:
    """(slots ``[N, L, R, S+1]`` float64, gate-open mask ``[N]``, overhead µs per step ``[N]``) of every
    asked mode (``tokens_per_rank [N]``: each step's largest DP rank); gated ones derived."""
    c = setup.cfg.cost
    f64: dict[str, np.ndarray] = {}  # one float64 copy per evaluated (ungated) mode

    def as_f64(name: str) -> np.ndarray:
        if name not in f64:
            f64[name] = arr.slots[name].astype(np.float64)
        return f64[name]

    slots, open_, ovh = {}, {}, {}
    for m in setup.modes:
        base = as_f64(m.ungated.name)
        o = gate_open(m, tokens_per_rank, setup.cost, setup.overheads, setup.k, setup.S, setup.R, c.expected_gain)
        slots[m.name] = gated_slots(base, as_f64(m.closed.name), o) if m.gated else base
        open_[m.name] = o
        ovh[m.name] = step_overheads(m, tokens_per_rank, o, setup.overheads, setup.R)
    return slots, open_, ovh


def scored(setup: Setup, slots: dict):
    """``(mode, slots [steps, layers, R, S], mask [steps])`` of each mode scored on any step
    (``mask``: the steps it has a result for; a mode scored on none is left out)."""
    for m in setup.modes:
        s = slots[m.name]
        mask = ~np.isnan(s).any((1, 2, 3))
        if mask.any():
            yield m, s, mask


def _bound_summary(bound: np.ndarray, mean_load: np.ndarray, static_max: np.ndarray, mask: np.ndarray) -> dict:
    b = mean_over_max(mean_load, bound)[mask].mean(1)
    return {"balancedness_mean": float(b.mean()), "balancedness_p5": float(np.percentile(b, 5)),
            "moe_time_ratio_vs_static": metrics.time_ratio(torch.from_numpy(bound[mask]),
                                                           torch.from_numpy(static_max[mask]))}


def _summaries(setup: Setup, arr: StepArrays, slots: dict, open_: dict, ovh: dict) -> dict:
    bj, bl = arr.bounds["joint"], arr.bounds["local"]
    static = slots["static"]
    out = {}
    for m, s, mask in scored(setup, slots):
        res = token_summary(s, static, mask, bj, bj if m.moves_shared else bl)
        _, routed = rank_loads(s[mask])
        rb = step_balancedness(routed)
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
        res.update(time_summary(s, static, mask, ovh[m.name], open_[m.name], setup.cost))
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
        total, routed = rank_loads(np.nan_to_num(s))
        mx = total.max(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            bal = np.where(mx > 0, mean_load / mx, 1.0)
        series[m.name] = np.where(scored, bal.mean(1), np.nan)
        b = np.where(scored[:, None], bal, np.inf)
        ws, wl = np.unravel_index(int(np.argmin(b)), b.shape)
        worst[m.name] = {"step": int(ws), "layer": int(wl), "routed": routed[ws, wl].tolist(),
                         "shared": (total[ws, wl] - routed[ws, wl]).tolist(), "mean": float(mean_load[ws, wl]),
                         "bound": float(bj[ws, wl]), "balancedness": float(bal[ws, wl])}
    series["bound"] = mean_over_max(mean_load, bj).mean(1)
    series["bound-local-shared"] = mean_over_max(mean_load, bl).mean(1)
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
        out[m.name] = token_summary(s, slots["static"], mask, bj, None)
    b = _bound_summary(bj, mean_load, static_max, mask)
    b["gap_to_bound_mean"] = 0.0
    out["bound"] = b
    return out


def aggregate_run(setup: Setup, arr: StepArrays) -> dict:
    """Summaries, bounds, per-step series and worst steps of the main replay."""
    tokens_per_rank = arr.tokens.max(1).astype(np.float64)
    slots, open_, ovh = mode_slots(setup, arr, tokens_per_rank)
    static_total, static_routed = rank_loads(slots["static"])
    mean_load = static_total.sum(-1) / setup.R
    static_max = static_total.max(-1)
    modes = _summaries(setup, arr, slots, open_, ovh)
    all_steps = np.ones(setup.N, dtype=bool)
    bj, bl, br = arr.bounds["joint"], arr.bounds["local"], arr.bounds["routed"]
    brt = mean_over_max(static_routed.sum(-1) / setup.R, br).mean(1)
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
