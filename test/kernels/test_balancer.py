"""LayerBalancer (kernels A-D chained) against ``reference.reference_layer`` (the core chain with
the fixed-point split): what the seam tests do not cover (repeated calls on the same buffers,
certificate flags, fused output, the static map, edge batches, a global call that stands on
its own, in-place placement updates, bad inputs). Every mode: test_seam.py."""

import random
import zlib

import pytest
import torch

from moe_lb_kernels import LayerBalancer
from moe_lb_kernels.reference import reference_layer
from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import local_stats
from sglang_moe_lb.waterfill import fuse_topk, shared_quotas

from .helpers import random_ids, random_placement, upstream_phys

LOCAL = [
    "lplb/per-batch/local/tokens",
    "waterfill+lplb/per-batch/local/tokens/all_rank",
    "waterfill+lplb/per-batch/local/tokens/conservative",
    "waterfill/all_rank/local",
    "waterfill/conservative/local",
]


def _compare(out, ref, T):
    assert torch.equal(out.phys_ids[:T].cpu().to(torch.long), ref.phys_ids.to(torch.long))
    if ref.shared_rank is not None:
        assert torch.equal(out.shared_rank[:T].cpu(), ref.shared_rank)
    if ref.quotas is not None and out.quotas is not None:
        assert torch.equal(out.quotas.cpu(), ref.quotas)


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize("seed", range(4))
def test_local_matches_reference(device, name, seed):
    mode = BalanceMode.parse(name)
    rng = random.Random(zlib.crc32(repr((name, seed)).encode()))
    pl = random_placement(rng)
    K = rng.choice([1, 2, 3])
    T = rng.choice([0, 1, 9, 40])
    ids = random_ids(rng, T, K, pl.num_logical)
    if seed % 2:
        ids = ids.to(torch.int32)
    src = rng.randrange(pl.num_ranks)
    phys = upstream_phys(pl, ids, rng) if mode.lplb == "off" else None
    bal = LayerBalancer(pl, 48, K, mode, device, source_rank=src)
    ref = reference_layer(pl, ids, mode, source_rank=src, phys_ids=phys)
    phys_d = None if phys is None else phys.to(device)
    out = bal(ids.to(device), phys_ids=phys_d)
    _compare(out, ref, T)
    if mode.per_batch:
        assert bool(bal.flags[0].item()) == bool(ref.certified)
    # a second call on the same buffers (self-cleaning accumulators) gives the same answer
    _compare(bal(ids.to(device), phys_ids=phys_d), ref, T)
    assert bal.counters()["calls"] == 2


@pytest.mark.parametrize("name", ["lplb/per-batch/global/tokens", "waterfill/conservative/global",
                                  "waterfill+lplb/per-batch/global/tokens/conservative"])
def test_global_call_stands_on_its_own(device, name):
    """The dispatch's per-block histograms come from the call's own count: rows built by the core,
    with the balancer's ``local_stats`` last run on other ids, still give the reference."""
    mode = BalanceMode.parse(name)
    rng = random.Random(zlib.crc32(name.encode()))
    for _ in range(3):
        _global_call_case(device, mode, rng)


def _global_call_case(device, mode, rng):
    K = 2
    while True:
        pl = random_placement(rng, min_ranks=3, max_ranks=4, max_spr=3)
        R = pl.num_ranks
        ids = [random_ids(rng, 20, K, pl.num_logical, "skewed") for _ in range(R)]  # > 1 block of 16 tokens
        phys = [upstream_phys(pl, x, rng) if mode.lplb == "off" else None for x in ids]
        rows = torch.stack([local_stats(pl, x, mode, p) for x, p in zip(ids, phys)])
        if mode.lplb != "off":
            src = 1
            break
        # Waterfill: a rank that keeps some of its tokens and sends the rest, so the order matters
        q = shared_quotas(rows[:, :-1].sum(0).long(), rows[:, -1].sum())
        part = [d for d in range(R) if 0 < q[d] < rows[d, -1]]
        if part:
            src = part[0]
            break
    bal = LayerBalancer(pl, 24, K, mode, device, source_rank=src)
    assert bal.BT == 16
    stale = torch.full((23, K), -1, dtype=torch.long, device=device)  # per-block histograms of nothing
    bal.local_stats(stale, None if phys[src] is None else stale)
    out = bal(ids[src].to(device), phys_ids=None if phys[src] is None else phys[src].to(device), gathered=rows.to(device))
    ref = reference_layer(pl, ids[src], mode, source_rank=src, gathered=rows, phys_ids=phys[src])
    _compare(out, ref, ids[src].shape[0])


