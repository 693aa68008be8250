"""The plan worker process: same plans as an in-process solve, and a dead worker is reported
(never waited on forever) and replaced by the next solve."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from sglang_moe_lb import CostModel
from sglang_moe_lb.plan import solve_rows
from sglang_moe_lb.plan_worker import PlanWorker, WorkerGone

COST = CostModel.for_model({"hidden_size": 256, "moe_intermediate_size": 128}, gpu="H200", dtype="bf16")
KW = dict(num_ranks=2, num_logical=4, top_k=2)
ROWS = {0: torch.tensor([0, 1, 2, 3, 0, 1]), 1: torch.tensor([3, 2, 1, 0, 3, 3])}
WINDOW = torch.tensor([[[40.0, 30.0, 20.0, 10.0], [1.0, 2.0, 3.0, 90.0]]])


@pytest.fixture
def worker():
    w = PlanWorker()
    yield w
    w.stop()


def test_the_worker_returns_the_in_process_plans(worker):
    got = worker.solve(ROWS, WINDOW, COST, **KW)
    want = solve_rows(ROWS, WINDOW, COST, **KW)
    assert sorted(got) == sorted(want) == [0, 1]
    for layer in ROWS:
        assert got[layer][1] is None and want[layer][1] is None
        assert torch.equal(got[layer][0], want[layer][0])


def test_a_bad_request_is_a_per_layer_error_not_a_dead_worker(worker):
    got = worker.solve({5: ROWS[0]}, WINDOW, COST, **KW)  # the window has 2 layers, no layer 5
    assert got[5][0] is None and "layer" in got[5][1]
    assert worker.solve(ROWS, WINDOW, COST, **KW)[0][1] is None  # same process, still serving


def test_a_killed_worker_raises_worker_gone_and_the_next_solve_starts_another(worker):
    worker.solve(ROWS, WINDOW, COST, **KW)
    pid = worker._proc.pid
    # A solve long enough to be killed in the middle (what the OOM killer does).
    big = {layer: torch.arange(64 + 16) % 64 for layer in range(400)}
    window = torch.rand(1, 400, 64) * 100
    killer = threading.Timer(0.5, os.kill, (pid, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(WorkerGone, match="plan worker process ended"):
        worker.solve(big, window, COST, num_ranks=8, num_logical=64, top_k=4)
    assert time.monotonic() - t0 < 60
    killer.join()
    assert worker.solve(ROWS, WINDOW, COST, **KW)[0][1] is None
    assert worker._proc.pid != pid


def test_stop_ends_a_running_solve_with_worker_gone(worker):
    big = {layer: torch.arange(64 + 16) % 64 for layer in range(400)}
    window = torch.rand(1, 400, 64) * 100
    worker.start()
    threading.Timer(0.5, worker.stop).start()
    with pytest.raises(WorkerGone):
        worker.solve(big, window, COST, num_ranks=8, num_logical=64, top_k=4)
    assert worker._proc is None
