"""LayerBalancer (kernels A-D chained) against ``reference.balance_layer_ref`` (the core's
``joint.balance_layer`` with the fixed-point split), in every mode, static and dynamic."""

import random
import zlib

import pytest
import torch

from moe_lb_kernels import LayerBalancer
from moe_lb_kernels.reference import balance_layer_ref, local_stats_ref
from sglang_moe_lb import Placement
from sglang_moe_lb.waterfill import fuse_topk

from .helpers import random_ids, random_placement, upstream_phys

MODES = [
    ("lplb", None),
    ("waterfill+lplb", "all_rank"),
    ("waterfill+lplb", "conservative"),
    ("waterfill", "all_rank"),
    ("waterfill", "conservative"),
]


def _ref(pl, ids, mode, cand, src, phys=None, gathered=None):
    lplb = "off" if mode == "waterfill" else "per_batch"
    return balance_layer_ref(pl, ids, source_rank=src, lplb=lplb, waterfill=cand, gathered=gathered, phys_ids=phys)


def _compare(out, ref, bal, mode, T):
    got_phys = out.phys_ids[:T].cpu().to(torch.long)
    assert torch.equal(got_phys, ref.phys_ids.to(torch.long))
    if mode != "lplb":
        assert torch.equal(out.shared_rank[:T].cpu(), ref.shared_rank)
    if ref.quotas is not None and out.quotas is not None:
        assert torch.equal(out.quotas.cpu(), ref.quotas)


@pytest.mark.parametrize("mode,cand", MODES)
@pytest.mark.parametrize("seed", range(7))
def test_static_matches_reference(device, mode, cand, seed):
    rng = random.Random(zlib.crc32(repr((mode, cand, seed)).encode()))
    pl = random_placement(rng)
    K = rng.choice([1, 2, 3])
    T = rng.choice([0, 1, 9, 40])
    ids = random_ids(rng, T, K, pl.num_logical)
    if seed % 2:
        ids = ids.to(torch.int32)
    src = rng.randrange(pl.num_ranks)
    phys = upstream_phys(pl, ids, rng) if mode == "waterfill" else None
    bal = LayerBalancer(pl, 48, K, mode, device, candidates=cand or "all_rank", source_rank=src)
    ref, cert = _ref(pl, ids, mode, cand, src, phys)
    out = bal(ids.to(device), phys_ids=None if phys is None else phys.to(device))
    _compare(out, ref, bal, mode, T)
    if mode != "waterfill" and (pl.has_replicas or mode == "waterfill+lplb"):
        assert bool(bal.flags[0].item()) == cert
    # a second call on the same buffers (self-cleaning accumulators) gives the same answer
    out2 = bal(ids.to(device), phys_ids=None if phys is None else phys.to(device))
    _compare(out2, ref, bal, mode, T)


@pytest.mark.parametrize("mode,cand", MODES)
@pytest.mark.parametrize("seed", range(3))
def test_dynamic_matches_reference(device, mode, cand, seed):
    """D = R ranks, each with its own balancer: local stats -> all-gather -> per-layer call."""
    rng = random.Random(zlib.crc32(repr(("dyn", mode, cand, seed)).encode()))
    pl = random_placement(rng, min_ranks=2, max_ranks=4)
    R, K = pl.num_ranks, rng.choice([2, 3])
    ids = [random_ids(rng, rng.choice([0, 3, 17]), K, pl.num_logical) for _ in range(R)]
    phys = [upstream_phys(pl, x, rng) if mode == "waterfill" else None for x in ids]
    bals = [LayerBalancer(pl, 24, K, mode, device, candidates=cand or "all_rank", source_rank=d, dynamic=True)
            for d in range(R)]
    rows = []
    for d in range(R):
        row = bals[d].local_stats(ids[d].to(device), None if phys[d] is None else phys[d].to(device)).clone()
        assert torch.equal(row.cpu(), local_stats_ref(pl, ids[d], phys[d] if mode == "waterfill" else None))
        rows.append(row)
    gathered = torch.stack(rows)
    total = torch.zeros(pl.num_physical, dtype=torch.long)
    for d in range(R):
        out = bals[d](ids[d].to(device), phys_ids=None if phys[d] is None else phys[d].to(device), gathered=gathered)
        ref, _ = _ref(pl, ids[d], mode, cand, d, phys[d], gathered.cpu())
        _compare(out, ref, bals[d], mode, ids[d].shape[0])
        p = out.phys_ids[: ids[d].shape[0]].cpu().reshape(-1).to(torch.long)
        total += torch.bincount(p[p >= 0], minlength=pl.num_physical)
    if mode != "waterfill" and not bals[0].static_only:
        assert torch.equal(total, bals[0].quotas.cpu())  # every copy receives exactly its quota, globally


