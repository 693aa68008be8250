"""LPLB split tables inside SGLang's EPLB cycle: a small generator, like ``EPLBManager``'s.

Sequence (hooks in ``manifest.HOOKS``):

1. ``EPLBManager.rebalance`` starts (wrapped): ``begin()``.
2. ``ExpertLocationMetadata.init_by_eplb`` returns the new placement computed from the
   recorder's window (``logical_count [steps, layers, experts]``, identical on every rank):
   ``on_new_placement`` starts a background thread that solves each layer's table with the
   core (``table.solve_table``: the scenario LP in HiGHS over the window's recent steps).
3. SGLang moves weights and updates its metadata layer by layer; the runtime follows each
   new placement at once, with the even split, so dispatch always matches the weights.
4. ``EPLBManager.rebalance`` finishes: ``end()``. ``EPLBManager.on_forward_pass_end`` advances
   our generator once per pass (``on_forward_pass_end``); at the end of the pass where the
   rebalance ended, every rank installs the solved tables, waiting for its thread only if the
   solve is still running. Every rank solves the same LP from the same window and installs at
   the same pass, so all ranks switch together (needed without an a2a backend, where ranks
   must agree on every token's copy).

A layer whose solve raises keeps the table it is serving. At start-up, a window passed
through ``--init-expert-location`` (a file with ``logical_count``) is solved synchronously
before the first forward (``startup``); without one the tables start even.

One log line per rebalance (EP rank 0) gives each MoE layer's balancedness on the recorded
window (``table.table_balancedness``: SGLang's mean/max per step, averaged) with the old
placement and table, with the even split on the new placement, and with the new table, plus
the solve time. ``Runtime.last_report`` keeps the same numbers.

The runtime owns its ``Rebalancer`` (created with it); the rebalancer only calls
``runtime.install_table`` and reads the runtime's current tables.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..placement import Placement
from ..table import even_table, solve_table, table_balancedness

__all__ = ["Rebalancer"]

logger = logging.getLogger("sglang_moe_lb.plugin")


class _Job:
    """One solve: new placement rows + window -> per-layer tables (in a thread, or inline)."""

    def __init__(self, rows: torch.Tensor, window: torch.Tensor, old: dict, layers: list[int],
                 num_ranks: int, num_logical: int, label: str):
        self.rows, self.window, self.label = rows, window, label
        self.old = old  # layer -> (row, table) being served when the job started
        self.layers, self.R, self.E = layers, num_ranks, num_logical
        self.results: dict[int, tuple] = {}  # layer -> (row, table | None, seconds, error | None)
        self.report: dict[int, tuple] = {}  # layer -> (before, even, after)
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="moe-lb-lplb-solve", daemon=True)

    def _run(self) -> None:
        t_all = time.perf_counter()
        for layer in self.layers:
            row = self.rows[layer]
            t0 = time.perf_counter()
            try:
                pl = Placement(row, self.R, self.E)
                if not pl.has_replicas:
                    continue
                table = solve_table(pl, self.window[:, layer], strict=True)
                self.results[layer] = (row, table, time.perf_counter() - t0, None)
            except Exception as err:  # a failing layer keeps its current table
                self.results[layer] = (row, None, time.perf_counter() - t0, err)
                continue
            try:  # the log line only; never costs a layer its table
                w = self.window[:, layer]
                old = self.old.get(layer)
                before = None
                if old is not None and old[1] is not None:
                    before = table_balancedness(Placement(old[0], self.R, self.E), old[1], w)
                self.report[layer] = (before, table_balancedness(pl, even_table(pl), w), table_balancedness(pl, table, w))
            except Exception as err:
                logger.debug("[moe-lb] balancedness report failed on layer %d: %s", layer, err)
        self.seconds = time.perf_counter() - t_all

    def wait(self) -> float:
        """Join the thread; the seconds waited."""
        t0 = time.perf_counter()
        if self.thread.is_alive() or self.thread.ident is not None:
            self.thread.join()
        return time.perf_counter() - t0


class Rebalancer:
    """The table schedule of one runtime through SGLang's EPLB cycle (module docstring)."""

    def __init__(self, runtime):
        self._rt = runtime
        self._in_rebalance = False
        self._job: _Job | None = None
        self._startup: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, window)
        self.count = 0
        self._cycle = self._steps()

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
        if window.dim() == 2:
            window = window.unsqueeze(0)
        rows = metadata.physical_to_logical_map_cpu.clone()
        if not self._in_rebalance:
            self._startup = (rows, window)
            return
        if self._job is not None:
            self._job.wait()
        self.count += 1
        self._job = self._new_job(rows, window, f"rebalance #{self.count}")
        self._job.thread.start()

    def on_forward_pass_end(self) -> None:
        """One forward pass ended (the same pass on every rank): advance the cycle."""
        next(self._cycle)

    def startup(self) -> None:
        """Solve the ``--init-expert-location`` window (if any) before the first forward."""
        if self._startup is None:
            return
        rows, window = self._startup
        self._startup = None
        job = self._new_job(rows, window, "start-up")
        job._run()
        self._install(job, waited=0.0, source="startup-scenario")

    def shutdown(self) -> None:
        if self._job is not None and self._job.thread.is_alive():
            self._job.thread.join(timeout=30)

    # -- the cycle ----------------------------------------------------------------------------
    def _steps(self):
        """Yields once per forward pass; installs a solve at the first pass end after its rebalance."""
        while True:
            if self._job is not None and not self._in_rebalance:
                job, self._job = self._job, None
                self._install(job, waited=job.wait())
            yield

    def _new_job(self, rows: torch.Tensor, window: torch.Tensor, label: str) -> _Job:
        rt = self._rt
        layers = sorted(rt.moe_layers) if rt.moe_layers else list(range(rows.shape[0]))
        return _Job(rows, window, rt.served_tables(), layers, rt.num_ranks, rt.num_logical, label)

    def _install(self, job: _Job, waited: float, source: str = "scenario") -> None:
        installed, failed, stale = [], [], []
        for layer, (row, table, _secs, err) in sorted(job.results.items()):
            if err is not None or table is None:
                failed.append((layer, err))
                continue
            (installed if self._rt.install_table(layer, row, table, source) else stale).append(layer)
        for layer, err in failed:
            logger.warning("[moe-lb] %s: LPLB solve failed on layer %d (%s: %s); keeping its current table",
                           job.label, layer, type(err).__name__, err)
        worst = max((r[2] for r in job.results.values()), default=0.0)
        per_layer = " ".join(
            f"{layer}:{_fmt(b)}->{_fmt(e)}->{_fmt(a)}" for layer, (b, e, a) in sorted(job.report.items())
            if layer in installed
        )
        self._rt.last_report = {
            "label": job.label, "installed": installed, "failed": [lay for lay, _ in failed], "stale": stale,
            "solve_seconds": job.seconds, "max_layer_seconds": worst, "waited_seconds": waited,
            "balancedness": {lay: v for lay, v in job.report.items() if lay in installed},
            "counters": self._rt.counters(),
        }
        if self._rt.is_log_rank():
            logger.info(
                "[moe-lb] %s: LPLB tables for %d layers (%d failed, %d stale) solved in %.3fs "
                "(slowest layer %.3fs, waited %.3fs). Balancedness old->even->lplb: %s",
                job.label, len(installed), len(failed), len(stale), job.seconds, worst, waited, per_layer or "-",
            )


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
