import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from core.oracles import brute_integer_min_max, lp_min_max
from core.strategies import counts_for, placements
from sglang_moe_lb import Placement, count_experts, dispatch, dp_offsets, integer_quotas, solve_split


@st.composite
def routed_batch(draw, num_logical: int, max_tokens: int = 40):
    """topk_ids [T, k] with distinct experts per row and some -1 padding rows/entries."""
    k = draw(st.integers(1, min(4, num_logical)))
    T = draw(st.integers(0, max_tokens))
    rows = [draw(st.permutations(range(num_logical)))[:k] for _ in range(T)]
    t = torch.tensor(rows, dtype=torch.long).reshape(T, k)
    if T and draw(st.booleans()):
        t[draw(st.integers(0, T - 1))] = -1
    return t


def _per_expert(pl, q):
    return torch.zeros(pl.num_logical, dtype=torch.long).scatter_add_(0, pl.phy2log[0], q)


@given(st.data())
def test_quotas_conserve_and_respect_bound(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=500))
    x = solve_split(pl, c)
    m_lp = lp_min_max(p2l.tolist(), R, c.tolist())
    for sweeps in (0, 8):
        q = integer_quotas(pl, x, c, polish_sweeps=sweeps)
        assert q.dtype == torch.long and bool((q >= 0).all())
        assert torch.equal(_per_expert(pl, q), c)
        loads = pl.rank_loads(q)
        bound = m_lp + pl.rank_replicated_slots[0].to(torch.float64)
        has_rep = pl.rank_replicated_slots[0] > 0
        assert bool((loads[has_rep] < bound[has_rep] + 1e-9).all())
        assert bool((loads[~has_rep] <= m_lp + 1e-9).all())
        if sweeps:  # polishing never raises the max of the plain rounding
            assert int(loads.max()) <= int(pl.rank_loads(integer_quotas(pl, x, c, polish_sweeps=0)).max())


@given(st.data())
def test_polished_quotas_reach_integer_optimum_on_tiny_cases(data):
    p2l, R, E = data.draw(placements(max_ranks=3, max_slots_per_rank=2))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=6))
    q = integer_quotas(pl, solve_split(pl, c), c)
    best = brute_integer_min_max(p2l.tolist(), R, c.tolist())
    assert int(pl.rank_loads(q).max()) == best
    # and the integer optimum is ceil of the LP optimum (integral flow theorem)
    assert best == math.ceil(lp_min_max(p2l.tolist(), R, c.tolist()) - 1e-9)


