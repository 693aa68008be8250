"""The plan cycle's generator on its own (a stub runtime): installs at pass boundaries, never
stalls a pass with an a2a backend, drops a late solve, keeps plans through failures, refreshes
from recent counts; and the reader of SGLang's recorder ring."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from sglang_moe_lb import CostModel, Placement
from sglang_moe_lb import plan as plan_mod
from sglang_moe_lb.plan import plan_maps, static_like_weights
from sglang_moe_lb.plugin import rebalance

CM = CostModel(weight_bytes=44e6, flops_per_token=1e6, bandwidth=4.4e12, peak_flops=2e12, tile_tokens=8)
E, R = 6, 2
ROWS = {1: torch.tensor([0, 1, 2, 0, 3, 4, 5, 1]), 2: torch.tensor([0, 1, 2, 3, 4, 5, 0, 2])}
LEVELS = (1, 16)
W = 8


class StubRuntime:
    """What the cycle reads and calls on a runtime (no SGLang)."""

    def __init__(self, rank_invariant: bool):
        self.rank_invariant = rank_invariant
        self.num_ranks, self.num_logical, self.cost, self.topk = R, E, CM, 2
        self.levels, self.hash_slots = LEVELS, W
        self.moe_layers = set(ROWS)
        self.layers = {}
        for layer, row in ROWS.items():
            pl = Placement(row, R, E)
            maps = plan_maps(pl, static_like_weights(pl, LEVELS, W), W)[:, 0].to(torch.int32)
            self.layers[layer] = SimpleNamespace(row=row, maps=maps, source="even")
        self.last_report = None
        self.installs: list[tuple[int, str]] = []

    def install_plan(self, layer, row, maps, source):
        st = self.layers[layer]
        if not torch.equal(st.row, row):
            return False
        st.maps.copy_(maps)
        st.source = source
        self.installs.append((layer, source))
        return True

    def counters(self):
        return {}

    def is_log_rank(self):
        return True


def _window():
    return torch.tensor([[[50, 5, 5, 5, 5, 30]] * 3])  # [1 step, 3 layers, E]


def _metadata():
    rows = torch.stack([ROWS[1], ROWS[1], ROWS[2]])
    return SimpleNamespace(physical_to_logical_map_cpu=rows)


def _cycle(rank_invariant=False, counts=None, refresh=0, timeout=60.0, solver="thread"):
    rt = StubRuntime(rank_invariant)
    reb = rebalance.Rebalancer(rt, counts_source=counts)
    reb.configure(refresh_passes=refresh, window_passes=4, timeout_s=timeout, solver=solver)
    return rt, reb


def _rebalance(reb):
    reb.begin()
    reb.on_new_placement(_metadata(), _window())
    reb.end()


def _slow_solve(gate: threading.Event, monkeypatch):
    real = plan_mod.solve_layer_plan

    def slow(*a, **k):
        gate.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(plan_mod, "solve_layer_plan", slow)


def test_with_an_a2a_backend_no_pass_waits_for_the_solve(monkeypatch):
    gate = threading.Event()
    _slow_solve(gate, monkeypatch)
    rt, reb = _cycle(rank_invariant=False)
    _rebalance(reb)
    for _ in range(5):
        t0 = time.perf_counter()
        reb.on_forward_pass_end()
        assert time.perf_counter() - t0 < 0.5  # the solve is stuck: passes go on
    assert rt.installs == []
    gate.set()
    reb._job.done.wait(10)
    reb.on_forward_pass_end()  # the first pass end after the solve finished installs it
    assert sorted(rt.installs) == [(1, "rebalance #1"), (2, "rebalance #1")]
    assert reb.stall_s < 0.5 and rt.last_report["waited_seconds"] == 0.0


def test_without_an_a2a_backend_every_rank_installs_at_the_next_pass(monkeypatch):
    gate = threading.Event()
    _slow_solve(gate, monkeypatch)
    rt, reb = _cycle(rank_invariant=True)
    _rebalance(reb)
    threading.Timer(0.3, gate.set).start()
    reb.on_forward_pass_end()  # waits for the solve: ranks must agree on every token's copy
    assert sorted(rt.installs) == [(1, "rebalance #1"), (2, "rebalance #1")]
    assert rt.last_report["waited_seconds"] > 0.2 and reb.stall_s >= rt.last_report["waited_seconds"]


def test_a_late_solve_is_dropped_and_every_layer_keeps_its_plan(monkeypatch, caplog):
    gate = threading.Event()
    _slow_solve(gate, monkeypatch)
    rt, reb = _cycle(timeout=0.05)
    before = {layer: st.maps.clone() for layer, st in rt.layers.items()}
    _rebalance(reb)
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING, logger="sglang_moe_lb.plugin"):
        reb.on_forward_pass_end()
    assert "rebalance #1: plan solve dropped after" in caplog.text and "--moe-lb-plan-timeout 0.05s" in caplog.text
    gate.set()
    for _ in range(3):
        reb.on_forward_pass_end()
    assert rt.installs == []
    assert all(torch.equal(st.maps, before[layer]) for layer, st in rt.layers.items())


def test_a_failing_layer_keeps_its_plan_the_others_install(monkeypatch, caplog):
    real = plan_mod.solve_layer_plan
    calls = []

    def flaky(pl, shares, *a, **k):
        calls.append(pl)
        if len(calls) == 1:
            raise RuntimeError("HiGHS exploded")
        return real(pl, shares, *a, **k)

    monkeypatch.setattr(plan_mod, "solve_layer_plan", flaky)
    rt, reb = _cycle()
    before = rt.layers[1].maps.clone()
    _rebalance(reb)
    reb._job.done.wait(10)
    with caplog.at_level(logging.INFO, logger="sglang_moe_lb.plugin"):
        reb.on_forward_pass_end()
    assert rt.installs == [(2, "rebalance #1")] and torch.equal(rt.layers[1].maps, before)
    assert rt.last_report["failed"] == [1]
    assert "plan solve failed on layers [1] (first: layer 1, RuntimeError: HiGHS exploded); they keep their plans" \
        in caplog.text


def test_the_process_solver_gives_the_threads_plans_and_survives_a_stop():
    """Solves in the helper process equal in-process ones; a stopped worker (a time-out) is
    replaced on the next solve."""
    rt_p, reb_p = _cycle(solver="process")
    rt_t, reb_t = _cycle(solver="thread")
    try:
        for rt, reb in ((rt_p, reb_p), (rt_t, reb_t)):
            _rebalance(reb)
            assert reb._job.done.wait(120)
            reb.on_forward_pass_end()
        for layer in ROWS:
            assert torch.equal(rt_p.layers[layer].maps, rt_t.layers[layer].maps)
            assert rt_p.layers[layer].source == "rebalance #1"
        reb_p.worker.stop()
        _rebalance(reb_p)
        assert reb_p._job.done.wait(120)
        reb_p.on_forward_pass_end()
        assert rt_p.last_report["label"] == "rebalance #2" and not rt_p.last_report["failed"]
    finally:
        reb_p.shutdown()


def test_a_rebalance_that_supersedes_a_refresh_keeps_the_worker_process():
    """Without an a2a backend a refresh started at one pass is due at the next, where SGLang's
    rebalance (its hook runs first) supersedes it. That is no time-out: the worker process must
    survive it (on the CPU demo server a new one took 8-12 s to start, and every rank waited for
    it at that pass), and the rebalance's request goes after the refresh's reply on the same
    pipe, so each job gets its own plans."""
    refresh_window = torch.tensor([[5, 50, 5, 30, 5, 5]] * 3, dtype=torch.float64)  # plans unlike _window()'s
    rt, reb = _cycle(rank_invariant=True, counts=lambda passes: refresh_window, refresh=1, solver="process")
    stops = []
    real_stop = reb.worker.stop
    reb.worker.stop = lambda: (stops.append(1), real_stop())
    try:
        reb.on_forward_pass_end()  # pass 1: a refresh starts (the worker process is still starting)
        assert reb._job is not None and reb._job.label == "refresh #1"
        _rebalance(reb)  # pass 2's end: EPLB's rebalance supersedes the refresh...
        assert reb._job.label == "rebalance #1"
        reb.on_forward_pass_end()  # ...then every rank installs the rebalance's plans at that pass
        assert stops == [], "superseding a solve stopped the worker process"
        assert rt.last_report["label"] == "rebalance #1" and not rt.last_report["failed"], rt.last_report
        _, ref = _cycle(solver="thread")
        _rebalance(ref)
        assert ref._job.done.wait(60)
        for layer in ROWS:
            assert torch.equal(rt.layers[layer].maps, ref._job.results[layer][1]), f"layer {layer}: not the rebalance's plan"
    finally:
        reb.worker.stop = real_stop
        reb.shutdown()


def test_refresh_reads_recent_counts_every_n_passes():
    seen = []

    def counts(passes):
        seen.append(passes)
        return _window()[0].double()

    rt, reb = _cycle(counts=counts, refresh=3)
    for _ in range(2):
        reb.on_forward_pass_end()
    assert seen == []
    reb.on_forward_pass_end()  # pass 3: a refresh starts (window 4 passes)
    assert seen == [4] and reb._job is not None
    reb._job.done.wait(10)
    reb.on_forward_pass_end()
    assert sorted(rt.installs) == [(1, "refresh #1"), (2, "refresh #1")]
    for _ in range(3):
        reb.on_forward_pass_end()
    assert len(seen) == 2  # three passes after the last solve started


def test_no_refresh_without_counts():
    rt, reb = _cycle(counts=lambda passes: None, refresh=1)
    for _ in range(4):
        reb.on_forward_pass_end()
    assert rt.installs == [] and reb.refreshes == 0


# ---------------------------------------------------------------------------------------------
# The recorder ring reader (forward_hooks.recent_logical_counts) on a stand-in of SGLang's classes
# ---------------------------------------------------------------------------------------------
def test_recent_counts_read_the_ring_newest_first_and_map_slots_to_experts(monkeypatch):
    pytest.importorskip("sglang")
    from sglang.srt.eplb import expert_distribution

    from sglang_moe_lb.plugin import forward_hooks

    L, P = 2, 4
    ring = torch.zeros(5, L, P, dtype=torch.int32)
    for i in range(5):
        ring[i] = i + 1  # pass i wrote i + 1 to every slot
    buf = SimpleNamespace(_buffer=ring, _curr_index=2)  # newest pass is index 1, then 0, 4, ...
    rec = SimpleNamespace(_accumulator=SimpleNamespace(_global_physical_count_of_buffered_step=buf), recording=True)
    monkeypatch.setattr(expert_distribution, "get_global_expert_distribution_recorder", lambda: rec)
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2)
    rt = SimpleNamespace(num_logical=3, rank_invariant=True, warn_once=lambda *a: None,
                         layers={0: SimpleNamespace(placement=pl), 1: SimpleNamespace(placement=pl)})
    got = forward_hooks.recent_logical_counts(rt, 3)  # passes at indices 4, 0, 1: values 5 + 1 + 2 = 8 per slot
    assert got.tolist() == [[16.0, 8.0, 8.0], [16.0, 8.0, 8.0]]
    rec.recording = False
    assert forward_hooks.recent_logical_counts(rt, 3) is None
