"""The simulation: a hand-computed case, an independent HiGHS bound, and per-batch guarantees."""

import json

import highspy
import numpy as np
import pytest
import torch

from sglang_moe_lb.replay.cost_setup import CostOptions
from sglang_moe_lb.replay.simulate import ReplayConfig, run_replay
from sglang_moe_lb.replay.sources import Batch, Trace, bundled_trace, synthetic_trace

GLOBAL = "lplb/per-batch/global/tokens"
LOCAL = "lplb/per-batch/local/tokens"
WF_ALL, WF_CONS = "waterfill/all_rank/global", "waterfill/conservative/global"
JOINT_ALL = "waterfill+lplb/per-batch/global/tokens/all_rank"
JOINT_CONS = "waterfill+lplb/per-batch/global/tokens/conservative"
HAND_MODES = ("static", "dynamic", "upstream-waterfill", "upstream-waterfill-dyn", GLOBAL, LOCAL, WF_ALL, WF_CONS,
              JOINT_ALL, JOINT_CONS, f"{GLOBAL}/gate")
MANY = ("static", "dynamic", "upstream-waterfill", "upstream-waterfill-dyn", "lplb/plan", GLOBAL, LOCAL,
        "lplb/per-batch/global/tiles", WF_ALL, WF_CONS, "waterfill/conservative/local", "waterfill/all_rank/local",
        JOINT_ALL, JOINT_CONS, "waterfill+lplb/per-batch/local/tokens/all_rank")


def _hand_trace() -> Trace:
    """3 experts on 2 ranks, slots [0, 1 | 0, 2] (expert 0 replicated), top-1.

    Rank 0 serves tokens routed to experts 0,1,1,1,1,1; rank 1 serves 0,2.
    """
    ids = torch.tensor([0, 1, 1, 1, 1, 1, 0, 2]).reshape(1, 8, 1)
    return Trace(3, 1, 1, 1, lambda s: Batch(ids, [6, 2], "hand"), recorded_placement=torch.tensor([[0, 1, 0, 2]]))


