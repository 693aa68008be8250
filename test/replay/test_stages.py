"""Each replay stage on its own: read, timeline, evaluate pieces, bounds, aggregate, sweep sampling."""

import numpy as np
import pytest
import torch

from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.placement import Placement
from sglang_moe_lb.plan import plan_maps, solve_plans
from sglang_moe_lb.replay import aggregate as agg
from sglang_moe_lb.replay import bounds as bd
from sglang_moe_lb.replay.evaluate import fused_slots, split_sizes
from sglang_moe_lb.replay.mode_names import parse_mode
from sglang_moe_lb.replay.read import count_layers, read_trace
from sglang_moe_lb.replay.setup import evenly_spaced
from sglang_moe_lb.replay.sources import Batch, Trace, bundled_trace, synthetic_trace
from sglang_moe_lb.replay.sweep import resample_counts, resample_tokens, sized_trace
from sglang_moe_lb.replay.timeline import PlanOptions, build_timeline


# ------------------------------------------------------------------------------------------
# read
# ------------------------------------------------------------------------------------------
def test_read_counts_every_step_and_keeps_the_batches():
    tr = synthetic_trace(steps=5, tokens=(64, 256), num_ranks=2, experts=8, top_k=2, layers=2, seed=3)
    one, two = read_trace(tr, workers=1), read_trace(tr, workers=2)
    assert torch.equal(one.counts, two.counts)
    for t in range(tr.num_steps):
        ids = tr.batch(t).topk
        for layer in range(2):
            assert one.counts[t, layer].tolist() == torch.bincount(ids[layer].flatten(), minlength=8).tolist()
        assert torch.equal(two.batch(tr, t).topk, ids)


def test_count_layers_ignores_padding():
    ids = torch.tensor([[[0, -1], [2, 2]], [[-1, -1], [1, 0]]])
    assert count_layers(ids, 3).tolist() == [[1, 0, 2], [1, 1, 0]]


# ------------------------------------------------------------------------------------------
# timeline
# ------------------------------------------------------------------------------------------
class _FixedUp:
    """A stand-in for SGLang's EPLB: a fixed new map at every rebalance (records the windows)."""

    def __init__(self, p2l, l2p=None):
        self.p2l, self.l2p, self.windows, self.installed = p2l, l2p, [], []

    def rebalance(self, w):
        self.windows.append(w.clone())
        return self.p2l, self.l2p

    def install(self, p2l, l2p):
        self.installed.append(p2l.clone())
        return len(self.installed)  # a distinct dispatch state per install


_CM = CostModel(weight_bytes=44e6, flops_per_token=1e6, bandwidth=4.4e12, peak_flops=2e12, tile_tokens=8)


def test_timeline_rebalances_on_the_window_and_solves_plans():
    E, R = 4, 2
    p2l = torch.tensor([[0, 1, 0, 2, 3, 0]])  # expert 0 on both ranks (slots 0, 2 on rank 0; 5 on rank 1)
    counts = torch.zeros(7, 1, E, dtype=torch.float64)
    counts[:, 0, 0] = 10.0
    counts[:, 0, 3] = 2.0
    counts[4:, 0, 1] = 30.0  # traffic moves at step 4
    tr = Trace(E, 1, 1, 7, lambda t: None, recorded_placement=p2l)
    up = _FixedUp(p2l)
    opts = PlanOptions(_CM, top_k=1, refresh=2, window=1, levels=(1, 64))
    tl = build_timeline(tr, counts, up=up, ep_size=R, num_physical=6, init="recorded", rebalance_every=3, window=2,
                        plans=opts)
    assert tl.rebalance_steps == [3, 6] and tl.state_of_step == [0, 0, 0, 1, 1, 1, 2]
    assert [w.shape[0] for w in up.windows] == [2, 2] and torch.equal(up.windows[0], counts[1:3])
    # plans: the initial one (no counts: uniform shares), refreshes at 2 and 4, rebalances at 3 and 6
    assert [(p.how, p.window) for p in tl.plans] == [
        ("initial (uniform shares)", (0, 0)), ("refresh", (1, 2)), ("rebalance", (2, 3)), ("refresh", (3, 4)),
        ("rebalance", (5, 6))]
    assert tl.plan_of_step == [0, 0, 1, 2, 3, 3, 4]
    pl = Placement(p2l, R, E)
    for p in tl.plans[1:]:
        lo, hi = p.window
        want = solve_plans(pl, counts[lo:hi], _CM, top_k=1, levels=(1, 64))
        assert torch.equal(p.plans.weights, want.weights) and p.state == tl.state_of_step[hi]
        assert torch.equal(p.maps, plan_maps(pl, want.weights, want.hash_slots))


