"""CPU proof that the v2 layer path is CUDA-graph safe in every mode (the tile objective too).

The same checks as test_graph_safety.py (its ``TorchOps``: every ATen op outside a kernel
launch is seen; an op allocates when an output owns a storage no input owns; host syncs are
data-dependent ops and ``tolist``/``numpy``/``cpu``), applied to ``moe_lb_kernels.v2``:
(a) a call after warm-up allocates nothing and every output is a view of the path's own
buffers, (c) it never syncs, (b) a rebalance (new placement, new split table) keeps every
address and the next call computes the new plan. Plus the registry's view of v2.
"""

import random
import zlib

import pytest
import torch

import moe_lb_kernels.balancer as balancer_mod
import moe_lb_kernels.v2.seam as v2seam
from moe_lb_kernels import seam
from moe_lb_kernels.reference import reference_layer
from moe_lb_kernels.v2 import V2_SPEC, make_layer_path
from sglang_moe_lb import BalanceMode
from sglang_moe_lb.chain import local_stats
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.mode import every_mode

from .conftest import DEVICE
from .helpers import batch, random_placement, random_placement_like, random_table
from .test_graph_safety import TorchOps, _storages

MODES = every_mode(gates=(False,))  # every mode v2 runs: 21
COST = CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1.0, peak_flops=1.0, tile_tokens=12)


def V2Ops() -> TorchOps:
    """``TorchOps`` that also pauses inside the v2 launches (and counts them)."""
    return TorchOps(launch_modules=(v2seam, balancer_mod))


def _setup(mode, seed):
    rng = random.Random(zlib.crc32(repr(("v2 graph", mode.name, seed)).encode()))
    pl = random_placement(rng, min_ranks=2, max_ranks=4)
    while pl.num_logical < 3 or not pl.has_replicas:
        pl = random_placement(rng, min_ranks=2, max_ranks=4)
    D = pl.num_ranks if mode.collective else 1
    table = random_table(rng, pl) if mode.lplb == "table" else None
    # block 8 + single_max 0: several programs, the two-launch path (the one-launch path is the
    # same code with the counting folded in; test_v2_exact covers both)
    path = make_layer_path(pl, mode, max_tokens=24, topk=2, source_rank=D - 1, device=DEVICE, cost=COST,
                           split_table=table, block=8, single_max=0)
    ids, phys = batch(rng, mode, pl, D, 2, sizes=(11, 19))
    ids = [x.to(torch.int32) for x in ids]
    phys = [None if p is None else p.to(torch.int32) for p in phys]
    return rng, pl, path, D - 1, table, ids, phys


def _d(t):
    return None if t is None else t.to(DEVICE)


def _gathered(path, mode, ids, phys):
    return torch.stack([local_stats(path.placement, x, mode, p) for x, p in zip(ids, phys)]) if mode.collective else None


def _ref(pl, ids, phys, src, mode, table, gathered):
    return reference_layer(pl, ids[src], mode, spec=V2_SPEC, source_rank=src, split_table=table, gathered=gathered,
                           phys_ids=phys[src], cost=COST)


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_v2_call_allocates_nothing_never_syncs_and_keeps_addresses(mode):
    rng, pl, path, src, table, ids, phys = _setup(mode, 0)
    gathered = _gathered(path, mode, ids, phys)
    ids_d, phys_d, g_d = _d(ids[src]), _d(phys[src]), _d(gathered)
    if mode.collective:
        path.stats(ids_d, phys_d)
    path(ids_d, gathered=g_d, phys_ids=phys_d)  # warm-up
    own = _storages(path.buffers(), set())
    with V2Ops() as ops:
        row = path.stats(ids_d, phys_d) if mode.collective else None
        res = path(ids_d, gathered=g_d, phys_ids=phys_d)
    assert not ops.allocs, ops.allocs
    assert not ops.syncs
    assert ops.launches >= 1 + (2 if mode.collective else 1) + (2 if mode.waterfill == "conservative" else 0)
    outs = [res.phys_ids, res.shared_rank, res.quotas, res.certified] + ([row] if row is not None else [])
    assert _storages(outs, set()) <= own | _storages([phys_d], set())
    want = _ref(pl, ids, phys, src, mode, table, gathered)
    assert torch.equal(res.phys_ids.cpu().long(), want.phys_ids.long())

    # (b) rebalance: new placement (and table) in place; the next call follows them
    before = {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in path.buffers().items()}
    pl2 = random_placement_like(rng, pl, fits=lambda p: path.tables.fits(p.to(DEVICE)) is None)
    path.update_placement(pl2)
    table2 = None
    if mode.lplb == "table":
        table2 = random_table(rng, pl2)
        path.set_split_table(table2)
    assert {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in path.buffers().items()} == before
    ids2, phys2 = batch(rng, mode, pl2, len(ids), 2, sizes=(11, 19))
    ids2 = [x.to(torch.int32) for x in ids2]
    phys2 = [None if p is None else p.to(torch.int32) for p in phys2]
    g2 = _gathered(path, mode, ids2, phys2)
    if mode.collective:
        path.stats(_d(ids2[src]), _d(phys2[src]))
    res = path(_d(ids2[src]), gathered=_d(g2), phys_ids=_d(phys2[src]))
    want = _ref(pl2, ids2, phys2, src, mode, table2, g2)
    assert torch.equal(res.phys_ids.cpu().long(), want.phys_ids.long())
    if want.quotas is not None:
        assert torch.equal(res.quotas.cpu(), want.quotas)
    if want.shared_rank is not None:
        assert torch.equal(res.shared_rank.cpu(), want.shared_rank)


def test_v2_in_the_registry():
    mod = seam.kernel_set("v2")
    assert mod.KERNELS_VERSION == "v2" and mod.CUDA_GRAPH_SAFE is True
    assert "v2" not in seam.VERIFIED_VERSIONS and seam.DEFAULT_SET != "v2"  # only a GPU run can promote it
    for mode in MODES:
        assert mod.supports(mode) == (True, "")
    ok, why = mod.supports(BalanceMode())
    assert not ok and why
