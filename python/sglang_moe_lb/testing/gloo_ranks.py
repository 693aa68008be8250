"""Test-only helpers for multi-process gloo runs (one spawned process per EP rank).

Used by the plugin's multi-rank tests and the Waterfill gloo e2e test: pick a loopback port,
spawn the ranks, wait with one deadline, and fail with every rank's error file when a rank
hangs (a deadlock in a collective) or dies. Each worker writes ``rank{r}.pt`` on success and
``error_{r}.txt`` on failure into ``out_dir``.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path
from typing import Callable

__all__ = ["free_port", "run_ranks", "count_all_gathers"]


def free_port() -> int:
    """A free TCP port on loopback for the gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable, world: int, extra_args: tuple, out_dir: str | Path, timeout_s: float) -> list:
    """Spawn ``target(rank, world, port, *extra_args)`` per rank; return each rank's ``rank{r}.pt``."""
    import time

    import torch

    out = Path(out_dir)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *extra_args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    errors = {r: (out / f"error_{r}.txt").read_text() for r in range(world) if (out / f"error_{r}.txt").exists()}
    assert not hung, f"ranks {hung} did not finish in {timeout_s}s (deadlock?); errors: {errors}"
    assert not errors and all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}: {errors}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def count_all_gathers(comm_module) -> dict:
    """Wrap the plugin's one collective (``comm.all_gather_rows``) with a counter; returns it."""
    calls = {"n": 0}
    real_gather = comm_module.all_gather_rows

    def counting_gather(row, ep):
        calls["n"] += 1
        return real_gather(row, ep)

    comm_module.all_gather_rows = counting_gather
    return calls
