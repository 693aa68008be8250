"""LPLB split tables inside SGLang's EPLB cycle.

Sequence (hooks in ``hooks.py``):

1. ``EPLBManager.rebalance`` starts (wrapped): we note that a rebalance is in progress.
2. ``ExpertLocationMetadata.init_by_eplb`` returns the new placement computed from the
   recorder's window (``logical_count [steps, layers, experts]``, identical on every rank):
   a background thread starts solving each layer's scenario LP in HiGHS
   (core ``scenario_split``) for that placement, off the forward path.
3. SGLang moves weights and updates its metadata layer by layer
   (``ExpertLocationMetadata.update``): the runtime follows each new placement at once,
   with the even split, so dispatch always matches where the weights are.
4. ``EPLBManager.rebalance`` finishes; at the end of that same forward pass
   (``EPLBManager.on_forward_pass_end``) every rank installs the solved tables, waiting for
   its thread only if the solve is still running. Every rank solves the same LP from the same
   all-reduced window and installs at the same pass, so all ranks switch together (needed
   without an a2a backend, where ranks must agree on every token's copy).

A layer whose solve raises keeps the plan it is serving (its previous table when the
placement did not change, the even split when it did). At start-up, a window passed through
``--init-expert-location`` (a file with ``logical_count``) is solved synchronously before
the first forward; without one the tables start even.

One log line per rebalance (EP rank 0) gives each MoE layer's balancedness on the recorded
window (``balancedness``: summed mean rank load over summed max rank load) before (old
placement and plan), with the even split on the new placement, and with the new table, plus
the solve time. ``Runtime.last_report`` keeps the same numbers.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..lp_split import fractions_to_split, scenario_split
from ..placement import Placement
from .runtime import Runtime

__all__ = ["Rebalancer", "solve_layer", "balancedness", "MAX_STEPS"]

logger = logging.getLogger("sglang_moe_lb.plugin")

MAX_STEPS = 64  # most recent non-empty recorded steps entering each layer's scenario LP


def _window_steps(window_layer: torch.Tensor) -> torch.Tensor:
    """Recorded steps of one layer with at least one token, most recent ``MAX_STEPS``."""
    w = window_layer.to(torch.float64)
    w = w[w.sum(-1) > 0]
    return w[-MAX_STEPS:]


def solve_layer(pl: Placement, window_layer: torch.Tensor) -> torch.Tensor:
    """One layer's split fractions ``[P]`` from its recorded steps ``[T, E]`` (core scenario LP)."""
    return scenario_split(pl, _window_steps(window_layer), max_steps=MAX_STEPS, strict=True)


def balancedness(pl: Placement, table: torch.Tensor, window_layer: torch.Tensor) -> float | None:
    """Window balancedness when ``table`` splits every recorded step's counts.

    ``sum_t mean_r load_t[r] / sum_t max_r load_t[r]`` over the steps that enter the LP: 1.0 is
    perfect, and since the scenario LP minimises ``sum_t max_r load_t[r]`` (the mean is fixed
    by the counts), its table scores at least as well as any other split on that window.
    """
    w = _window_steps(window_layer)
    if w.shape[0] == 0:
        return None
    mean = top = 0.0
    for counts in w:
        loads = pl.rank_loads(fractions_to_split(pl, table.cpu(), counts))
        mean += float(loads.mean())
        top += float(loads.max())
    return mean / top if top > 0 else None


class _Job:
    """One background solve: new placement rows + window -> per-layer tables."""

    def __init__(self, rt: Runtime, rows: torch.Tensor, window: torch.Tensor, old_plans: dict, label: str):
        self.rows = rows
        self.window = window
        self.label = label
        self.results: dict[int, tuple] = {}  # layer -> (row, table | None, seconds, error | None)
        self.report: dict[int, tuple] = {}  # layer -> (before, even, after)
        self._rt = rt
        self._old = {layer: (p.row, p.table.cpu() if p.table is not None else None) for layer, p in old_plans.items()}
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="moe-lb-lplb-solve", daemon=True)

    def _run(self):
        t_all = time.perf_counter()
        R, E = self._rt.num_ranks, self._rt.num_logical
        layers = sorted(self._rt.moe_layers) if self._rt.moe_layers else range(self.rows.shape[0])
        for layer in layers:
            row = self.rows[layer]
            t0 = time.perf_counter()
            try:
                pl = Placement(row, R, E)
                if not pl.has_replicas:
                    continue
                table = solve_layer(pl, self.window[:, layer])
                self.results[layer] = (row, table, time.perf_counter() - t0, None)
            except Exception as err:  # a failing layer keeps its current plan
                self.results[layer] = (row, None, time.perf_counter() - t0, err)
                continue
            try:  # the log line only; never costs a layer its table
                w = self.window[:, layer]
                old = self._old.get(layer)
                before = None
                if old is not None and old[1] is not None:
                    before = balancedness(Placement(old[0], R, E), old[1], w)
                even = scenario_split(pl, torch.zeros(0, E))
                self.report[layer] = (before, balancedness(pl, even, w), balancedness(pl, table, w))
            except Exception as err:
                logger.debug("[moe-lb] balancedness report failed on layer %d: %s", layer, err)
        self.seconds = time.perf_counter() - t_all

    def start(self):
        self.thread.start()
        return self

    def run_inline(self):
        self._run()
        return self


