import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.oracles import lp_min_max
from core.strategies import counts_for, placements
from sglang_moe_lb import Placement, even_split, lower_bound, lp_split, solve_split


def _conserved(pl, x, c):
    per_expert = torch.zeros(pl.num_layers, pl.num_logical, dtype=torch.float64)
    per_expert.scatter_add_(1, pl.phy2log, x.reshape(pl.num_layers, -1))
    return torch.equal(per_expert, c.reshape(pl.num_layers, -1).to(torch.float64))


@given(st.data())
def test_fast_matches_independent_lp(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E))
    x = solve_split(pl, c)
    assert x.shape == (pl.num_physical,) and x.dtype == torch.float64
    assert bool((x >= 0).all())
    assert _conserved(pl, x, c)
    best = lp_min_max(p2l.tolist(), R, c.tolist())
    got = float(pl.rank_loads(x).max())
    assert got == pytest.approx(best, rel=1e-6, abs=1e-6)
    # deterministic, bit for bit
    assert torch.equal(x, solve_split(pl, c))


@given(st.data())
def test_highs_method_matches_independent_lp(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E))
    x = solve_split(pl, c, method="highs")
    assert _conserved(pl, x, c)
    assert float(pl.rank_loads(x).max()) == pytest.approx(lp_min_max(p2l.tolist(), R, c.tolist()), rel=1e-6, abs=1e-6)


@settings(max_examples=200)  # one independent LP per layer per case
@given(st.data())
def test_multi_layer_equals_per_layer(data):
    p2l, R, E = data.draw(placements(max_layers=4))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, layers=pl.num_layers))
    x = solve_split(pl, c[0] if pl.single_layer else c).reshape(pl.num_layers, -1)
    for layer in range(pl.num_layers):
        one = Placement(pl.phy2log[layer], R, E)
        want = lp_min_max(pl.phy2log[layer].tolist(), R, c.reshape(pl.num_layers, -1)[layer].tolist())
        assert float(one.rank_loads(x[layer]).max()) == pytest.approx(want, rel=1e-6, abs=1e-6)


@given(st.data())
def test_lower_bound_is_a_bound(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E))
    loads = pl.rank_loads(even_split(pl, c.reshape(1, -1)))
    lb = float(lower_bound(pl, c.reshape(1, -1), loads)[0])
    assert lb <= lp_min_max(p2l.tolist(), R, c.tolist()) * (1 + 1e-9) + 1e-9


def test_no_replicas_is_the_static_mapping():
    p2l = torch.randperm(64)
    pl = Placement(p2l, 8)
    c = torch.randint(0, 1000, (64,))
    x = solve_split(pl, c)
    assert torch.equal(x, c[p2l].to(torch.float64))


def test_edge_cases():
    # R = 1: everything is on one rank; any split is optimal and conserving.
    pl = Placement(torch.tensor([0, 1, 0, 1]), 1)
    x = solve_split(pl, torch.tensor([3, 5]))
    assert float(x.sum()) == 8 and _conserved(pl, x, torch.tensor([3, 5]))
    # every expert replicated on every rank: perfect balance
    pl = Placement(torch.tensor([0, 1, 2, 0, 1, 2]), 2)
    x = solve_split(pl, torch.tensor([7, 0, 4]))
    assert pl.rank_loads(x).tolist() == [5.5, 5.5]
    # zero tokens
    assert solve_split(pl, torch.zeros(3, dtype=torch.long)).abs().sum() == 0
    # all tokens on one expert that has two copies on different ranks
    pl = Placement(torch.tensor([0, 1, 2, 0]), 2)
    x = solve_split(pl, torch.tensor([11, 0, 0]))
    assert pl.rank_loads(x).tolist() == [5.5, 5.5]


def test_large_counts_stay_exact():
    # 1e8-scale counts: float64 keeps per-expert sums exact (float32 would not).
    g = torch.Generator().manual_seed(0)
    p2l = torch.cat([torch.arange(16), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])])[torch.randperm(24, generator=g)]
    pl = Placement(p2l, 4)
    c = torch.randint(10**8, 3 * 10**8, (16,), generator=g)
    for method in ("fast", "highs"):
        x = solve_split(pl, c, method)
        assert _conserved(pl, x, c)
        assert float(pl.rank_loads(x).max()) == pytest.approx(lp_min_max(p2l.tolist(), 4, c.tolist()), rel=1e-9)


def test_failed_solve_falls_back_to_even_split_once(monkeypatch, caplog):
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    c = torch.tensor([4, 6])

    def boom(*a, **k):
        raise lp_split.SplitError("synthetic failure")

    monkeypatch.setattr(lp_split, "_highs_layer", boom)
    monkeypatch.setattr(lp_split, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sglang_moe_lb.lp_split"):
        x1 = solve_split(pl, c, method="highs")
        x2 = solve_split(pl, c, method="highs")
    assert torch.equal(x1, even_split(pl, c.reshape(1, -1))[0]) and torch.equal(x1, x2)
    assert sum("falls back" in r.message or "even split" in r.message for r in caplog.records) == 1


def test_uncertified_fast_layers_go_to_highs():
    g = torch.Generator().manual_seed(1)
    p2l = torch.cat([torch.arange(32), torch.randint(0, 32, (32,), generator=g)])[torch.randperm(64, generator=g)]
    pl = Placement(p2l, 8)
    c = torch.randint(0, 500, (32,), generator=g) ** 2
    x = solve_split(pl, c, max_sweeps=0)  # no sweep at all: must still be optimal via HiGHS
    assert float(pl.rank_loads(x).max()) == pytest.approx(lp_min_max(p2l.tolist(), 8, c.tolist()), rel=1e-6)


def test_bad_method_and_shapes():
    pl = Placement(torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="method"):
        solve_split(pl, torch.tensor([1, 1]), method="ipm")
    with pytest.raises(ValueError, match="shape"):
        solve_split(pl, torch.tensor([[1, 1]]))


def test_placement_to_keeps_single_layer():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2).to("cpu")
    assert pl.single_layer and solve_split(pl, torch.tensor([2, 2])).shape == (4,)
