"""The kernel seam (``moe_lb_kernels.seam``) against the core chain, in every mode the kernels run.

* bit for bit against ``reference_layer`` (the core chain with the kernels' fixed-point steps),
  local sync on one rank and global sync on D ranks (each rank's ``stats`` row is the core's
  ``local_stats``; the rows are stacked as the all-gather would; the union of every rank's
  physical ids meets the global quotas exactly);
* Waterfill alone has no per-batch solve: bit for bit against the core's float path
  (``chain.balance_layer`` with ``FLOAT_STEPS``), what the CPU serves;
* every other mode (plans, the tile objective, gated modes) is refused with a reason.
"""

import inspect
import random
import zlib

import pytest
import torch

from moe_lb_kernels import seam
from moe_lb_kernels.reference import reference_layer
from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import balance_layer, local_stats
from sglang_moe_lb.objective import FLOAT_STEPS

from .helpers import batch, kernel_modes, kernel_path, random_placement

MODES = kernel_modes()
NO_SOLVE = [m for m in MODES if not m.per_batch]  # Waterfill alone


def _assert_same(got, ref, what=""):
    assert torch.equal(got.phys_ids.long(), ref.phys_ids.long()), f"phys_ids {what}"
    assert (got.shared_rank is None) == (ref.shared_rank is None), what
    if ref.shared_rank is not None:
        assert torch.equal(got.shared_rank, ref.shared_rank), f"shared_rank {what}"
    assert (got.quotas is None) == (ref.quotas is None), what
    if ref.quotas is not None:
        assert torch.equal(got.quotas, ref.quotas), f"quotas {what}"
    assert bool(got.certified) == bool(ref.certified), f"certified {what}"


def _run_ranks(pl, mode, ids, phys, device, K):
    """Every source rank's path: (dispatch per rank, gathered rows or None)."""
    D = len(ids)
    paths = [kernel_path(pl, mode, max_tokens=24, topk=K, source_rank=d, device=device) for d in range(D)]
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    gathered = None
    if mode.collective:
        rows = []
        for d in range(D):
            row = paths[d].stats(dev(ids[d]), dev(phys[d])).clone()
            assert row.dtype == torch.int32
            assert torch.equal(row.cpu(), local_stats(pl, ids[d], mode, phys[d]))
            rows.append(row)
        gathered = torch.stack(rows)
    outs = [paths[d](dev(ids[d]), gathered=gathered, phys_ids=dev(phys[d])) for d in range(D)]
    return outs, None if gathered is None else gathered.cpu()


def _cpu(res):
    return type(res)(res.phys_ids.cpu(), None if res.shared_rank is None else res.shared_rank.cpu(),
                     None if res.quotas is None else res.quotas.cpu(), res.certified.cpu())


@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_seam_matches_reference(device, mode, seed):
    rng = random.Random(zlib.crc32(repr((mode.name, seed)).encode()))
    pl = random_placement(rng, min_ranks=2 if mode.collective else 1, max_ranks=4)
    K = rng.choice([1, 2, 3])
    D = rng.randint(1, pl.num_ranks) if mode.collective else 1
    ids, phys = batch(rng, mode, pl, D, K)
    if mode.collective and seed == 0:
        ids = [x.to(torch.int32) for x in ids]  # SGLang's dtype
        phys = [None if x is None else x.to(torch.int32) for x in phys]
    src0 = 0 if mode.collective else rng.randrange(pl.num_ranks)
    outs, gathered = _run_ranks(pl, mode, ids, phys, device, K) if mode.collective else (None, None)
    if not mode.collective:
        path = kernel_path(pl, mode, max_tokens=24, topk=K, source_rank=src0, device=device)
        outs = [path(ids[0].to(device), phys_ids=None if phys[0] is None else phys[0].to(device))]
    union = torch.zeros(pl.num_physical, dtype=torch.long)
    for d, out in enumerate(outs):
        out = _cpu(out)
        assert out.phys_ids.dtype == ids[d].dtype
        ref = reference_layer(pl, ids[d], mode, source_rank=d if mode.collective else src0, gathered=gathered,
                              phys_ids=phys[d])
        _assert_same(out, ref, f"rank {d}")
        p = out.phys_ids.reshape(-1).long()
        union += torch.bincount(p[p >= 0], minlength=pl.num_physical)
    if mode.lplb != "off":
        # global sync: all ranks hold the same global quotas and together meet them exactly;
        # local sync: this rank's tokens meet its own quotas
        assert all(torch.equal(o.quotas.cpu(), outs[0].quotas.cpu()) for o in outs)
        assert torch.equal(union, outs[0].quotas.cpu())


@pytest.mark.parametrize("mode", NO_SOLVE, ids=str)
def test_seam_matches_core_float_path(device, mode):
    """No per-batch solve: the kernels equal what the CPU path serves, bit for bit."""
    rng = random.Random(zlib.crc32(repr(("float", mode.name)).encode()))
    for _ in range(2):
        pl = random_placement(rng, min_ranks=2, max_ranks=4)
        K = rng.choice([2, 3])
        D = pl.num_ranks if mode.collective else 1
        ids, phys = batch(rng, mode, pl, D, K, sizes=(5, 17))
        outs, gathered = _run_ranks(pl, mode, ids, phys, device, K)
        for d, out in enumerate(outs):
            ref = balance_layer(pl, ids[d], mode, source_rank=d, gathered=gathered, phys_ids=phys[d],
                                steps=FLOAT_STEPS)
            _assert_same(_cpu(out), ref, f"rank {d}")


