"""CPU proof that the kernel seam is CUDA-graph safe in every mode the kernels run.

A captured CUDA graph replays the device work recorded at capture, with the addresses it saw
then. So a per-batch call must (a) allocate no tensor after warm-up (a new address would not
be replayed), (b) read placements through tensors that keep their address when a rebalance
installs new ones, and (c) never wait for the device on the host
(a host sync is illegal during capture, and a data-dependent shape cannot be replayed).

How the checks see this on a CPU:

* ``TorchOps`` (``sglang_moe_lb.testing.torch_ops``) is a ``TorchDispatchMode``: every ATen op
  the code issues passes through it. An op *allocates* when one of its outputs lives in a
  storage none of its inputs (``out=`` included) owns: views, in-place and ``out=`` ops do not.
  Triton launches are excluded: on a GPU a launch issues no torch op; under
  ``TRITON_INTERPRET=1`` the interpreter emulates device memory by copying each argument's
  storage to host tensors and back, which is the emulator's work, not the hot path's. The
  launches themselves are counted, so a path that launched nothing cannot pass.
* A *host sync* is an op tagged ``data_dependent_output`` (``_local_scalar_dense`` behind
  ``.item()``, ``int()``, ``bool()``; ``equal``) or ``dynamic_output_shape`` (``nonzero``,
  ``unique``, ``masked_select``, ``bincount``, ``repeat_interleave``, boolean-mask indexing), or a
  boolean-mask ``index_put_`` (a ``nonzero`` inside on CUDA). ``.tolist()``, ``.numpy()`` and
  ``.cpu()`` read the data without an ATen op on a CPU tensor, so they are patched to report
  too. The negative controls below show each of these is caught.
"""

import random
import zlib

import pytest
import torch

import moe_lb_kernels.balancer as balancer_mod
from moe_lb_kernels import seam
from moe_lb_kernels.reference import reference_layer
from sglang_moe_lb import BalanceMode
from sglang_moe_lb.chain import local_stats
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.testing.torch_ops import HostSync, storages
from sglang_moe_lb.testing.torch_ops import TorchOps as _TorchOps

from .helpers import batch, kernel_modes, kernel_path, random_placement, random_placement_like

MODES = kernel_modes()


def TorchOps(raise_on_sync: bool = True, launch_modules: tuple = (balancer_mod,)) -> _TorchOps:  # noqa: N802
    """The checker with the kernels' launches counted and paused in."""
    return _TorchOps(raise_on_sync=raise_on_sync, launch_modules=launch_modules)

