"""The simulation: a hand-computed case, an independent HiGHS bound, and per-batch guarantees."""

import highspy
import numpy as np
import pytest
import torch

from sglang_moe_lb import Placement, balance_layer, local_stats
from sglang_moe_lb.replay.simulate import MODES, ReplayConfig, _shared_solves, run_replay
from sglang_moe_lb.replay.sources import Batch, Trace, bundled_trace, synthetic_trace

ALL_MODES = tuple(MODES)


def _hand_trace() -> Trace:
    """3 experts on 2 ranks, slots [0, 1 | 0, 2] (expert 0 replicated), top-1.

    Rank 0 serves tokens routed to experts 0,1,1,1,1,1; rank 1 serves 0,2.
    """
    ids = torch.tensor([0, 1, 1, 1, 1, 1, 0, 2]).reshape(1, 8, 1)
    return Trace(3, 1, 1, 1, lambda s: Batch(ids, [6, 2], "hand"), recorded_placement=torch.tensor([[0, 1, 0, 2]]))


def test_hand_computed_case():
    cfg = ReplayConfig(ep_size=2, redundant_experts=1, rebalance_every=0, init_placement="recorded",
                       modes=ALL_MODES, upstream_waterfill_steps=-1, workers=1, progress=False)
    res = run_replay(_hand_trace(), cfg)
    loads = {m: res.arrays["total"][m][0, 0].tolist() for m in res.modes}
    # Work: 8 routed + 8 shared = 16 token-slots, mean 8 per rank.
    # static: each rank uses its own copy of expert 0 -> routed [1+5, 1+1]; shared stays local [6, 2].
    assert loads["static"] == [12, 4]
    # dynamic: a map given as a mapping (not an EPLB result) collapses to the local copy under DeepEP.
    assert loads["dynamic"] == [12, 4]
    # SGLang's Waterfill skips batches under 64 tokens per rank: shared expert stays local.
    assert loads["upstream-waterfill"] == [12, 4] and loads["upstream-waterfill-dyn"] == [12, 4]
    # LPLB: both expert-0 tokens to rank 1 -> routed [5, 3], shared local -> [11, 5].
    assert loads["lplb"] == [11, 5]
    # Waterfill, any rank, dynamic: quotas fill both ranks to 8.
    assert loads["waterfill-all"] == [8, 8] and loads["waterfill+lplb-all"] == [8, 8]
    # Conservative: rank 0's tokens only visit rank 0, nothing can move.
    assert loads["waterfill-cons"] == [12, 4]
    # After LPLB, rank 0 keeps its first 3 tokens (quota 3); the movable one is among them -> stays [11, 5].
    assert loads["waterfill+lplb-cons"] == [11, 5]
    # Bounds: joint LP = 8 (perfect); shared pinned to the source rank: 11; routed only: 5.
    assert res.arrays["bound_joint"][0, 0] == pytest.approx(8)
    assert res.arrays["bound_local"][0, 0] == pytest.approx(11)
    assert res.arrays["bound_routed"][0, 0] == pytest.approx(5)
    m = res.modes
    assert m["static"]["balancedness_mean"] == pytest.approx(8 / 12)
    assert m["lplb"]["balancedness_mean"] == pytest.approx(8 / 11)
    assert m["lplb"]["moe_time_ratio_vs_static"] == pytest.approx(11 / 12)
    assert m["lplb"]["gap_to_bound_mean"] == pytest.approx(1 - 8 / 11)
    assert m["lplb"]["gap_to_class_bound_mean"] == pytest.approx(0)
    assert m["waterfill-all"]["gap_to_bound_mean"] == pytest.approx(0)
    assert res.bound["balancedness_mean"] == pytest.approx(1.0)
    assert res.bound_local_shared["balancedness_mean"] == pytest.approx(8 / 11)
    assert res.bound_routed["routed_balancedness_mean"] == pytest.approx(4 / 5)


def _lp_min_max(p2l: list[int], R: int, counts: list[int], shared: list[int] | int) -> float:
    """Min over fractional dispatches of the max rank load, written from scratch for HiGHS.

    Columns: x_p per slot, y_r shared tokens per rank, M. ``shared`` int: total shared tokens,
    free to go anywhere; list: y_r fixed per rank.
    """
    P = len(p2l)
    S = P // R
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    inf = highspy.kHighsInf
    n = P + R + 1
    lo = [0.0] * n
    hi = [inf] * n
    if isinstance(shared, list):
        for r in range(R):
            lo[P + r] = hi[P + r] = float(shared[r])
    h.addVars(n, np.array(lo), np.array(hi))
    h.changeColCost(n - 1, 1.0)
    for e, c in enumerate(counts):
        cols = [p for p in range(P) if p2l[p] == e]
        h.addRow(float(c), float(c), len(cols), np.array(cols, dtype=np.int32), np.ones(len(cols)))
    if not isinstance(shared, list):
        h.addRow(float(shared), float(shared), R, np.arange(P, P + R, dtype=np.int32), np.ones(R))
    for r in range(R):
        cols = list(range(r * S, (r + 1) * S)) + [P + r, n - 1]
        h.addRow(-inf, 0.0, len(cols), np.array(cols, dtype=np.int32), np.array([1.0] * (S + 1) + [-1.0]))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return h.getInfo().objective_function_value