def test_decode_placement_is_ours_and_sglangs_modes_keep_eplbs():
    from sglang_moe_lb.decode_placement import logical_to_all_physical

    E, R = 6, 3
    p2l = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5, 1]])  # rank 0: three copies of expert 0; rank 1 none to spare
    counts = torch.zeros(2, 1, E, dtype=torch.float64)
    counts[:, 0] = torch.tensor([10.0, 9.0, 9.0, 8.0, 8.0, 8.0])
    tr = Trace(E, 1, 1, 2, lambda t: None, calibration=counts[0])
    up = _FixedUp(p2l, logical_to_all_physical(p2l, E))
    for placement, moved in (("eplb", False), ("decode", True)):
        tl = build_timeline(tr, counts, up=up, ep_size=R, num_physical=9, init="calibration", rebalance_every=0,
                            window=1, placement=placement, cost=_CM)
        st = tl.states[0]
        assert torch.equal(st.ref_pl.phy2log, p2l)
        assert (st.pl is not st.ref_pl) == moved and (st.up != st.ref_up) == moved
        if moved:
            assert sorted(st.pl.phy2log[0].tolist()) == sorted(p2l[0].tolist())  # same replica counts
            assert "decode-aware post-step" in st.how


# ------------------------------------------------------------------------------------------
# evaluate pieces
# ------------------------------------------------------------------------------------------
def test_split_sizes_and_fused_slots():
    assert split_sizes(7, 3, None) == [3, 2, 2] and split_sizes(7, 3, [5, 1, 1]) == [5, 1, 1]
    assert split_sizes(7, 3, [5, 1]) == [3, 2, 2]  # a split for another EP size: even
    R, S = 2, 2
    phys = [torch.tensor([[0, 3], [1, -1]]), torch.tensor([[2, 3]])]
    valid = [torch.tensor([True, True]), torch.tensor([True])]
    local = fused_slots(phys, None, valid, R, S)
    assert local.tolist() == [[1, 1, 2], [1, 2, 1]]  # shared expert on the source ranks: 2 and 1 tokens
    moved = fused_slots(phys, [torch.tensor([1, 1]), torch.tensor([0])], valid, R, S)
    assert moved.tolist() == [[1, 1, 1], [1, 2, 2]]


# ------------------------------------------------------------------------------------------
# bounds: the rank-set formula and its HiGHS fallback agree
# ------------------------------------------------------------------------------------------
def test_subset_bound_equals_the_highs_fallback(monkeypatch):
    g = torch.Generator().manual_seed(0)
    R, S, E, L = 4, 3, 9, 3
    p2l = torch.stack([torch.cat([torch.arange(E), torch.randint(0, E, (R * S - E,), generator=g)])[
        torch.randperm(R * S, generator=g)] for _ in range(L)])
    pl = Placement(p2l, R, E)
    counts = torch.randint(0, 50, (L, E), generator=g)
    shared = torch.randint(0, 30, (L, R), generator=g)
    fast = bd.layer_bounds(bd.SubsetBound(pl), counts, shared)
    monkeypatch.setattr(bd, "MAX_SUBSET_WORK", 1)
    slow_sb = bd.SubsetBound(pl)
    assert not slow_sb.enabled
    slow = bd.layer_bounds(slow_sb, counts, shared)
    for k in ("joint", "local", "routed"):
        assert torch.allclose(fast[k], slow[k], rtol=1e-9), k


# ------------------------------------------------------------------------------------------
# aggregate
# ------------------------------------------------------------------------------------------
def test_time_summary_by_hand():
    """1 µs per active copy and 1 µs per tile of 2 tokens; 2 ranks of 1 routed + 1 shared slot."""
    cm = CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1e6, peak_flops=2e6, tile_tokens=2)
    static = np.array([[[[4, 0], [1, 1]]]], dtype=np.float64)  # [N=1, L=1, R=2, S+1=2]
    mode = np.array([[[[2, 1], [2, 1]]]], dtype=np.float64)
    # static: rank 0 one copy with 4 tokens = 2 tiles -> 2 µs; rank 1: 2 copies, 1 tile each -> 2 µs. max 2.
    # mode: each rank 2 copies, tiles 1 + 1 -> 2 µs.  With 0.5 µs overhead: 2.5 / 2.
    open_ = np.array([True])
    out = agg.time_summary(mode, static, np.array([True]), np.array([0.5]), open_, cm)
    assert out["time_vs_static"] == pytest.approx(1.25)
    assert out["time_vs_static_no_overhead"] == pytest.approx(1.0)
    assert out["break_even_overhead_us"] == pytest.approx(0.0)
    assert out["tile_balancedness"] == pytest.approx(1.0)  # tiles per rank [2, 2]
    st = agg.time_summary(static, static, np.array([True]), np.array([0.0]), open_, cm)
    assert st["tile_balancedness"] == pytest.approx(2 / 2)  # static tiles [2, 2] too


