"""balanced_quotas (token and tile objectives) against an independent HiGHS MILP."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.oracles import brute_integer_min_max, milp_min_max_tiles, milp_min_max_tokens
from core.strategies import counts_for, placements
from sglang_moe_lb import CostModel, Placement, balanced_quotas
from sglang_moe_lb.objective import _flow_round, consolidate_tiles, fill_tiles, tile_units


def _per_expert(pl, q):
    return torch.zeros(pl.num_logical, dtype=torch.long).scatter_add_(0, pl.phy2log[0], q)


def _rank_tiles(pl, q, tile):
    return pl.rank_loads(torch.div(q + tile - 1, tile, rounding_mode="floor"))


@settings(max_examples=150)
@given(st.data())
def test_token_objective_is_integer_optimal(data):
    p2l, R, E = data.draw(placements(max_ranks=6, max_slots_per_rank=4))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=300))
    q = balanced_quotas(pl, c)
    assert q.dtype == torch.long and bool((q >= 0).all())
    assert torch.equal(_per_expert(pl, q), c)
    assert int(pl.rank_loads(q).max()) == milp_min_max_tokens(p2l.tolist(), R, c.tolist())
    assert torch.equal(q, balanced_quotas(pl, c))


@settings(max_examples=150)
@given(st.data())
def test_tile_objective_is_exact_and_never_worse_than_tokens(data):
    p2l, R, E = data.draw(placements(max_ranks=6, max_slots_per_rank=4))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=300))
    tile = data.draw(st.sampled_from([2, 8, 64, 128]))
    cm = CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1.0, peak_flops=1.0, tile_tokens=tile)
    q = balanced_quotas(pl, c, cm)
    assert q.dtype == torch.long and bool((q >= 0).all())
    assert torch.equal(_per_expert(pl, q), c)
    best = milp_min_max_tiles(p2l.tolist(), R, c.tolist(), tile)
    assert int(_rank_tiles(pl, q, tile).max()) == best
    q_tokens = balanced_quotas(pl, c)
    assert int(_rank_tiles(pl, q, tile).max()) <= int(_rank_tiles(pl, q_tokens, tile).max())
    assert torch.equal(q, balanced_quotas(pl, c, cm))
    # every expert's tiles are exactly the tiles it needs: no copy holds an empty or a second partial tile
    n = cm.tiles(q)
    assert torch.equal(_per_expert(pl, n), tile_units(c, tile))


@settings(max_examples=100)
@given(st.data())
def test_multi_layer_equals_per_layer(data):
    p2l, R, E = data.draw(placements(max_ranks=4, max_slots_per_rank=3, max_layers=3))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, layers=pl.num_layers, max_count=200))
    c = c.reshape(-1) if pl.single_layer else c
    for tile in (None, 16):
        q = balanced_quotas(pl, c, tile_tokens=tile)
        for layer in range(pl.num_layers):
            ql = balanced_quotas(pl.layer(layer), c.reshape(pl.num_layers, E)[layer], tile_tokens=tile)
            assert torch.equal(q.reshape(pl.num_layers, -1)[layer], ql)


@given(st.data())
def test_consolidation_keeps_the_max_and_fill_keeps_the_tiles(data):
    p2l, R, E = data.draw(placements(max_ranks=5, max_slots_per_rank=4))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=400))[None]
    tile = data.draw(st.sampled_from([3, 16, 128]))
    units = tile_units(c, tile)
    # any integral tile split: the even one (largest remainder of units / copies)
    share = units.gather(1, pl.phy2log).to(torch.float64) / pl.num_copies.gather(1, pl.phy2log)
    from sglang_moe_lb.quota_dispatch import largest_remainder

    n = largest_remainder(share, pl.phy2log, units)
    n2 = consolidate_tiles(pl, n, units)
    assert torch.equal(torch.zeros_like(units).scatter_add_(1, pl.phy2log, n2), units)
    assert int(pl.rank_loads(n2).max()) <= int(pl.rank_loads(n).max())
    assert int((n2 > 0).sum()) <= int((n > 0).sum())
    q = fill_tiles(pl, n2, c, tile)
    assert torch.equal(torch.zeros_like(c).scatter_add_(1, pl.phy2log, q), c)
    assert torch.equal(torch.div(q + tile - 1, tile, rounding_mode="floor"), n2)


@settings(max_examples=200)
@given(st.data())
def test_flow_rounding_finds_a_dispatch_exactly_when_one_exists(data):
    p2l, R, E = data.draw(placements(max_ranks=3, max_slots_per_rank=2))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=5))
    best = brute_integer_min_max(p2l.tolist(), R, c.tolist())
    for level in range(max(0, best - 2), best + 2):
        got = _flow_round(pl, 0, c, level)
        if level < best:
            assert got is None
        else:
            assert got is not None and torch.equal(_per_expert(pl, got), c)
            assert int(pl.rank_loads(got).max()) <= level


def test_tile_objective_keeps_a_small_expert_on_one_copy():
    # Expert 0 has copies on both ranks; its 10 tokens fit one tile. The token objective splits
    # it 5/5 (two tiles), the tile objective keeps it on the rank with fewer tiles (rank 1).
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2)
    c = torch.tensor([10, 0, 0])
    assert balanced_quotas(pl, c).tolist() == [5, 0, 5, 0]
    assert balanced_quotas(pl, c, tile_tokens=128).tolist() in ([10, 0, 0, 0], [0, 0, 10, 0])
    c = torch.tensor([10, 300, 0])  # rank 0 already holds 3 tiles of expert 1
    assert balanced_quotas(pl, c, tile_tokens=128).tolist() == [0, 300, 10, 0]


def test_bad_counts_and_tiles():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="whole numbers"):
        balanced_quotas(pl, torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="^counts must have shape"):
        balanced_quotas(pl, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="negative"):
        balanced_quotas(pl, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="tile_tokens must be a positive int"):
        balanced_quotas(pl, torch.tensor([1, 2]), tile_tokens=0)
