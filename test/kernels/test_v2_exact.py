"""The v2 kernels equal their reference bit for bit in every mode (Triton interpreter on CPU).

The reference is the core's one chain with the v2 fixed-point steps
(``reference_layer(..., spec=V2_SPEC)``). Random small placements (multi-copy experts, copies
of one expert on one rank, no replicas), batches with padding rows and entries, empty
batches, one hot expert; both launch paths (one launch: every program counts every token;
two: the counting kernel first) with several programs per call; global sync over D = R
ranks with all-gathered rows (the rows equal ``chain.local_stats``, and the union of every
rank's dispatch meets the global quotas exactly).
"""

import random

import pytest
import torch

from moe_lb_kernels.reference import reference_layer
from moe_lb_kernels.v2 import V2_SPEC, make_layer_path
from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import local_stats
from sglang_moe_lb.cost import CostModel

from .conftest import DEVICE
from .helpers import random_ids, random_placement, upstream_phys


def _d(t):
    return None if t is None else t.to(DEVICE)

MODES = [
    "lplb/table",
    "lplb/per-batch/local/tokens",
    "lplb/per-batch/local/tiles",
    "lplb/per-batch/global/tokens",
    "lplb/per-batch/global/tiles",
    "waterfill/all_rank/local",
    "waterfill/conservative/local",
    "waterfill/all_rank/global",
    "waterfill/conservative/global",
    "waterfill+lplb/table/all_rank/local",
    "waterfill+lplb/table/conservative/global",
    "waterfill+lplb/per-batch/local/tokens/all_rank",
    "waterfill+lplb/per-batch/local/tiles/all_rank",
    "waterfill+lplb/per-batch/global/tokens/all_rank",
    "waterfill+lplb/per-batch/global/tiles/all_rank",
    "waterfill+lplb/per-batch/local/tokens/conservative",
    "waterfill+lplb/per-batch/global/tiles/conservative",
]


def _cost(tile: int) -> CostModel:
    return CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1.0, peak_flops=1.0, tile_tokens=tile)


def _table(pl: Placement, rng: random.Random) -> torch.Tensor:
    """Random split fractions per expert (sum 1 per expert)."""
    w = torch.tensor([rng.random() + 0.05 for _ in range(pl.num_physical)], dtype=torch.float64)
    tot = torch.zeros(pl.num_logical, dtype=torch.float64).index_add_(0, pl.phy2log[0], w)
    return w / tot[pl.phy2log[0]]


def _same(got, ref, mode, what):
    assert torch.equal(got.phys_ids.cpu().long(), ref.phys_ids.long()), f"{what}: phys_ids"
    if mode.waterfill is not None:
        assert torch.equal(got.shared_rank.cpu().long(), ref.shared_rank.long()), f"{what}: shared_rank"
    else:
        assert got.shared_rank is None
    if mode.lplb != "off":
        assert torch.equal(got.quotas.cpu().long(), ref.quotas.long()), f"{what}: quotas"
    assert bool(got.certified) == bool(ref.certified), f"{what}: certified"


def _case(rng: random.Random, mode: BalanceMode, idx: int):
    pl = random_placement(rng, max_ranks=5, max_spr=4, min_ranks=2 if mode.collective else 1)
    K = rng.randint(1, 3)
    T = [0, 1, 7, 23, 37][idx % 5] if mode.collective else [37, 0, 5, 30, 1][idx % 5]
    kind = "hot" if idx % 3 == 2 else None
    return pl, K, T, kind


def _path(pl, mode, K, max_tokens, src, rng, single, cost, table):
    return make_layer_path(pl, mode, max_tokens=max_tokens, topk=K, source_rank=src, device=DEVICE, cost=cost,
                           split_table=table, block=16, single_max=(1 << 30) if single else 0)


