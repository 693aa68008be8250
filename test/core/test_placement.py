import pytest
import torch

from sglang_moe_lb import Placement, PlacementError


def test_basic_derived_views():
    # 2 ranks x 3 slots; expert 0 replicated on both ranks, expert 1 twice on rank 1.
    pl = Placement(torch.tensor([0, 2, 3, 1, 0, 1]), num_ranks=2)
    assert pl.num_logical == 4 and pl.slots_per_rank == 3 and pl.num_redundant == 2
    assert pl.slot_rank.tolist() == [0, 0, 0, 1, 1, 1]
    assert pl.num_copies.tolist() == [[2, 2, 1, 1]]
    assert pl.replicated_slot.tolist() == [[True, False, False, True, True, True]]
    assert pl.rank_replicated_slots.tolist() == [[1, 3]]
    order, start = pl.copy_order[0].tolist(), pl.copy_start[0].tolist()
    assert [order[start[e] : start[e] + 2] for e in (0, 1)] == [[0, 4], [3, 5]]


def test_replica_blocks_colours_never_share_a_rank():
    g = torch.Generator().manual_seed(3)
    E, R, S = 32, 8, 6
    p2l = torch.cat([torch.arange(E), torch.randint(0, E, (R * S - E,), generator=g)])
    pl = Placement(torch.stack([p2l[torch.randperm(R * S, generator=g)] for _ in range(3)]), R, E)
    dummy = pl.num_layers * R
    seen = 0
    for layer_t, expert_t, slot, rank, *_ in pl.replica_blocks.colours:
        for layer in layer_t.unique().tolist():
            rank_sets = [set(r.tolist()) - {dummy} for r in rank[layer_t == layer]]
            assert sum(map(len, rank_sets)) == len(set().union(*rank_sets)), "a colour shares a rank"
        seen += expert_t.numel()
    assert seen == int((pl.num_copies >= 2).sum())


@pytest.mark.parametrize(
    "p2l, R, E, msg",
    [
        (torch.tensor([0, 1, 2]), 2, None, "cannot be split evenly"),
        (torch.tensor([0, 1, 5, 2]), 2, 4, "must lie in"),
        (torch.tensor([0, -1, 1, 2]), 2, None, "must lie in"),
        (torch.tensor([0, 0, 1, 1]), 2, 3, "expert 2 has no physical copy"),
        (torch.tensor([0.0, 1.0]), 1, None, "integer dtype"),
        (torch.zeros(2, 2, 2, dtype=torch.long), 1, None, "must be \\[P\\] or \\[layers, P\\]"),
        ([0, 1], 1, None, "must be a torch.Tensor"),
        (torch.tensor([0, 1]), 0, None, "num_ranks must be a positive int"),
    ],
)
def test_validation_errors(p2l, R, E, msg):
    with pytest.raises(PlacementError, match=msg):
        Placement(p2l, R, E)


def test_counts_validation():
    pl = Placement(torch.tensor([0, 1, 1, 0]), 2)
    for bad, msg in [
        (torch.tensor([1, 2, 3]), "shape"),
        (torch.tensor([1, -2]), "negative"),
        (torch.tensor([1.0, float("nan")]), "NaN"),
        ([1, 2], "torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pl.check_counts(bad)


def test_with_shared_expert_layout():
    pl = Placement(torch.tensor([0, 1, 2, 0]), 2)
    f = pl.with_shared_expert
    # rank r: its routed slots then one copy of the shared expert (id E=3); p -> p + p // S
    assert f.phy2log.tolist() == [[0, 1, 3, 2, 0, 3]]
    assert f.num_logical == 4 and f.slots_per_rank == 3