@pytest.fixture(scope="module")
def synthetic_run():
    tr = synthetic_trace(steps=8, tokens=(128, 1024), num_ranks=4, experts=16, top_k=3, layers=2, skew=1.2,
                         drift=0.3, shift_at=4, seed=11)
    cfg = ReplayConfig(ep_size=4, redundant_experts=4, rebalance_every=3, modes=ALL_MODES,
                       upstream_waterfill_steps=2, workers=1, progress=False, seed=5)
    return tr, run_replay(tr, cfg)


@pytest.fixture(scope="module")
def bundled_run():
    tr = bundled_trace(steps=8, tokens=(512, 2048), num_ranks=8, seed=2)
    cfg = ReplayConfig(ep_size=8, redundant_experts=16, rebalance_every=3, modes=ALL_MODES,
                       upstream_waterfill_steps=1, workers=2, progress=False)
    return tr, run_replay(tr, cfg)


def test_bounds_match_an_independent_highs_lp(synthetic_run):
    tr, res = synthetic_run
    a = res.arrays
    R = res.config["ep_size"]
    for t in range(tr.num_steps):
        b = tr.batch(t)
        p2l = a["placements"][a["state_of_step"][t]]
        sizes = b.rank_sizes
        for layer in range(tr.num_layers):
            ids = b.topk[layer]
            counts = torch.bincount(ids[ids >= 0], minlength=tr.num_logical).tolist()
            n_src = [int((part >= 0).any(1).sum()) for part in torch.split(ids, sizes)]
            pl = p2l[layer].tolist()
            assert a["bound_joint"][t, layer] == pytest.approx(_lp_min_max(pl, R, counts, sum(n_src)), rel=1e-7)
            assert a["bound_local"][t, layer] == pytest.approx(_lp_min_max(pl, R, counts, n_src), rel=1e-7)
            assert a["bound_routed"][t, layer] == pytest.approx(_lp_min_max(pl, R, counts, [0] * R), rel=1e-7)


@pytest.mark.parametrize("run", ["synthetic_run", "bundled_run"])
def test_per_batch_guarantees(run, request):
    """On every (step, layer): work is conserved, no mode beats the LP bound, our LPLB is never
    worse than SGLang's static or dynamic dispatch, and Waterfill never worse than always-local."""
    tr, res = request.getfixturevalue(run)
    tot, rout = res.arrays["total"], res.arrays["routed"]
    mx = {m: tot[m].max(2) for m in tot}
    rmx = {m: rout[m].max(2) for m in rout}
    work = tot["static"].sum(2)
    for m in tot:
        scored = ~np.isnan(mx[m])
        assert scored.any()
        assert np.allclose(tot[m].sum(2)[scored], work[scored]), m  # same total work in every mode
        assert (mx[m][scored] >= res.arrays["bound_joint"][scored] - 1e-6).all(), m
    for ref in ("static", "dynamic"):
        assert (rmx["lplb"] <= rmx[ref]).all(), f"lplb routed max above {ref}"
        # Equal tokens per source rank in these traces: the shared expert adds the same load everywhere.
        assert (mx["lplb"] <= mx[ref]).all(), f"lplb above {ref}"
    assert (mx["lplb"] <= res.arrays["bound_local"] + 1 + 1e-6).all()  # integral within one token of the LP
    for m in ("waterfill-cons", "waterfill-all"):
        assert (mx[m] <= mx["static"]).all(), m  # same routed mapping, shared expert always local
    for m in ("waterfill+lplb-cons", "waterfill+lplb-all"):
        assert (mx[m] <= mx["lplb"]).all(), m
    # The routed part of a Waterfill mode is the mapping it runs on.
    assert np.array_equal(rout["waterfill-cons"], rout["static"])
    assert np.array_equal(rout["waterfill+lplb-cons"], rout["lplb"])


def test_summary_fields_and_sampling(bundled_run):
    tr, res = bundled_run
    assert res.sampled_steps == [0]
    up = res.modes["upstream-waterfill"]
    assert up["steps_scored"] == 1 and "on_sampled_steps" in up
    for name, m in res.modes.items():
        for key in ("balancedness_mean", "balancedness_p5", "gap_to_bound_mean", "moe_time_ratio_vs_static"):
            assert np.isfinite(m[key]), (name, key)
        assert 0 < m["balancedness_p5"] <= m["balancedness_mean"] <= res.bound["balancedness_mean"] + 1e-9
    assert res.modes["static"]["moe_time_ratio_vs_static"] == pytest.approx(1.0)
    assert res.rebalance_steps == [3, 6]
    js = res.to_json()
    assert set(js["modes"]) == set(res.modes) and "balancedness_mean" in js["bound"]
    assert len(js["per_step"]["balancedness"]["static"]) == tr.num_steps