@pytest.mark.parametrize("name", MODES)
def test_v2_equals_reference(name):
    mode = BalanceMode.parse(name)
    rng = random.Random(hash(name) % 1000)
    for idx in range(3):
        pl, K, T, kind = _case(rng, mode, idx)
        # local sync splits a tile over the R source ranks (chain.effective_tile): keep it > 1
        tile = rng.choice([2, 3, 5]) * (pl.num_ranks if mode.lplb_sync == "local" else 1)
        cost = _cost(tile) if mode.objective == "tiles" else None
        table = _table(pl, rng) if mode.lplb == "table" else None
        single = idx % 2 == 0
        R = pl.num_ranks
        if not mode.collective:
            src = rng.randrange(R)
            ids = random_ids(rng, T, K, pl.num_logical, kind)
            phys = upstream_phys(pl, ids, rng) if mode.lplb == "off" else None
            path = _path(pl, mode, K, 40, src, rng, single, cost, table)
            got = path(_d(ids), phys_ids=_d(phys))
            ref = reference_layer(pl, ids, mode, spec=V2_SPEC, source_rank=src, split_table=table, phys_ids=phys,
                                  cost=cost)
            _same(got, ref, mode, f"{name} case {idx} (R={R}, T={T}, K={K}, single={single})")
            continue
        D = R
        parts = [random_ids(rng, rng.choice([0, T, T // 2 + 1]), K, pl.num_logical, kind) for _ in range(D)]
        physs = [upstream_phys(pl, p, rng) if mode.lplb == "off" else None for p in parts]
        paths = [_path(pl, mode, K, 40, d, rng, single, cost, table) for d in range(D)]
        rows = []
        for d in range(D):
            row = paths[d].stats(_d(parts[d]), _d(physs[d])).cpu()
            assert torch.equal(row, local_stats(pl, parts[d], mode, physs[d])), f"{name}: stats row of rank {d}"
            rows.append(row.clone())
        gathered = torch.stack(rows)
        union = torch.zeros(pl.num_physical, dtype=torch.long)
        for d in range(D):
            got = paths[d](_d(parts[d]), gathered=_d(gathered), phys_ids=_d(physs[d]))
            ref = reference_layer(pl, parts[d], mode, spec=V2_SPEC, source_rank=d, split_table=table,
                                  gathered=gathered, phys_ids=physs[d], cost=cost)
            _same(got, ref, mode, f"{name} case {idx} rank {d} (R={R}, K={K})")
            if mode.lplb != "off":
                ph = got.phys_ids.reshape(-1).long().cpu()
                union += torch.bincount(ph[ph >= 0], minlength=pl.num_physical)
        if mode.lplb != "off":
            assert torch.equal(union, got.quotas.cpu().long()), f"{name}: union of the ranks' dispatch != global quotas"


def test_v2_repeated_calls_and_placement_update():
    """Buffers are reused: a second batch, then a new placement and a new table, in place."""
    rng = random.Random(7)
    mode = BalanceMode.parse("waterfill+lplb/table/all_rank/local")
    pl = Placement(torch.tensor([0, 1, 2, 0, 3, 1, 0, 4]), 4, 5)
    path = make_layer_path(pl, mode, max_tokens=40, topk=2, source_rank=1, device=DEVICE, block=16, single_max=0)
    ptrs = [t.data_ptr() for t in path.tables.solve_args()] + [path.split_table.data_ptr()]
    for step in range(3):
        if step == 2:
            pl = Placement(torch.tensor([0, 1, 2, 3, 4, 4, 0, 4]), 4, 5)
            path.update_placement(pl)
            table = _table(pl, rng)
            path.set_split_table(table)
        else:
            table = path.split_table.cpu().clone()
        ids = random_ids(rng, 33, 2, 5)
        ref = reference_layer(pl, ids, mode, spec=V2_SPEC, source_rank=1, split_table=table)
        _same(path(_d(ids)), ref, mode, f"step {step}")
    assert ptrs == [t.data_ptr() for t in path.tables.solve_args()] + [path.split_table.data_ptr()]


def test_v2_bad_inputs_are_clear_errors():
    pl = Placement(torch.tensor([0, 1, 2, 0]), 2, 3)
    mode = BalanceMode.parse("lplb/per-batch/local/tokens")
    path = make_layer_path(pl, mode, max_tokens=8, topk=2, source_rank=0, device=DEVICE)
    z = dict(dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="max_tokens"):
        path(torch.zeros(9, 2, **z))
    with pytest.raises(ValueError, match="topk_ids"):
        path(torch.zeros(4, 3, **z))
    with pytest.raises(ValueError, match="no collective"):
        path(torch.zeros(4, 2, **z), gathered=torch.zeros(2, 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="does not fit"):
        path.update_placement(Placement(torch.tensor([0, 0, 0, 1, 2, 1]), 2, 3))
    with pytest.raises(ValueError, match="fixed-point range"):
        make_layer_path(pl, BalanceMode.parse("lplb/per-batch/global/tokens"), max_tokens=1 << 20, topk=8,
                        source_rank=0, device=DEVICE)
    glob = make_layer_path(pl, BalanceMode.parse("lplb/per-batch/global/tokens"), max_tokens=8, topk=2,
                           source_rank=1, device=DEVICE)
    with pytest.raises(ValueError, match="gathered"):
        glob(torch.zeros(4, 2, **z), gathered=torch.zeros(2, 4, **z))


@pytest.mark.parametrize("single", [True, False])
def test_v2_conservative_ties_go_to_the_first_candidate(single):
    """Three ranks with equal routed loads: the source keeps a third of its tokens, the other two
    ranks have equal room, so every overflowing token's two candidates tie; the core picks the
    earlier top-k column. Half the tokens list rank 1 first, half rank 2."""
    pl = Placement(torch.tensor([0, 1, 2]), 3, 3)
    ids = torch.tensor([[0, 1, 2] if t % 2 == 0 else [0, 2, 1] for t in range(12)])
    mode = BalanceMode.parse("waterfill/conservative/local")
    path = make_layer_path(pl, mode, max_tokens=16, topk=3, source_rank=0, device=DEVICE, block=16 if single else 4,
                           single_max=(1 << 30) if single else 0)
    got = path(_d(ids), phys_ids=_d(ids))
    ref = reference_layer(pl, ids, mode, spec=V2_SPEC, source_rank=0, phys_ids=ids)
    assert set(ref.shared_rank.tolist()) == {0, 1, 2}  # the tie was real: both candidates were taken
    _same(got, ref, mode, "ties")
