"""Dispatch plans inside SGLang's EPLB cycle: a small generator, like ``EPLBManager``'s.

Sequence (hooks in ``manifest.HOOKS``):

1. Start-up (``prepare_moe_topk``, before the first forward): every layer's plans are solved
   from the ``--init-expert-location`` window when one was given (SGLang places from it with
   ``init_by_eplb``), else from uniform shares (``startup``).
2. ``EPLBManager.rebalance`` starts (wrapped): ``begin()``.
3. ``ExpertLocationMetadata.init_by_eplb`` returns the new placement computed from the
   recorder's window (``logical_count [steps, layers, experts]``, the same on every rank):
   ``on_new_placement`` starts a background solve of every layer's plans for the new rows.
4. SGLang moves weights and updates its metadata layer by layer; the runtime follows each new
   placement at once with the even plan (every copy used), so dispatch always matches weights.
5. ``EPLBManager.rebalance`` finishes: ``end()``. ``EPLBManager.on_forward_pass_end``
   advances the generator once per pass: a finished solve installs at the first pass end
   after it (in place, into the maps captured graphs read). With an a2a backend ranks may
   switch plans at different passes (each rank dispatches its own tokens to copies that hold
   their experts); without one every rank must pick the same copy for every token, so each
   installs at the first pass end after the solve started, waiting for it if it still runs
   (the same inputs give the same plans on every rank).
6. Every ``refresh_passes`` passes, when no solve runs: the last ``window_passes`` passes of
   recorded counts (``counts_source``: SGLang's recorder, summed over the EP group) start a
   background solve for the rows being served. No weights move.

A layer whose solve raises keeps the plan it serves (one log line per solve names them); a
solve that runs past ``timeout_s`` is dropped (its worker process stopped), and every layer
keeps its plan (one log line). One log line per install names the layers, levels and solve
time. ``Runtime.last_report`` keeps the same numbers.

Where a solve runs (``solver``): ``process`` (default) in one helper process
(``plan_worker.PlanWorker``), so it never holds the forward thread's interpreter lock; or
``thread``, in the scheduler process (no extra process; forward passes slow down while it
runs: ``benchmark/bench_plan.py`` measures both). The start-up solve runs inline either way,
before the first forward pass.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from ..placement import Placement
from ..plan import plan_maps, solve_rows
from ..plan_worker import PlanWorker

__all__ = ["Rebalancer", "PlanJob", "SOLVERS"]

SOLVERS = ("process", "thread")

logger = logging.getLogger("sglang_moe_lb.plugin")


class PlanJob:
    """One solve: placement rows + a counts window -> each layer's maps ``[levels, E, W]`` int32 (CPU).

    ``results[layer] = (row, maps | None, error text | None)``. ``run()`` solves inline;
    ``start()`` runs a helper thread that solves in-process (``worker`` None) or waits for the
    worker process (the thread then holds no lock while the process works). ``after``: the
    ``done`` event of a superseded job whose request the worker is still answering; this job
    sends its own only after that reply (one request at a time on the worker's pipe).
    """

    def __init__(self, rows: dict[int, torch.Tensor], window: torch.Tensor, label: str, *, num_ranks: int,
                 num_logical: int, cost, top_k: int, levels: tuple[int, ...], hash_slots: int,
                 worker: PlanWorker | None = None, after: threading.Event | None = None):
        self.rows, self.window, self.label = rows, window, label
        self.kw = dict(num_ranks=num_ranks, num_logical=num_logical, top_k=top_k, levels=levels,
                       hash_slots=hash_slots)
        self.cost, self.worker, self.after = cost, worker, after
        self.results: dict[int, tuple] = {}
        self.seconds = 0.0
        self.started = 0.0
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="moe-lb-plan-solve", daemon=True)

    def start(self) -> None:
        self.started = time.perf_counter()
        self.thread.start()

    def run(self) -> None:
        self.started = self.started or time.perf_counter()
        try:
            if self.worker is not None:
                if self.after is not None:
                    self.after.wait()
                if self.cancel.is_set():
                    return
                weights = self.worker.solve(self.rows, self.window, self.cost, **self.kw)
            else:
                weights = solve_rows(self.rows, self.window, self.cost, stop=self.cancel.is_set, **self.kw)
            W = self.kw["hash_slots"]
            for layer, (w, err) in weights.items():
                row = self.rows[layer]
                if err is not None:
                    self.results[layer] = (row, None, err)
                    continue
                pl = Placement(row, self.kw["num_ranks"], self.kw["num_logical"])
                self.results[layer] = (row, plan_maps(pl, w[:, None], W)[:, 0].to(torch.int32), None)
        except Exception as err:  # the worker died, or a bug: every layer keeps its plan
            for layer, row in self.rows.items():
                self.results.setdefault(layer, (row, None, f"{type(err).__name__}: {err}"))
        finally:
            self.seconds = time.perf_counter() - self.started
            self.done.set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started else 0.0


class Rebalancer:
    """Plans of one runtime through SGLang's EPLB cycle (module docstring).

    counts_source: ``(passes) -> [L, E] counts | None``, the recent recorded counts summed over
    the EP group (the plugin's reader of SGLang's recorder), or None (no refresh).
    """

    def __init__(self, runtime, counts_source: Callable[[int], torch.Tensor | None] | None = None):
        self._rt = runtime
        self.counts_source = counts_source
        self.refresh_passes = 0
        self.window_passes = 1
        self.timeout_s = 60.0
        self.worker: PlanWorker | None = None  # background solves run here (solver "process")
        self._in_rebalance = False
        self._job: PlanJob | None = None
        self._superseded: PlanJob | None = None  # dropped for a newer solve, its reply still due from the worker
        self._install_at: int | None = None  # the pass a rank-invariant runtime installs at
        self._startup: tuple[dict, torch.Tensor] | None = None  # (rows, window) from init_by_eplb at start-up
        self.count = 0  # rebalances
        self.refreshes = 0
        self.passes = 0
        self._last_solve_pass = 0
        self.stall_s = 0.0  # seconds this rank's forward thread spent in install (and waits)
        self._cycle = self._steps()

    def configure(self, *, refresh_passes: int, window_passes: int, timeout_s: float, solver: str = "process") -> None:
        if solver not in SOLVERS:
            raise ValueError(f"plan solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        self.refresh_passes, self.window_passes, self.timeout_s = refresh_passes, max(1, window_passes), timeout_s
        self.worker = PlanWorker() if solver == "process" else None
        if self.worker is not None:
            # Start it now, beside the server's own start-up: a first start at the first rebalance
            # costs seconds (interpreter + torch import) that every rank waits for without an a2a backend.
            self.worker.start()

    # -- hook entry points --------------------------------------------------------------------
    def begin(self) -> None:
        self._in_rebalance = True

    def end(self) -> None:
        self._in_rebalance = False

    def on_new_placement(self, metadata, logical_count) -> None:
        """``init_by_eplb`` produced ``metadata`` from the window ``logical_count``."""
        if metadata is None or logical_count is None:
            return
        window = torch.as_tensor(logical_count).detach().to("cpu")
        rows = metadata.physical_to_logical_map_cpu.clone()
        if not self._in_rebalance:
            self._startup = (rows, window)
            return
        self._drop_job("a new rebalance")
        self.count += 1
        self._start({layer: rows[layer] for layer in self._layers(rows)}, window, f"rebalance #{self.count}")

    def on_forward_pass_end(self) -> None:
        """One forward pass ended (the same pass on every rank): advance the cycle."""
        next(self._cycle)

    def startup(self) -> None:
        """Solve plans before the first forward: from the start-up window, else uniform shares."""
        rt = self._rt
        if self._startup is not None:
            rows, window = self._startup
            label = "start-up"
        else:
            rows = {layer: st.row for layer, st in rt.layers.items()}
            window = torch.ones(1, max(rows, default=0) + 1, rt.num_logical)
            label = "start-up (uniform shares: no --init-expert-location counts)"
        self._startup = None
        job = self._new_job({layer: rows[layer] for layer in self._layers(rows)}, window, label, inline=True)
        job.run()
        self._install(job, waited=0.0)

    def shutdown(self) -> None:
        if self._job is not None:
            self._job.cancel.set()
        if self.worker is not None:
            self.worker.stop()
        if self._job is not None and self._job.thread.is_alive():
            self._job.thread.join(timeout=30)

    # -- the cycle ----------------------------------------------------------------------------
    def _steps(self):
        """Yields once per forward pass: installs finished solves, drops late ones, starts refreshes."""
        while True:
            self.passes += 1
            job = self._job
            if job is not None and not self._in_rebalance:
                if self._install_at is not None and self.passes >= self._install_at:
                    t0 = time.perf_counter()
                    job.done.wait()  # rank-invariant: every rank installs at this pass
                    self._job, self._install_at = None, None
                    self._install(job, waited=time.perf_counter() - t0)
                elif self._install_at is None and job.done.is_set():
                    self._job = None
                    self._install(job, waited=0.0)
                elif self._install_at is None and job.elapsed() > self.timeout_s:
                    self._drop_job(f"it ran past --moe-lb-plan-timeout {self.timeout_s:g}s", stuck=True)
            elif job is None and not self._in_rebalance and self._refresh_due():
                self._refresh()
            yield

    def _refresh_due(self) -> bool:
        return (self.refresh_passes > 0 and self.counts_source is not None
                and self.passes - self._last_solve_pass >= self.refresh_passes)

    def _refresh(self) -> None:
        self._last_solve_pass = self.passes
        counts = self.counts_source(self.window_passes)
        if counts is None:
            return
        self.refreshes += 1
        rt = self._rt
        rows = {layer: st.row for layer, st in rt.layers.items()}
        self._start(rows, counts, f"refresh #{self.refreshes}")

    def _layers(self, rows) -> list[int]:
        rt = self._rt
        n = rows.shape[0] if isinstance(rows, torch.Tensor) else len(rows)
        return sorted(rt.moe_layers) if rt.moe_layers else (list(range(n)) if isinstance(rows, torch.Tensor) else sorted(rows))

    def _new_job(self, rows: dict, window: torch.Tensor, label: str, inline: bool = False) -> PlanJob:
        rt = self._rt
        prev, self._superseded = self._superseded, None
        after = prev.done if prev is not None and not inline and not prev.done.is_set() else None
        return PlanJob(rows, window, label, num_ranks=rt.num_ranks, num_logical=rt.num_logical, cost=rt.cost,
                       top_k=rt.topk or 1, levels=rt.levels, hash_slots=rt.hash_slots,
                       worker=None if inline else self.worker, after=after)

    def _start(self, rows: dict, window: torch.Tensor, label: str) -> None:
        self._last_solve_pass = self.passes
        self._job = self._new_job(rows, window, label)
        self._install_at = self.passes + 1 if self._rt.rank_invariant else None
        self._job.start()

    def _drop_job(self, why: str, *, stuck: bool = False) -> None:
        """Forget the running solve. A stuck one (time-out) dies with the worker process, and the
        next solve starts another; a superseded one finishes in the worker (its reply is ignored)
        and the next solve waits for it: starting a process costs seconds, which every rank would
        wait for without an a2a backend."""
        job = self._job
        if job is None:
            return
        self._job, self._install_at = None, None
        job.cancel.set()
        if job.worker is not None:
            if stuck:
                job.worker.stop()
            else:
                self._superseded = job
        if self._rt.is_log_rank():
            # A refresh superseded by a rebalance is routine (INFO); a time-out is not.
            logger.log(logging.WARNING if stuck else logging.INFO,
                       "[moe-lb] %s: plan solve dropped after %.1fs (%s); every layer keeps its plan",
                       job.label, job.elapsed(), why)

    def _install(self, job: PlanJob, waited: float) -> None:
        t0 = time.perf_counter()
        installed, failed, stale = [], [], []
        for layer, (row, maps, err) in sorted(job.results.items()):
            if err is not None or maps is None:
                failed.append((layer, err))
            elif self._rt.install_plan(layer, row, maps, job.label):
                installed.append(layer)
            else:
                stale.append(layer)
        copy_s = time.perf_counter() - t0
        self.stall_s += waited + copy_s
        lv = self._rt.levels
        self._rt.last_report = {
            "label": job.label, "installed": installed, "failed": [lay for lay, _ in failed], "stale": stale,
            "solve_seconds": job.seconds, "waited_seconds": waited, "install_seconds": copy_s,
            "levels": list(lv), "counters": self._rt.counters(),
        }
        if not self._rt.is_log_rank():
            return
        logger.info("[moe-lb] %s: plans installed for %d layers x %d levels (%d..%d tokens/rank), solved in %.3fs "
                    "(waited %.3fs, install %.4fs); %d failed, %d stale",
                    job.label, len(installed), len(lv), lv[0], lv[-1], job.seconds, waited, copy_s,
                    len(failed), len(stale))
        if failed:
            layer, err = failed[0]
            logger.warning("[moe-lb] %s: plan solve failed on layers %s (first: layer %d, %s); they keep their "
                           "plans", job.label, [lay for lay, _ in failed], layer, err)