# ------------------------------------------------------------------------------------------------
# Negative and positive controls: the checkers catch what they claim to
# ------------------------------------------------------------------------------------------------
_SYNCING = {
    "item": lambda x: x[0].item(),
    "int": lambda x: int(x[0]),
    "bool": lambda x: bool(x[0] > 0),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "cpu": lambda x: x.cpu(),
    "equal": lambda x: torch.equal(x, x),
    "nonzero": lambda x: x.nonzero(),
    "where1": lambda x: torch.where(x > 1),
    "unique": lambda x: torch.unique(x),
    "masked_select": lambda x: torch.masked_select(x, x > 1),
    "mask_index": lambda x: x[x > 1],
    "mask_put": lambda x: x.__setitem__(x > 1, 0),
    "bincount": lambda x: torch.bincount(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(x, x),
}


@pytest.mark.parametrize("name", list(_SYNCING))
def test_checker_catches_host_syncs(name):
    x = torch.arange(5)
    with pytest.raises(HostSync):
        with TorchOps():
            _SYNCING[name](x)


def test_checker_passes_sync_free_code_and_counts_allocations():
    x = torch.arange(6)
    y = torch.empty(6, dtype=torch.long)
    idx, val = torch.tensor([0, 1]), torch.tensor([5, 6])
    with TorchOps() as ops:  # views, in place, out=, integer indexing into a buffer: nothing
        x[1:3].add_(1)
        torch.add(x, 1, out=y)
        x.view(2, 3)[0]
        x.view(torch.int32)
        y.index_put_((idx,), val)
    assert ops.allocs == [] and ops.syncs == []
    with TorchOps() as ops:  # each of these makes a new tensor
        x + 1
        torch.zeros(3)
        x[idx]
        torch.sort(x)
        x.clone()
    assert len(ops.allocs) == 5 and not ops.syncs, ops.allocs


# ------------------------------------------------------------------------------------------------
# (c) the per-batch reference path has no host sync, in every mode (the tile objective too)
# ------------------------------------------------------------------------------------------------
_COST = CostModel(weight_bytes=1e6, flops_per_token=1e6, bandwidth=1e12, peak_flops=1e15, tile_tokens=4)
REF_MODES = MODES + [BalanceMode(lplb="per-batch", lplb_sync=s, objective="tiles", waterfill=w)
                     for s in ("local", "global") for w in (None, "conservative", "all_rank")]


@pytest.mark.parametrize("mode", REF_MODES, ids=str)
def test_reference_path_has_no_host_sync(mode):
    rng = random.Random(zlib.crc32(mode.name.encode()))
    pl = random_placement(rng, min_ranks=2, max_ranks=4)
    D = pl.num_ranks if mode.collective else 1
    ids, phys = batch(rng, mode, pl, D, 3, sizes=(9, 17))
    g = torch.stack([local_stats(pl, x, mode, p) for x, p in zip(ids, phys)]) if mode.collective else None
    kw = dict(source_rank=D - 1, gathered=g, phys_ids=phys[-1], cost=_COST)
    # Warm-up: the placement's derived tables (colours, fused placement) are built once per
    # placement at start-up or rebalance (host work), then cached; the per-batch path reuses them.
    want = reference_layer(pl, ids[-1], mode, **kw)
    with TorchOps() as ops:
        got = reference_layer(pl, ids[-1], mode, check=False, **kw)
    assert not ops.syncs
    assert ops.ops > 50  # the chain really ran under the checker
    assert torch.equal(got.phys_ids, want.phys_ids)  # and computed the same thing


# ------------------------------------------------------------------------------------------------
# (a) + (c) the kernel path: no allocation, no host sync per call after warm-up
# (b) rebalance installs keep every address, and the next call sees the new plan
# ------------------------------------------------------------------------------------------------
def _setup(mode, seed=0, device="cpu"):
    rng = random.Random(zlib.crc32(repr(("graph", mode.name, seed)).encode()))
    pl = random_placement(rng, min_ranks=2, max_ranks=4)
    while pl.num_logical < 3 or not pl.has_replicas:  # room for a different placement at rebalance
        pl = random_placement(rng, min_ranks=2, max_ranks=4)
    D = pl.num_ranks if mode.collective else 1
    src = D - 1
    path = kernel_path(pl, mode, max_tokens=24, topk=2, source_rank=src, device=device)
    ids, phys = batch(rng, mode, pl, D, 2, sizes=(11, 19))
    ids = [x.to(torch.int32) for x in ids]
    phys = [None if p is None else p.to(torch.int32) for p in phys]
    return rng, pl, path, src, ids, phys


def _step(path, mode, ids, phys, src, device):
    """One batch as the plugin runs it: stats -> (all-gather, here: stacked rows) -> call."""
    gathered = None
    if mode.collective:
        row = path.stats(ids[src].to(device), None if phys[src] is None else phys[src].to(device))
        others = [local_stats(path.placement, x, mode, p).to(device) for x, p in zip(ids, phys)]
        others[src] = row
        gathered = torch.stack(others)
    return path(ids[src].to(device), gathered=gathered,
                phys_ids=None if phys[src] is None else phys[src].to(device)), gathered


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_kernel_call_allocates_nothing_and_never_syncs(device, mode):
    rng, pl, path, src, ids, phys = _setup(mode, device=device)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    ids_d, phys_d = dev(ids[src]), dev(phys[src])
    _step(path, mode, ids, phys, src, device)  # warm-up: compiles, makes the int32 phys buffer
    gathered = None
    if mode.collective:  # the all-gather's output buffer exists before the call (SGLang's)
        gathered = torch.stack([local_stats(pl, x, mode, p) for x, p in zip(ids, phys)]).to(device)
    own = storages(path.buffers(), set())
    with TorchOps() as ops:
        if mode.collective:
            row = path.stats(ids_d, phys_d)
        res = path(ids_d, gathered=gathered, phys_ids=phys_d)
    assert not ops.allocs, ops.allocs
    assert not ops.syncs
    assert ops.launches >= 3 + (1 if mode.collective else 0)
    # every output is a view of a buffer the path allocated at build / warm-up (or the caller's input)
    outs = [res.phys_ids, res.shared_rank, res.quotas, res.certified] + ([row] if mode.collective else [])
    allowed = own | storages([phys_d], set())
    assert storages(outs, set()) <= allowed
    want = reference_layer(pl, ids[src], mode, source_rank=src, gathered=None if gathered is None else gathered.cpu(),
                           phys_ids=phys[src])
    assert torch.equal(res.phys_ids.cpu().long(), want.phys_ids.long())


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_rebalance_keeps_addresses(device, mode):
    rng, pl, path, src, ids, phys = _setup(mode, seed=1, device=device)
    _step(path, mode, ids, phys, src, device)
    before = {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in path.buffers().items()}
    tb = path.balancer.tables
    pl2 = random_placement_like(rng, pl, fits=tb.fits)
    path.update_placement(pl2)
    after = {k: (v.data_ptr(), tuple(v.shape), v.dtype) for k, v in path.buffers().items()}
    assert after == before
    # the new placement took effect: the next call is the reference for pl2
    ids, phys = batch(rng, mode, pl2, len(ids), 2, sizes=(11, 19))
    ids = [x.to(torch.int32) for x in ids]
    phys = [None if p is None else p.to(torch.int32) for p in phys]
    res, gathered = _step(path, mode, ids, phys, src, device)
    want = reference_layer(pl2, ids[src], mode, source_rank=src, gathered=None if gathered is None else gathered.cpu(),
                           phys_ids=phys[src])
    assert torch.equal(res.phys_ids.cpu().long(), want.phys_ids.long())
    if want.quotas is not None:
        assert torch.equal(res.quotas.cpu(), want.quotas)
    if want.shared_rank is not None:
        assert torch.equal(res.shared_rank.cpu(), want.shared_rank)
    assert {k: v.data_ptr() for k, v in path.buffers().items()} == {k: v[0] for k, v in before.items()}


def test_graph_safe_promise_matches_the_checks():
    """What the plugin's start-up check reads: the promise, and a reason for every refusal."""
    assert seam.CUDA_GRAPH_SAFE is True
    for mode in MODES:
        assert seam.supports(mode) == (True, "")
    ok, why = seam.supports(BalanceMode(lplb="per-batch", lplb_sync="local", objective="tiles"))
    assert not ok and why