def test_gate_closed_means_static_and_no_overhead():
    from sglang_moe_lb.gate import Overheads

    cm = CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1e6, peak_flops=1e6, tile_tokens=1)
    ov = Overheads({"lplb/per-batch": {1: 100.0}}, 10.0, 10.0, 8)
    mode = parse_mode("lplb/per-batch/global/tokens/gate")
    open_ = agg.gate_open(mode, np.array([1.0, 2.0]), cm, ov, top_k=1, S=1, R=2, expected_gain=0.05)
    assert not open_.any()
    assert agg.gate_open(mode.ungated, np.array([1.0, 2.0]), cm, ov, 1, 1, 2, 0.05).all()
    assert agg.step_overheads(mode, np.array([1.0, 2.0]), open_, ov, 2).tolist() == [0.0, 0.0]
    assert agg.step_overheads(mode.ungated, np.array([1.0]), np.array([True]), ov, 2).tolist() == [110.0]
    static = np.ones((2, 1, 2, 2))
    ungated = np.full((2, 1, 2, 2), 3.0)
    assert np.array_equal(agg.gated_slots(ungated, static, open_), static)
    assert np.array_equal(agg.gated_slots(ungated, static, np.array([True, False]))[0], ungated[0])


# ------------------------------------------------------------------------------------------
# sweep sampling
# ------------------------------------------------------------------------------------------
def test_evenly_spaced():
    assert evenly_spaced(10, 3) == [0, 4, 9] and evenly_spaced(3, 8) == [0, 1, 2] and evenly_spaced(5, -1) == list(range(5))
    assert evenly_spaced(5, 0) == []


def test_resample_tokens_keeps_each_rank_own_rows():
    ids = torch.arange(2 * 5 * 2).reshape(2, 5, 2)  # layer 0 rows 0..4 (values 0..9), layer 1 offset by 10
    b = Batch(ids, [3, 2], "x")
    out = resample_tokens(b, 4, 2, torch.Generator().manual_seed(0))
    assert out.topk.shape == (2, 8, 2) and out.rank_sizes == [4, 4]
    rows0 = {tuple(r) for r in out.topk[0, :4].tolist()}
    rows1 = {tuple(r) for r in out.topk[0, 4:].tolist()}
    assert rows0 <= {(0, 1), (2, 3), (4, 5)} and rows1 <= {(6, 7), (8, 9)}
    assert torch.equal(out.topk[1] - out.topk[0], torch.full((8, 2), 10))  # a token keeps all its layers


def test_resample_counts_follows_the_recorded_distribution():
    counts = torch.tensor([[300, 100, 100, 0]])
    out = resample_counts(counts, 2000, 2, 2, torch.Generator().manual_seed(1), "recorded")
    ids = out.topk[0]
    assert out.topk.shape == (1, 4000, 2) and all(len(set(r)) == 2 for r in ids[:50].tolist())
    share = torch.bincount(ids.flatten(), minlength=4).double() / 4000
    assert share.tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0], abs=0.03)  # inclusion: 300/500*2 capped at 1


def test_sized_traces():
    tr = bundled_trace(steps=2, tokens=(512, 4096), num_ranks=4, seed=1)
    t64, how = sized_trace(tr, 64, 4, seed=0)
    assert "generator" in how and t64.batch(1).rank_sizes == [64] * 4 and t64.batch(1).topk.shape[1] == 256
    counts = torch.tensor([[[5, 3, 0]], [[1, 1, 6]]])
    dump = Trace(3, 1, 1, 2, lambda t: None, step_counts=counts)
    d, how = sized_trace(dump, 10, 2, seed=0)
    assert "per-expert counts" in how and d.batch(1).topk.shape == (1, 20, 1)
    tok = Trace(3, 1, 1, 1, lambda t: Batch(torch.tensor([[[0], [1], [2]]]), [1, 2], "r"))
    t, how = sized_trace(tok, 5, 2, seed=0)
    b = t.batch(0)
    assert "resampled" in how and b.rank_sizes == [5, 5] and set(b.topk[0, :5].flatten().tolist()) == {0}