class Rebalancer:
    """Drives the split tables of one runtime through SGLang's EPLB cycle (module docstring)."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.in_rebalance = False
        self.startup_window: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, window)
        self.job: _Job | None = None
        self.install_due = False
        self.count = 0
        rt.rebalancer = self

    # -- hook entry points ----------------------------------------------------------------
    def on_new_placement(self, metadata, logical_count) -> None:
        """``init_by_eplb`` produced ``metadata`` from the window ``logical_count``."""
        if metadata is None or logical_count is None:
            return
        window = torch.as_tensor(logical_count).detach().to("cpu")
        if window.dim() == 2:
            window = window.unsqueeze(0)
        rows = metadata.physical_to_logical_map_cpu.clone()
        if not self.in_rebalance:
            self.startup_window = (rows, window)
            return
        if self.job is not None and self.job.thread.is_alive():
            self.job.thread.join()
        self.count += 1
        self.job = _Job(self.rt, rows, window, dict(self.rt.plans), f"rebalance #{self.count}").start()

    def begin(self) -> None:
        self.in_rebalance = True

    def end(self) -> None:
        self.in_rebalance = False
        if self.job is not None:
            self.install_due = True

    def tick(self) -> None:
        """End of a forward pass (same pass on every rank): install finished tables."""
        if not self.install_due:
            return
        self.install_due = False
        job, self.job = self.job, None
        t0 = time.perf_counter()
        job.thread.join()
        self._install(job, waited=time.perf_counter() - t0)

    def startup(self) -> None:
        """Solve the ``--init-expert-location`` window (if any) before the first forward."""
        if self.startup_window is None:
            return
        rows, window = self.startup_window
        self.startup_window = None
        job = _Job(self.rt, rows, window, {}, "start-up").run_inline()
        self._install(job, waited=0.0, source="startup-scenario")

    def shutdown(self) -> None:
        if self.job is not None and self.job.thread.is_alive():
            self.job.thread.join(timeout=30)

    # -- install + log ----------------------------------------------------------------------
    def _install(self, job: _Job, waited: float, source: str = "scenario") -> None:
        installed, failed, stale = [], [], []
        for layer, (row, table, _secs, err) in sorted(job.results.items()):
            if err is not None or table is None:
                failed.append((layer, err))
                continue
            (installed if self.rt.install_table(layer, row, table, source) else stale).append(layer)
        for layer, err in failed:
            logger.warning("[moe-lb] %s: LPLB solve failed on layer %d (%s: %s); keeping its current plan",
                           job.label, layer, type(err).__name__, err)
        worst = max((r[2] for r in job.results.values()), default=0.0)
        per_layer = " ".join(
            f"{layer}:{_fmt(b)}->{_fmt(e)}->{_fmt(a)}" for layer, (b, e, a) in sorted(job.report.items())
            if layer in installed
        )
        self.rt.last_report = {
            "label": job.label, "installed": installed, "failed": [l for l, _ in failed], "stale": stale,
            "solve_seconds": job.seconds, "max_layer_seconds": worst, "waited_seconds": waited,
            "balancedness": {l: v for l, v in job.report.items() if l in installed},
        }
        if self._is_log_rank():
            logger.info(
                "[moe-lb] %s: LPLB tables for %d layers (%d failed, %d stale) solved in %.3fs "
                "(slowest layer %.3fs, waited %.3fs). Balancedness old->even->lplb: %s",
                job.label, len(installed), len(failed), len(stale), job.seconds, worst, waited, per_layer or "-",
            )

    def _is_log_rank(self) -> bool:
        try:
            return self.rt.ep.rank == 0
        except Exception:
            return True


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