@pytest.fixture
def unit_cost(tmp_path):
    """A cost model where a rank's µs = max(active copies, tokens) and overheads are round numbers.

    Expert 1x1 in bf16: W = 3 * 2 = 6 bytes, F = 6 FLOP/token; bandwidth 6e6 B/s and 6e6 FLOP/s
    give 1 µs per active copy and 1 µs per token (tile 1). lplb/per-batch costs 2 µs, the
    all-gather 1 µs (2 ranks: intra-node), Waterfill 5 µs, SGLang's Waterfill 7 µs."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 1, "intermediate_size": 1}))
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": "sglang-moe-lb-calibration/1", "bandwidth": 6e6, "peak_flops": 6e6}))
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({
        "format": "sglang-moe-lb-overheads/1", "gpu": "test", "kernels_version": "t", "date": "-",
        "hot_path_us": {"lplb/per-batch": {"1": 2.0, "1000": 2.0}, "waterfill/all_rank": {"1": 5.0},
                        "waterfill/conservative": {"1": 5.0}, "waterfill+lplb/per-batch/all_rank": {"1": 5.0},
                        "waterfill+lplb/per-batch/conservative": {"1": 5.0}, "upstream-waterfill": {"1": 7.0}},
        "collective_us": {"intra_node": 1.0, "inter_node": 9.0, "ranks_per_node": 8},
    }))
    return CostOptions(config=str(cfg), calibration=str(cal), tile_tokens=1, overheads=str(ov), dtype="bf16")


def test_hand_computed_case(unit_cost):
    cfg = ReplayConfig(ep_size=2, redundant_experts=1, rebalance_every=0, init_placement="recorded",
                       modes=HAND_MODES, upstream_waterfill_steps=-1, workers=1, progress=False, cost=unit_cost)
    res = run_replay(_hand_trace(), cfg)
    loads = {m: res.arrays["total"][m][0, 0].tolist() for m in res.modes}
    # Work: 8 routed + 8 shared = 16 token-slots, mean 8 per rank.
    # static: each rank uses its own copy of expert 0 -> routed [1+5, 1+1]; shared stays local [6, 2].
    assert loads["static"] == [12, 4]
    # dynamic: a map given as a mapping (not an EPLB result) collapses to the local copy under DeepEP.
    assert loads["dynamic"] == [12, 4]
    # SGLang's Waterfill skips batches under 64 tokens per rank: shared expert stays local.
    assert loads["upstream-waterfill"] == [12, 4] and loads["upstream-waterfill-dyn"] == [12, 4]
    # Global LPLB: both expert-0 tokens to rank 1 -> routed [5, 3], shared local -> [11, 5].
    assert loads[GLOBAL] == [11, 5]
    # Local LPLB: rank 0 alone sends its expert-0 token to rank 1 ([5, 1] is its best), rank 1 alone
    # sends its expert-0 token to rank 0 ([1, 1]): routed [5 + 1, 1 + 1], worse than global.
    assert loads[LOCAL] == [12, 4]
    # Waterfill, any rank, global: quotas fill both ranks to 8.
    assert loads[WF_ALL] == [8, 8] and loads[JOINT_ALL] == [8, 8]
    # Conservative: rank 0's tokens only visit rank 0, nothing can move.
    assert loads[WF_CONS] == [12, 4]
    # After LPLB, rank 0 keeps its first 3 tokens (quota 3); the movable one is among them -> stays [11, 5].
    assert loads[JOINT_CONS] == [11, 5]
    # Bounds: joint LP = 8 (perfect); shared pinned to the source rank: 11; routed only: 5.
    assert res.arrays["bound_joint"][0, 0] == pytest.approx(8)
    assert res.arrays["bound_local"][0, 0] == pytest.approx(11)
    assert res.arrays["bound_routed"][0, 0] == pytest.approx(5)
    m = res.modes
    assert m["static"]["balancedness_mean"] == pytest.approx(8 / 12)
    assert m[GLOBAL]["balancedness_mean"] == pytest.approx(8 / 11)
    assert m[GLOBAL]["moe_time_ratio_vs_static"] == pytest.approx(11 / 12)
    assert m[GLOBAL]["gap_to_bound_mean"] == pytest.approx(1 - 8 / 11)
    assert m[GLOBAL]["gap_to_class_bound_mean"] == pytest.approx(0)
    assert m[WF_ALL]["gap_to_bound_mean"] == pytest.approx(0)
    assert res.bound["balancedness_mean"] == pytest.approx(1.0)
    assert res.bound_local_shared["balancedness_mean"] == pytest.approx(8 / 11)
    assert res.bound_routed["routed_balancedness_mean"] == pytest.approx(4 / 5)
    # Modelled time (unit_cost: a rank's µs = its tokens here, tokens >= active copies):
    # static's busiest rank 12 µs; global LPLB 11 µs + 2 (kernels) + 1 (all-gather); local 12 + 2.
    assert m["static"]["time_vs_static"] == 1.0 and m["static"]["overhead_us_per_layer"] == 0.0
    assert m[GLOBAL]["time_vs_static"] == pytest.approx(14 / 12)
    assert m[GLOBAL]["time_vs_static_no_overhead"] == pytest.approx(11 / 12)
    assert m[GLOBAL]["overhead_us_per_layer"] == pytest.approx(3.0)
    assert m[GLOBAL]["break_even_overhead_us"] == pytest.approx(1.0)
    assert m[LOCAL]["time_vs_static"] == pytest.approx(14 / 12) and m[LOCAL]["overhead_us_per_layer"] == pytest.approx(2)
    assert m[WF_ALL]["time_vs_static"] == pytest.approx((8 + 5 + 1) / 12)
    assert m["upstream-waterfill"]["time_vs_static"] == pytest.approx((12 + 7) / 12)
    assert m["upstream-waterfill-dyn"]["time_vs_static"] == pytest.approx((12 + 7 + 1) / 12)
    # Tiles = tokens here: static's tile loads [12, 4] -> balancedness 8/12.
    assert m["static"]["tile_balancedness"] == pytest.approx(8 / 12)
    # The gate (expected gain 5% of the uniform 12 µs < 3 µs overhead) stays closed: exactly static, no overhead.
    gated = m[f"{GLOBAL}/gate"]
    assert gated["time_vs_static"] == 1.0 and gated["overhead_us_per_layer"] == 0.0 and gated["gate_open_share"] == 0.0
    assert loads[f"{GLOBAL}/gate"] == loads["static"]


def test_open_gate_runs_the_ungated_mode(unit_cost):
    from dataclasses import replace

    cfg = ReplayConfig(ep_size=2, redundant_experts=1, rebalance_every=0, init_placement="recorded",
                       modes=("static", GLOBAL, f"{GLOBAL}/gate"), workers=1, progress=False,
                       cost=replace(unit_cost, expected_gain=1.0))  # 1.0 x 12 µs > 3 µs: open
    res = run_replay(_hand_trace(), cfg)
    g, u = res.modes[f"{GLOBAL}/gate"], res.modes[GLOBAL]
    assert g["gate_open_share"] == 1.0 and g["time_vs_static"] == u["time_vs_static"]
    assert np.array_equal(res.arrays["slots"][f"{GLOBAL}/gate"], res.arrays["slots"][GLOBAL])


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
    tr = synthetic_trace(steps=6, tokens=(128, 1024), num_ranks=4, experts=16, top_k=3, layers=2, skew=1.2,
                         drift=0.3, shift_at=3, seed=11)
    cfg = ReplayConfig(ep_size=4, redundant_experts=4, rebalance_every=3, modes=MANY,
                       upstream_waterfill_steps=1, workers=1, progress=False, seed=5)
    return tr, run_replay(tr, cfg)


@pytest.fixture(scope="module")
def bundled_run():
    tr = bundled_trace(steps=6, tokens=(512, 2048), num_ranks=8, seed=2)
    cfg = ReplayConfig(ep_size=8, redundant_experts=16, rebalance_every=3, modes=MANY,
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
    """On every (step, layer): work is conserved, no mode beats the LP bound, global LPLB is never
    worse than SGLang's static or dynamic dispatch and reaches the integral optimum, and global
    Waterfill is never worse than always-local."""
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
        assert (rmx[GLOBAL] <= rmx[ref]).all(), f"global LPLB routed max above {ref}"
        assert (mx[GLOBAL] <= mx[ref]).all(), f"global LPLB above {ref}"
    # Integral optimum of a transportation problem: ceil of the LP value.
    assert np.array_equal(mx[GLOBAL], np.ceil(res.arrays["bound_local"] - 1e-9))
    assert np.array_equal(mx[JOINT_ALL], np.ceil(res.arrays["bound_joint"] - 1e-9))
    for m in (WF_CONS, WF_ALL):
        assert (mx[m] <= mx["static"]).all(), m  # same routed mapping, shared expert always local
    assert (mx[JOINT_CONS] <= mx[GLOBAL]).all()
    # The routed part of a Waterfill mode is the mapping it runs on.
    assert np.array_equal(rout[WF_CONS], rout["static"])
    assert np.array_equal(rout[JOINT_CONS], rout[GLOBAL])


def test_summary_fields_and_sampling(bundled_run):
    tr, res = bundled_run
    assert res.sampled_steps == [0]
    up = res.modes["upstream-waterfill"]
    assert up["steps_scored"] == 1 and "on_sampled_steps" in up
    for name, m in res.modes.items():
        for key in ("balancedness_mean", "balancedness_p5", "gap_to_bound_mean", "moe_time_ratio_vs_static",
                    "time_vs_static", "tile_balancedness", "overhead_us_per_layer"):
            assert np.isfinite(m[key]), (name, key)
        assert 0 < m["balancedness_p5"] <= m["balancedness_mean"] <= res.bound["balancedness_mean"] + 1e-9
    assert res.modes["static"]["moe_time_ratio_vs_static"] == 1.0 and res.modes["static"]["time_vs_static"] == 1.0
    assert res.rebalance_steps == [3]
    js = res.to_json()
    json.dumps(js, allow_nan=False)
    assert set(js["modes"]) == set(res.modes) and "balancedness_mean" in js["bound"]
    assert len(js["per_step"]["balancedness"]["static"]) == tr.num_steps


def test_workers_do_not_change_the_numbers(bundled_run):
    tr, res2 = bundled_run
    cfg = ReplayConfig(ep_size=8, redundant_experts=16, rebalance_every=3, modes=MANY,
                       upstream_waterfill_steps=1, workers=1, progress=False)
    res1 = run_replay(tr, cfg)
    for m in res1.modes:
        assert np.array_equal(res1.arrays["slots"][m], res2.arrays["slots"][m], equal_nan=True), m
    assert np.array_equal(res1.arrays["bound_joint"], res2.arrays["bound_joint"])


def test_config_errors_are_clear():
    tr = _hand_trace()
    with pytest.raises(ValueError, match="not divisible by --ep-size 3"):
        run_replay(tr, ReplayConfig(ep_size=3, redundant_experts=1, progress=False))
    with pytest.raises(ValueError, match="--modes: .*first part"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=1, modes=("static", "bogus"), progress=False))
    with pytest.raises(ValueError, match="must include 'static'"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=1, modes=(GLOBAL,), progress=False))
    with pytest.raises(ValueError, match="--init-placement recorded"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=3, init_placement="recorded", progress=False))
    with pytest.raises(ValueError, match="--num-groups 2 must divide the 3 experts"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=1, num_groups=2, progress=False))
    with pytest.raises(ValueError, match="--eplb-algorithm must be one of SGLang's"):
        run_replay(tr, ReplayConfig(ep_size=2, redundant_experts=1, eplb_algorithm="best", progress=False))


def test_upstream_waterfill_is_skipped_with_a_reason_for_odd_ep():
    tr = synthetic_trace(steps=2, tokens=(96, 96), num_ranks=3, experts=6, top_k=2, layers=1)
    res = run_replay(tr, ReplayConfig(ep_size=3, redundant_experts=3, rebalance_every=0, workers=1, progress=False,
                                      modes=("static", "upstream-waterfill")))
    assert "power-of-two" in res.skipped["upstream-waterfill"]
    assert "upstream-waterfill" not in res.modes


@pytest.mark.parametrize("init, expect", [
    ("trivial", "trivial"), ("first-window", "first 2 steps"), ("calibration", "calibration counts"),
])
def test_initial_placements(init, expect):
    tr = synthetic_trace(steps=3, tokens=(256, 256), num_ranks=4, experts=12, top_k=2, layers=1, seed=4)
    res = run_replay(tr, ReplayConfig(ep_size=4, redundant_experts=4, rebalance_every=2, init_placement=init,
                                      modes=("static", "lplb/plan", GLOBAL), workers=1, progress=False))
    assert any(expect in n for n in res.notes), res.notes
    p0 = res.arrays["placements"][0]
    if init == "trivial":
        assert p0.tolist() == [[p % 12 for p in range(16)]]
    assert res.rebalance_steps == [2] and res.arrays["state_of_step"] == [0, 0, 1]


def test_upstream_waterfill_is_skipped_by_default_above_ep16():
    tr = synthetic_trace(steps=1, tokens=(2048, 2048), num_ranks=32, experts=32, top_k=2, layers=1)
    cfg = ReplayConfig(ep_size=32, redundant_experts=32, rebalance_every=0, modes=("static", "upstream-waterfill", GLOBAL),
                       workers=1, progress=False)
    res = run_replay(tr, cfg)
    assert "too slow at EP 32" in res.skipped["upstream-waterfill"] and "--upstream-waterfill-steps" in res.skipped["upstream-waterfill"]
    assert set(res.modes) == {"static", GLOBAL}