def test_modes_outside_the_kernels_are_refused_with_a_reason():
    """Exactly the kernel modes run; every other ungated mode is refused with its reason: a plan
    (one gather, no kernel), the tile objective; and a gated mode names its opened form."""
    from sglang_moe_lb.mode import every_mode

    for mode in every_mode():
        ok, why = seam.supports(mode)
        assert ok == (mode in MODES) and (why == "") == ok, mode.name
        if mode.gate:
            assert "gated" in why and mode.opened.name in why, why
        elif mode.plan:
            assert why.endswith("a plan is one gather (sglang_moe_lb.plan.apply_plan); it runs no kernel"), why
        elif not ok:
            assert mode.objective == "tiles" and "token objective" in why, why
    assert len(MODES) == 10
    assert not seam.supports(BalanceMode())[0]  # off: nothing to balance
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2, 3)
    for mode in (BalanceMode(lplb="plan"), BalanceMode(lplb="per-batch", lplb_sync="global", objective="tiles")):
        with pytest.raises(ValueError, match=r"runs no kernel|tiles"):
            kernel_path(pl, mode, max_tokens=4, topk=1, source_rank=0, device="cpu")


def test_the_server_defaults_open_onto_the_kernels():
    """Where the gate of a ``--moe-lb FLAG`` default opens, its per-batch work must run on the
    kernels, else a GPU server with the default flags would fall back to the core path and
    refuse CUDA graphs."""
    for flag in ("lplb", "waterfill", "waterfill+lplb"):
        mode = BalanceMode.from_flag(flag).opened
        assert seam.supports(mode) == (True, ""), mode.name


def test_version_attributes():
    assert seam.KERNELS_VERSION == "v1.1"
    assert seam.CUDA_GRAPH_SAFE is True
    assert "H200, 2026-11-27" in seam.VERIFIED_ON and "v1.1" in seam.VERIFIED_ON
    assert seam.KernelLayerPath.version == seam.KERNELS_VERSION


def test_the_kernel_path_implements_the_core_contract(device):
    """``KernelLayerPath`` is a ``layer_path.LayerPath`` built like the core's (same constructor),
    and ``contract_problems`` tells a class that is not one."""
    from sglang_moe_lb.layer_path import CoreLayerPath, LayerPath, contract_problems

    assert contract_problems(seam.KernelLayerPath) == []
    core, kern = inspect.signature(CoreLayerPath).parameters, inspect.signature(seam.KernelLayerPath).parameters
    assert [(n, p.kind) for n, p in kern.items()] == [(n, p.kind) for n, p in core.items()]
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2, 3)
    path = kernel_path(pl, BalanceMode(lplb="per-batch", lplb_sync="local"), max_tokens=4, topk=1, source_rank=0,
                       device=device)
    assert isinstance(path, seam.KernelLayerPath) and isinstance(path, LayerPath)

    class NoCounters:
        def __init__(self, pl, mode, *, max_tokens, topk, source_rank, device):
            pass

        def stats(self, topk_ids, phys_ids=None): ...

        def __call__(self, topk_ids, *, gathered=None, phys_ids=None): ...

        def update_placement(self, pl): ...

    assert contract_problems(NoCounters) == ["no method counters", "the constructor lacks the keyword-only cost"]


def test_bad_calls_and_updates_raise(device):
    pl = Placement(torch.tensor([0, 1, 0, 2, 1, 3]), 3, 4)
    glob = BalanceMode(lplb="per-batch", lplb_sync="global", objective="tokens")
    loc = BalanceMode(lplb="per-batch", lplb_sync="local", objective="tokens")
    path = kernel_path(pl, glob, max_tokens=8, topk=2, source_rank=1, device=device)
    ids = torch.zeros(4, 2, dtype=torch.long, device=device)
    row = path.stats(ids)
    with pytest.raises(ValueError, match="int32"):
        path(ids, gathered=torch.stack([row, row]).long())  # the old int64 rows
    with pytest.raises(ValueError, match="gathered"):
        path(ids)  # global sync needs the rows
    with pytest.raises(ValueError, match="max_tokens"):
        path(torch.zeros(9, 2, dtype=torch.long, device=device), gathered=torch.stack([row, row]))
    local = kernel_path(pl, loc, max_tokens=8, topk=2, source_rank=0, device=device)
    with pytest.raises(ValueError, match="no collective"):
        local.stats(ids)
    with pytest.raises(ValueError, match="built for"):
        local.update_placement(Placement(torch.tensor([0, 1, 0, 2, 1, 3, 0, 2]), 4, 4))
    with pytest.raises(ValueError, match="holds"):  # a copy count beyond the built capacity
        local.update_placement(Placement(torch.tensor([0, 0, 0, 1, 2, 3]), 3, 4))
    with pytest.raises(ValueError, match="single-layer"):
        kernel_path(Placement(torch.tensor([[0, 1, 0, 2]] * 2), 2, 3), loc, max_tokens=4, topk=1,
                             source_rank=0, device=device)
