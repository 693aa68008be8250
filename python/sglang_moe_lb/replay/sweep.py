"""``--batch-sweep``: the trace's routing replayed at fixed batch sizes (tokens per rank).

For each size N every rank serves exactly N tokens per step:

* bundled data and the synthetic generator draw N tokens per rank directly from the same
  per-step popularity (``Trace.regenerate``);
* per_token dumps resample token *rows* (all layers of a token together, so the recorded
  co-occurrence stays) uniformly with replacement, N per source rank from that rank's own
  recorded tokens (from the whole batch when the dump's ranks are re-split, or a rank
  recorded none);
* counts-only dumps (stat, per_pass) draw N x R tokens from each step's recorded per-expert
  distribution (``sampling.inclusion_probabilities`` + ``sample_topk``).

The placement timeline is the one of the recorded trace (a server's placement comes from its
recorded traffic, not from the batch size), and each size is scored on ``sweep_steps``
evenly spaced steps of it. The evaluation and aggregation are the regular ones.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import metrics
from .aggregate import mode_slots, rank_loads, scored, step_balancedness, time_summary
from .evaluate import StepArrays, evaluate_step, make_context, worker_count
from .mode_names import server_default
from .pool import run_jobs
from .sampling import inclusion_probabilities, sample_topk
from .setup import Setup, evenly_spaced
from .sources import Batch, Trace, step_generator
from .timeline import Timeline

__all__ = ["run_sweep", "sized_trace", "resample_tokens", "resample_counts", "AUTO_SWEEP_UPSTREAM_STEPS",
           "AUTO_SWEEP_UPSTREAM_MAX_TOKENS"]

AUTO_SWEEP_UPSTREAM_STEPS = 1  # steps per batch size SGLang's Waterfill is scored on by default
AUTO_SWEEP_UPSTREAM_MAX_TOKENS = 4096  # ... and only up to this many tokens per rank


def resample_tokens(batch: Batch, per_rank: int, num_ranks: int, gen: torch.Generator) -> Batch:
    """N token rows per source rank, drawn with replacement from the batch's own rows."""
    ids = batch.topk
    T = ids.shape[1]
    sizes = batch.rank_sizes if batch.rank_sizes is not None and len(batch.rank_sizes) == num_ranks else None
    starts = np.cumsum([0] + list(sizes))[:-1] if sizes else None
    picks = []
    for r in range(num_ranks):
        if sizes and sizes[r] > 0:
            picks.append(int(starts[r]) + torch.randint(sizes[r], (per_rank,), generator=gen))
        else:
            picks.append(torch.randint(T, (per_rank,), generator=gen))
    return Batch(ids[:, torch.cat(picks)], [per_rank] * num_ranks, batch.label)


def resample_counts(counts: torch.Tensor, per_rank: int, num_ranks: int, top_k: int, gen: torch.Generator,
                    label: str) -> Batch:
    """N x R tokens drawn from a step's per-expert distribution ``counts [L, E]``."""
    w = counts.to(torch.float64)
    w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))  # an empty layer: uniform
    pi = inclusion_probabilities(w, top_k)
    return Batch(sample_topk(pi, per_rank * num_ranks, top_k, gen), [per_rank] * num_ranks, label)


def sized_trace(trace: Trace, per_rank: int, num_ranks: int, seed: int) -> tuple[Trace, str]:
    """(the trace at ``per_rank`` tokens per rank, how it was made)."""
    if trace.regenerate is not None:
        return trace.regenerate(per_rank), "drawn from the generator at this size"
    if trace.step_counts is not None:
        counts = trace.step_counts

        def make(step: int) -> Batch:
            gen = step_generator(seed, step, salt=1000 + per_rank)
            return resample_counts(counts[step], per_rank, num_ranks, trace.top_k, gen, "recorded")

        how = "tokens drawn from each step's recorded per-expert counts"
    else:
        def make(step: int) -> Batch:
            gen = step_generator(seed, step, salt=2000 + per_rank)
            return resample_tokens(trace.batch(step), per_rank, num_ranks, gen)

        how = "recorded token rows resampled with replacement per source rank"
    t = Trace(trace.num_logical, trace.top_k, trace.num_layers, trace.num_steps, make,
              calibration=trace.calibration, recorded_placement=trace.recorded_placement, phases=trace.phases,
              info=trace.info)
    return t, how


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
    ctxs = {n: make_context(setup, timeline, up_steps if n in up_sizes else [], with_bounds=False) for n in cfg.batch_sweep}
    arrays = {n: StepArrays.empty(setup.eval_modes, len(steps), setup.L, setup.R, setup.S) for n in cfg.batch_sweep}
    index = {t: i for i, t in enumerate(steps)}
    # Slow items first (SGLang's Waterfill, big batches), so the workers share them out.
    items = sorted(((n, t) for n in cfg.batch_sweep for t in steps),
                   key=lambda it: (it[1] not in ctxs[it[0]].upstream_steps, -it[0], it[1]))

    def task(item):
        n, t = item
        return evaluate_step(ctxs[n], t, sized[n][0].batch(t))

    jobs = run_jobs(task, items, worker_count(cfg, len(items)), cfg.threads, "sweep" if cfg.progress else None)
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
    slots, open_, ovh = mode_slots(setup, arr, tokens_per_rank)
    row_modes = {}
    for m, s, mask in scored(setup, slots):
        t = time_summary(s, slots["static"], mask, ovh[m.name], open_[m.name], setup.cost)
        total, _ = rank_loads(s[mask])
        static_total, _ = rank_loads(slots["static"][mask])
        t.update(balancedness_mean=float(step_balancedness(total).mean()),
                 moe_time_ratio_vs_static=metrics.time_ratio(torch.from_numpy(total.max(-1)),
                                                             torch.from_numpy(static_total.max(-1))),
                 steps_scored=int(mask.sum()))
        if m.gated:
            t["gate_open"] = bool(open_[m.name][mask].all())
        row_modes[m.name] = t
    return {"tokens_per_rank": n, "server_default": server_default("lplb"),
            "server_default_waterfill_lplb": server_default("waterfill+lplb"), "modes": row_modes}