@given(st.data())
def test_dispatch_meets_quotas_and_keeps_logical_ids(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    topk = data.draw(routed_batch(E))
    c = count_experts(topk, E)
    q = integer_quotas(pl, solve_split(pl, c), c)
    phys = dispatch(pl, topk, q)
    assert phys.shape == topk.shape and phys.dtype == topk.dtype
    valid = topk >= 0
    assert torch.equal(phys[~valid], topk[~valid])
    assert torch.equal(pl.phy2log[0][phys[valid]], topk[valid])
    assert torch.equal(torch.bincount(phys[valid], minlength=pl.num_physical), q)
    assert torch.equal(phys, dispatch(pl, topk, q))


@given(st.data())
def test_dp_attention_offsets_union_meets_global_quotas(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    D = data.draw(st.integers(1, 4))
    k = data.draw(st.integers(1, min(3, E)))
    batches = []
    for _ in range(D):  # some ranks may have zero tokens
        T = data.draw(st.integers(0, 12))
        rows = [data.draw(st.permutations(range(E)))[:k] for _ in range(T)]
        batches.append(torch.tensor(rows, dtype=torch.long).reshape(T, k))
    per_rank = torch.stack([count_experts(b, E) for b in batches])
    c = per_rank.sum(0)
    q = integer_quotas(pl, solve_split(pl, c), c)
    got = torch.zeros(pl.num_physical, dtype=torch.long)
    for d, b in enumerate(batches):
        phys = dispatch(pl, b, q, offsets=dp_offsets(per_rank, d))
        assert torch.equal(pl.phy2log[0][phys], b)
        got += torch.bincount(phys.reshape(-1), minlength=pl.num_physical)
    assert torch.equal(got, q)


def test_dispatch_hand_case():
    # Expert 0 on slots 0 (rank 0) and 2 (rank 1); quotas 2 and 1: first two tokens -> slot 0.
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2)
    topk = torch.tensor([[0, 1], [2, 0], [0, 2]])
    q = torch.tensor([2, 1, 1, 2])
    assert dispatch(pl, topk, q).tolist() == [[0, 1], [3, 0], [2, 3]]
    # A DP rank whose expert-0 tokens start at global index 1 (quota 2 on slot 0, 2 on slot 2)
    # still lands on slot 0; starting at index 2 it lands on slot 2.
    q = torch.tensor([2, 0, 2, 1])
    assert dispatch(pl, torch.tensor([[0, 2]]), q, offsets=torch.tensor([1, 0, 0])).tolist() == [[0, 3]]
    assert dispatch(pl, torch.tensor([[0, 2]]), q, offsets=torch.tensor([2, 0, 0])).tolist() == [[2, 3]]


def test_mismatched_quotas_never_drop_a_token():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    topk = torch.tensor([[0, 1]] * 5)
    phys = dispatch(pl, topk, torch.zeros(4, dtype=torch.long))  # quotas that cover nobody
    assert torch.equal(pl.phy2log[0][phys], topk)


def test_empty_batch():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    topk = torch.zeros(0, 2, dtype=torch.long)
    c = count_experts(topk, 2)
    q = integer_quotas(pl, solve_split(pl, c), c)
    assert q.tolist() == [0, 0, 0, 0] and dispatch(pl, topk, q).shape == (0, 2)


def test_dp_offsets_rank_check():
    with pytest.raises(ValueError, match="rank 3 out of range"):
        dp_offsets(torch.zeros(2, 4, dtype=torch.long), 3)


@pytest.mark.parametrize(
    "call, msg",
    [
        (lambda pl: dispatch(pl, torch.tensor([[0, 3]]), torch.ones(4, dtype=torch.long)), r"topk_ids must lie in \[-1, 3\)"),
        (lambda pl: dispatch(pl, torch.tensor([[0, -2]]), torch.ones(4, dtype=torch.long)), "topk_ids must lie"),
        (lambda pl: dispatch(pl, torch.tensor([0, 1]), torch.ones(4, dtype=torch.long)), r"topk_ids must be \[tokens, k\]"),
        (lambda pl: dispatch(pl, torch.tensor([[0.0, 1.0]]), torch.ones(4, dtype=torch.long)), "integer ids"),
        (lambda pl: dispatch(pl, torch.tensor([[0, 1]]), torch.ones(3, dtype=torch.long)), r"quotas must be \[4\]"),
        (lambda pl: dispatch(pl, torch.tensor([[0, 1]]), -torch.ones(4, dtype=torch.long)), "quotas has negative"),
        (lambda pl: dispatch(pl, torch.tensor([[0, 1]]), torch.ones(4), None), "quotas must be integer"),
        (lambda pl: dispatch(pl, torch.tensor([[0, 1]]), torch.ones(4, dtype=torch.long), torch.zeros(2)), r"offsets must be \[3\]"),
        (lambda pl: count_experts(torch.tensor([[0, 5]]), 3), r"topk_ids must lie in \[-1, 3\)"),
        (lambda pl: integer_quotas(pl, torch.tensor([float("nan"), 1, 1, 1]), torch.tensor([1, 1, 1])), "split has NaN or inf"),
        (lambda pl: integer_quotas(pl, torch.tensor([float("inf"), 1, 1, 1]), torch.tensor([1, 1, 1])), "split has NaN or inf"),
        (lambda pl: integer_quotas(pl, torch.tensor([-1.0, 1, 1, 1]), torch.tensor([1, 1, 1])), "split has negative"),
        (lambda pl: integer_quotas(pl, torch.tensor([1.0, 1]), torch.tensor([1, 1, 1])), r"split must be \[4\]"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, msg):
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2)
    with pytest.raises(ValueError, match=msg):
        call(pl)