def test_empty_batch_and_hot_expert(device):
    p2l = torch.tensor([0, 1, 2, 3, 0, 0, 4, 5])
    pl = Placement(p2l, 4, 6)
    for name in LOCAL[:3]:
        mode = BalanceMode.parse(name)
        bal = LayerBalancer(pl, 64, 2, mode, device, source_rank=1)
        for ids in (torch.zeros(0, 2, dtype=torch.long), torch.stack([torch.zeros(50, dtype=torch.long),
                                                                       torch.full((50,), -1)], 1)):
            ref = reference_layer(pl, ids, mode, source_rank=1)
            _compare(bal(ids.to(device)), ref, ids.shape[0])
        # the hot expert's copies: slot 0 on rank 0, slots 4 and 5 both on rank 2 -> 25 | 13 + 12
        if mode.flag == "lplb":
            assert bal.quotas[[0, 4, 5]].tolist() == [25, 13, 12]


def test_no_replicas(device):
    rng = random.Random(5)
    pl = Placement(torch.randperm(12), 3, 12)
    ids = random_ids(rng, 30, 4, 12)
    mode = BalanceMode.parse("lplb/per-batch/local/tokens")
    ref = reference_layer(pl, ids, mode)
    static = LayerBalancer(pl, 30, 4, mode, device, static_only=True)  # one light kernel, no quotas
    out = static(ids.to(device))
    assert torch.equal(out.phys_ids.cpu().long(), ref.phys_ids) and out.quotas is None
    full = LayerBalancer(pl, 30, 4, mode, device)  # the seam's form: quotas too (the counts per slot)
    _compare(full(ids.to(device)), ref, 30)
    with pytest.raises(ValueError, match="static_only"):
        LayerBalancer(Placement(torch.tensor([0, 1, 0, 2]), 2, 3), 4, 1, mode, device, static_only=True)


def test_fused_output_matches_core(device):
    rng = random.Random(11)
    pl = random_placement(rng, min_ranks=2)
    ids = random_ids(rng, 21, 3, pl.num_logical)
    w = torch.rand(21, 3)
    mode = BalanceMode.parse("waterfill+lplb/per-batch/local/tokens/conservative")
    bal = LayerBalancer(pl, 32, 3, mode, device, source_rank=1)
    fi = torch.empty(21, 4, dtype=torch.int32, device=device)
    fw = torch.empty(21, 4, dtype=torch.float32, device=device)
    out = bal(ids.to(device), topk_weights=w.to(device), out_fused_ids=fi, out_fused_weights=fw, shared_weight=0.5)
    ref_i, ref_w = fuse_topk(out.phys_ids.cpu(), w, out.shared_rank.cpu(), pl.slots_per_rank, 0.5)
    assert torch.equal(fi.cpu().long(), ref_i.long()) and torch.equal(fw.cpu(), ref_w)


def test_update_placement_in_place(device):
    rng = random.Random(3)
    pl1 = Placement(torch.tensor([0, 1, 2, 3, 0, 1, 4, 5]), 4, 6)
    pl2 = Placement(torch.tensor([2, 1, 2, 3, 0, 5, 4, 2]), 4, 6)
    mode = BalanceMode.parse("lplb/per-batch/local/tokens")
    bal = LayerBalancer(pl1, 16, 2, mode, device, max_rows=4, max_copies=4, max_colours=4)
    ids = random_ids(rng, 16, 2, 6)
    bal.update_placement(pl2)
    _compare(bal(ids.to(device)), reference_layer(pl2, ids, mode), 16)
    with pytest.raises(ValueError):
        bal.update_placement(Placement(torch.tensor([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0]), 4, 6))


def test_bad_inputs_raise(device):
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2, 3)
    mode = BalanceMode.parse("lplb/per-batch/local/tokens")
    bal = LayerBalancer(pl, 4, 2, mode, device)
    with pytest.raises(ValueError):
        bal(torch.zeros(5, 2, dtype=torch.long, device=device))  # more than max_tokens
    with pytest.raises(ValueError):
        bal(torch.zeros(2, 3, dtype=torch.long, device=device))  # wrong top-k
    with pytest.raises(ValueError, match="phys_ids"):
        LayerBalancer(pl, 4, 2, "waterfill/all_rank/local", device)(torch.zeros(2, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="no collective"):
        bal.local_stats(torch.zeros(2, 2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="runs no kernel"):
        LayerBalancer(pl, 4, 2, "lplb/plan", device)
    with pytest.raises(ValueError, match="gated"):
        LayerBalancer(pl, 4, 2, "lplb/per-batch/local/tokens/gate", device)
    with pytest.raises(ValueError, match="token objective"):
        LayerBalancer(pl, 4, 2, "lplb/per-batch/local/tiles", device)
