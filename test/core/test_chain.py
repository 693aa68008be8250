import heapq

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.strategies import placements
from sglang_moe_lb import (
    BalanceMode,
    Placement,
    balance_layer,
    fuse_topk,
    local_stats,
    routed_rank_load,
    shared_quotas,
)
from sglang_moe_lb.waterfill import waterfill

LPLB = BalanceMode(lplb="per-batch", lplb_sync="global")


def joint(candidates: str) -> BalanceMode:
    return BalanceMode(lplb="per-batch", lplb_sync="global", waterfill=candidates)


def waterfill_only(candidates: str) -> BalanceMode:
    return BalanceMode(waterfill=candidates, waterfill_sync="global")


def greedy_unit_fill(load: list[int], n: int) -> int:
    """Oracle: place n unit jobs one by one on the least-loaded bin; optimal for identical units."""
    h = list(load)
    heapq.heapify(h)
    for _ in range(n):
        heapq.heapreplace(h, h[0] + 1)
    return max(h) if h else 0


@st.composite
def ep_batches(draw, max_tokens: int = 24):
    """A placement plus one batch of logical top-k ids per source rank (DP attention)."""
    p2l, R, E = draw(placements(max_ranks=6, max_slots_per_rank=4))
    pl = Placement(p2l, R, E)
    k = draw(st.integers(1, min(4, E)))
    batches = []
    for _ in range(R):
        T = draw(st.integers(0, max_tokens))
        rows = [draw(st.permutations(range(E)))[:k] for _ in range(T)]
        batches.append(torch.tensor(rows, dtype=torch.long).reshape(T, k))
    return pl, batches


def static_mapping(pl, topk):
    """Upstream-like 'static' dispatch: every expert's tokens all go to its first copy."""
    first = pl.copy_order[0][pl.copy_start[0]]
    return torch.where(topk >= 0, first[topk.clamp(min=0)], topk)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=8), st.integers(0, 100))
def test_shared_quotas_are_optimal(load, n):
    q = shared_quotas(torch.tensor(load), n)
    assert int(q.sum()) == n and bool((q >= 0).all())
    assert int((torch.tensor(load) + q).max()) == greedy_unit_fill(load, n)