def test_workers_do_not_change_the_numbers(bundled_run):
    tr, res2 = bundled_run
    cfg = ReplayConfig(ep_size=8, redundant_experts=16, rebalance_every=3, modes=ALL_MODES,
                       upstream_waterfill_steps=1, workers=1, progress=False)
    res1 = run_replay(tr, cfg)
    for m in res1.modes:
        assert np.array_equal(res1.arrays["total"][m], res2.arrays["total"][m], equal_nan=True), m
    assert np.array_equal(res1.arrays["bound_joint"], res2.arrays["bound_joint"])


def test_shared_solves_give_the_unshared_answer():
    """Ranks reuse rank 0's solve in the simulator; calling without the cache gives the same dispatch."""
    tr = bundled_trace(steps=1, tokens=(1024, 1024), num_ranks=8, seed=9)
    ids = tr.batch(0).topk[1]
    E, R = 64, 8
    torch.manual_seed(0)
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (16,))])[torch.randperm(E + 16)]
    pl = Placement(p2l, R, E)
    parts = list(torch.split(ids, [128] * 8))
    g = torch.stack([local_stats(p, E, R, pl.slots_per_rank) for p in parts])
    for wf in (None, "conservative", "all_rank"):
        plain = [balance_layer(pl, p, source_rank=r, gathered=g, waterfill=wf, method="highs") for r, p in enumerate(parts)]
        with _shared_solves() as cache:
            cached = [balance_layer(pl, p, source_rank=r, gathered=g, waterfill=wf, method="highs") for r, p in enumerate(parts)]
            assert cache  # the solves went through the cache
        for a, b in zip(plain, cached):
            assert torch.equal(a.phys_ids, b.phys_ids) and torch.equal(a.quotas, b.quotas)
            assert (a.shared_rank is None and b.shared_rank is None) or torch.equal(a.shared_rank, b.shared_rank)


def test_config_errors_are_clear():
    tr = _hand_trace()
    with pytest.raises(ValueError, match="not divisible by --ep-size 3"):
        run_replay(tr, ReplayConfig(ep_size=3, redundant_experts=1, progress=False))
    with pytest.raises(ValueError, match="unknown mode"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=1, modes=("static", "bogus"), progress=False))
    with pytest.raises(ValueError, match="must include 'static'"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=1, modes=("lplb",), progress=False))
    with pytest.raises(ValueError, match="--init-placement recorded"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=3, init_placement="recorded", progress=False))


def test_upstream_waterfill_is_skipped_with_a_reason_for_odd_ep():
    tr = synthetic_trace(steps=2, tokens=(96, 96), num_ranks=3, experts=6, top_k=2, layers=1)
    res = run_replay(tr, ReplayConfig(ep_size=3, redundant_experts=3, rebalance_every=0, workers=1, progress=False))
    assert "power-of-two" in res.skipped["upstream-waterfill"]
    assert "upstream-waterfill" not in res.modes


@pytest.mark.parametrize("init, expect", [
    ("trivial", "trivial"), ("first-window", "first 2 steps"), ("calibration", "calibration counts"),
])
def test_initial_placements(init, expect):
    tr = synthetic_trace(steps=3, tokens=(256, 256), num_ranks=4, experts=12, top_k=2, layers=1, seed=4)
    res = run_replay(tr, ReplayConfig(ep_size=4, redundant_experts=4, rebalance_every=2, init_placement=init,
                                      modes=("static", "lplb-rebalance", "lplb"), workers=1, progress=False))
    assert any(expect in n for n in res.notes), res.notes
    p0 = res.arrays["placements"][0]
    if init == "trivial":
        assert p0.tolist() == [[p % 12 for p in range(16)]]
    assert res.rebalance_steps == [2] and res.arrays["state_of_step"] == [0, 0, 1]


def test_upstream_waterfill_is_skipped_by_default_above_ep16():
    tr = synthetic_trace(steps=1, tokens=(2048, 2048), num_ranks=32, experts=32, top_k=2, layers=1)
    cfg = ReplayConfig(ep_size=32, redundant_experts=32, rebalance_every=0, modes=("static", "upstream-waterfill", "lplb"),
                       workers=1, progress=False)
    res = run_replay(tr, cfg)
    assert "too slow at EP 32" in res.skipped["upstream-waterfill"] and "--upstream-waterfill-steps" in res.skipped["upstream-waterfill"]
    assert set(res.modes) == {"static", "lplb"}