@pytest.mark.parametrize("mode,cand", MODES[:3])
@pytest.mark.parametrize("seed", range(3))
def test_table_split_matches_reference(device, mode, cand, seed):
    """The rebalance-only schedule: a split table applied to each batch's counts."""
    from .test_plan import random_table

    rng = random.Random(zlib.crc32(repr(("table", mode, cand, seed)).encode()))
    pl = random_placement(rng, min_ranks=2)
    K = rng.choice([1, 2, 3])
    ids = random_ids(rng, rng.choice([0, 5, 33]), K, pl.num_logical)
    f = random_table(rng, pl)
    bal = LayerBalancer(pl, 40, K, mode, device, candidates=cand or "all_rank", split="table", source_rank=1 % pl.num_ranks)
    if bal.static_only:
        return
    bal.set_split_table(f.to(device))
    out = bal(ids.to(device))
    ref, _ = balance_layer_ref(pl, ids, source_rank=1 % pl.num_ranks, lplb="table", split_table=f,
                               waterfill=None if mode == "lplb" else cand)
    _compare(out, ref, bal, mode, ids.shape[0])


def test_empty_batch_and_hot_expert(device):
    p2l = torch.tensor([0, 1, 2, 3, 0, 0, 4, 5])
    pl = Placement(p2l, 4, 6)
    for mode, cand in MODES[:3]:
        bal = LayerBalancer(pl, 64, 2, mode, device, candidates=cand or "all_rank", source_rank=1)
        for ids in (torch.zeros(0, 2, dtype=torch.long), torch.stack([torch.zeros(50, dtype=torch.long),
                                                                       torch.full((50,), -1)], 1)):
            ref, _ = _ref(pl, ids, mode, cand, 1)
            _compare(bal(ids.to(device)), ref, bal, mode, ids.shape[0])
        # the hot expert's copies: slot 0 on rank 0, slots 4 and 5 both on rank 2 -> 25 | 13 + 12
        if mode == "lplb":
            assert bal.quotas[[0, 4, 5]].tolist() == [25, 13, 12]


def test_no_replicas_is_the_static_map(device):
    rng = random.Random(5)
    pl = Placement(torch.randperm(12), 3, 12)
    ids = random_ids(rng, 30, 4, 12)
    bal = LayerBalancer(pl, 30, 4, "lplb", device)
    assert bal.static_only
    out = bal(ids.to(device))
    ref, _ = _ref(pl, ids, "lplb", None, 0)
    assert torch.equal(out.phys_ids.cpu().long(), ref.phys_ids)


def test_fused_output_matches_core(device):
    rng = random.Random(11)
    pl = random_placement(rng, min_ranks=2)
    ids = random_ids(rng, 21, 3, pl.num_logical)
    w = torch.rand(21, 3)
    bal = LayerBalancer(pl, 32, 3, "waterfill+lplb", device, candidates="conservative", source_rank=1)
    fi = torch.empty(21, 4, dtype=torch.int32, device=device)
    fw = torch.empty(21, 4, dtype=torch.float32, device=device)
    out = bal(ids.to(device), topk_weights=w.to(device), out_fused_ids=fi, out_fused_weights=fw, shared_weight=0.5)
    ref_i, ref_w = fuse_topk(out.phys_ids.cpu(), w, out.shared_rank.cpu(), pl.slots_per_rank, 0.5)
    assert torch.equal(fi.cpu().long(), ref_i.long()) and torch.equal(fw.cpu(), ref_w)


def test_update_placement_in_place(device):
    rng = random.Random(3)
    pl1 = Placement(torch.tensor([0, 1, 2, 3, 0, 1, 4, 5]), 4, 6)
    pl2 = Placement(torch.tensor([2, 1, 2, 3, 0, 5, 4, 2]), 4, 6)
    bal = LayerBalancer(pl1, 16, 2, "lplb", device, max_rows=4, max_copies=4, max_colours=4)
    ids = random_ids(rng, 16, 2, 6)
    bal.update_placement(pl2)
    ref, _ = _ref(pl2, ids, "lplb", None, 0)
    _compare(bal(ids.to(device)), ref, bal, "lplb", 16)
    with pytest.raises(ValueError):
        bal.update_placement(Placement(torch.tensor([0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 0, 0]), 4, 6))


def test_bad_inputs_raise(device):
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2, 3)
    bal = LayerBalancer(pl, 4, 2, "lplb", device)
    with pytest.raises(ValueError):
        bal(torch.zeros(5, 2, dtype=torch.long, device=device))  # more than max_tokens
    with pytest.raises(ValueError):
        bal(torch.zeros(2, 3, dtype=torch.long, device=device))  # wrong top-k
    with pytest.raises(ValueError):
        LayerBalancer(pl, 4, 2, "waterfill", device)(torch.zeros(2, 2, dtype=torch.long, device=device))