@pytest.mark.parametrize("candidates", ["conservative", "all_rank"])
@given(data=st.data())
def test_static_waterfill_never_worse_than_local(candidates, data):
    pl, batches = data.draw(ep_batches())
    src = data.draw(st.integers(0, pl.num_ranks - 1))
    topk = batches[src]
    phys = static_mapping(pl, topk)
    R, S = pl.num_ranks, pl.slots_per_rank
    shared = waterfill(phys, R, S, src, candidates)
    load = routed_rank_load(phys, R, S)
    has_route = (phys >= 0).any(1)
    ours = load + torch.bincount(shared[has_route], minlength=R)
    local = load.clone()
    local[src] += int(has_route.sum())
    assert int(ours.max()) <= int(local.max())
    if candidates == "conservative":
        for t in range(topk.shape[0]):
            allowed = set((phys[t][phys[t] >= 0] // S).tolist()) | {src}
            assert int(shared[t]) in allowed
    assert torch.equal(shared, waterfill(phys, R, S, src, candidates))


@pytest.mark.parametrize("candidates", ["conservative", "all_rank"])
@given(data=st.data())
def test_dynamic_waterfill_union(candidates, data):
    pl, batches = data.draw(ep_batches())
    R, S = pl.num_ranks, pl.slots_per_rank
    phys = [static_mapping(pl, b) for b in batches]
    load = sum(routed_rank_load(p, R, S) for p in phys)
    tokens = torch.tensor([int((p >= 0).any(1).sum()) for p in phys])
    union = torch.zeros(R, dtype=torch.long)
    for src, p in enumerate(phys):
        shared = waterfill(p, R, S, src, candidates, rank_load=load, tokens_per_source=tokens)
        union += torch.bincount(shared[(p >= 0).any(1)], minlength=R)
    local = load + tokens
    assert int((load + union).max()) <= int(local.max())
    if candidates == "all_rank":  # quotas met exactly, so the max is the optimum
        assert torch.equal(union, shared_quotas(load, int(tokens.sum())))
        assert int((load + union).max()) == greedy_unit_fill(load.tolist(), int(tokens.sum()))


def test_fuse_topk_layout():
    # S = 3 routed slots per rank -> 4 fused slots per rank; shared slot of rank r is 4r + 3.
    ids = torch.tensor([[0, 5], [-1, -1], [3, -1]])
    w = torch.tensor([[0.6, 0.4], [0.0, 0.0], [1.0, 0.3]])
    out_ids, out_w = fuse_topk(ids, w, torch.tensor([1, 0, 0]), 3, 2.5)
    assert out_ids.tolist() == [[0, 6, 7], [-1, -1, -1], [4, -1, 3]]
    assert torch.allclose(out_w, torch.tensor([[0.6, 0.4, 2.5], [0.0, 0.0, 0.0], [1.0, 0.0, 2.5]]))


def _gathered(pl, mode, batches, phys=None):
    return torch.stack([local_stats(pl, b, mode, None if phys is None else phys[i]) for i, b in enumerate(batches)])


def _total_load(pl, results, batches):
    R, S = pl.num_ranks, pl.slots_per_rank
    load = torch.zeros(R, dtype=torch.long)
    for src, (res, b) in enumerate(zip(results, batches)):
        load += routed_rank_load(res.phys_ids, R, S)
        has_route = (b >= 0).any(1)
        if res.shared_rank is None:
            load[src] += int(has_route.sum())
        else:
            load += torch.bincount(res.shared_rank[has_route], minlength=R)
    return load


@pytest.mark.parametrize("candidates", ["conservative", "all_rank"])
@settings(max_examples=200)  # the heaviest property (3 modes x R ranks per case)
@given(data=st.data())
def test_joint_never_worse_than_either_alone(candidates, data):
    pl, batches = data.draw(ep_batches())
    g = _gathered(pl, LPLB, batches)
    lplb = [balance_layer(pl, b, LPLB, source_rank=s, gathered=g) for s, b in enumerate(batches)]
    up = [static_mapping(pl, b) for b in batches]
    wf_mode = waterfill_only(candidates)
    g_up = _gathered(pl, wf_mode, batches, up)
    wf = [balance_layer(pl, b, wf_mode, source_rank=s, phys_ids=up[s], gathered=g_up) for s, b in enumerate(batches)]
    jm = joint(candidates)
    joint_res = [balance_layer(pl, b, jm, source_rank=s, gathered=_gathered(pl, jm, batches)) for s, b in enumerate(batches)]
    m_joint = int(_total_load(pl, joint_res, batches).max())
    assert m_joint <= int(_total_load(pl, lplb, batches).max())
    if candidates == "all_rank":
        assert m_joint <= int(_total_load(pl, wf, batches).max())
    # every rank agrees on the global quotas, and routed ids keep their logical experts
    assert all(torch.equal(r.quotas, joint_res[0].quotas) for r in joint_res)
    for r, b in zip(joint_res, batches):
        assert torch.equal(torch.where(b >= 0, pl.phy2log[0][r.phys_ids.clamp(min=0)], b), b)


def test_balance_layer_argument_errors():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    topk = torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match="phys_ids"):
        balance_layer(pl, topk, waterfill_only("all_rank"))
    with pytest.raises(ValueError, match="needs plan_map"):
        balance_layer(pl, topk, BalanceMode(lplb="plan"))
    with pytest.raises(ValueError, match="needs hash offsets"):
        balance_layer(pl, topk, BalanceMode(lplb="plan"), plan_map=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="is gated"):
        balance_layer(pl, topk, BalanceMode(lplb="plan", gate=True))
    with pytest.raises(ValueError, match="layer must be an int in"):
        balance_layer(pl, topk, LPLB, layer=1)
    with pytest.raises(ValueError, match="layer must be an int in"):
        balance_layer(pl, topk, LPLB, layer=-1)
    with pytest.raises(ValueError, match="mode must be a BalanceMode"):
        balance_layer(pl, topk, "lplb")
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[-1, 2\)"):
        balance_layer(pl, torch.tensor([[0, 2]]), LPLB)
    with pytest.raises(ValueError, match="topk_ids must lie"):
        balance_layer(pl, torch.tensor([[-2, 0]]), LPLB)
    with pytest.raises(ValueError, match=r"source_rank must be an int in \[0, 2\), got 5"):
        balance_layer(pl, topk, LPLB, source_rank=5)
    with pytest.raises(ValueError, match=r"source_rank must be an int in \[0, 2\), got True"):
        balance_layer(pl, topk, LPLB, source_rank=True)
    with pytest.raises(ValueError, match="has no collective"):
        local = BalanceMode(lplb="per-batch", lplb_sync="local")
        balance_layer(pl, topk, local, gathered=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="gathered must be"):
        balance_layer(pl, topk, LPLB, gathered=torch.zeros(2, 7, dtype=torch.int32))
    with pytest.raises(ValueError, match="needs a cost model"):
        balance_layer(pl, topk, BalanceMode(lplb="per-batch", objective="tiles"))


def test_plan_mode_is_the_maps_gather():
    """A plan in the chain is exactly ``plan_map[topk_ids, offsets]``: hand-built map, hand-picked slots."""
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2)
    plan_map = torch.tensor([[0, 0, 2, 2], [1, 1, 1, 1], [3, 3, 3, 3]])  # expert 0: hash slots 0-1 -> slot 0, 2-3 -> 2
    topk = torch.tensor([[0, 1], [0, 2], [0, 1]])
    offsets = torch.tensor([[0, 3], [2, 1], [1, 0], [3, 3]])
    res = balance_layer(pl, topk, BalanceMode(lplb="plan"), plan_map=plan_map, offsets=offsets)
    assert res.phys_ids.tolist() == [[0, 1], [2, 3], [0, 1]]
    assert res.quotas is None and res.shared_rank is None


@pytest.mark.parametrize("entry, value, why", [((1, 2), 0, "plan_map\\[1, 2\\] = 0 is not a physical copy of expert 1"),
                                               ((2, 0), 4, "plan_map\\[2, 0\\] = 4 is not a physical copy of expert 2"),
                                               ((0, 3), -1, "plan_map\\[0, 3\\] = -1 is not a physical copy of expert 0")])
def test_plan_map_entries_must_be_copies_of_their_expert(entry, value, why):
    """A map that sends an expert's tokens to another expert's slot (or outside the layer) is refused."""
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2)
    plan_map = torch.tensor([[0, 0, 2, 2], [1, 1, 1, 1], [3, 3, 3, 3]])
    plan_map[entry] = value
    offsets = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=why):
        balance_layer(pl, torch.tensor([[0, 1]]), BalanceMode(lplb="plan"), plan_map=plan_map, offsets=offsets)
    with pytest.raises(ValueError, match="integer physical ids"):
        balance_layer(pl, torch.tensor([[0, 1]]), BalanceMode(lplb="plan"), plan_map=plan_map.double(), offsets=offsets)
