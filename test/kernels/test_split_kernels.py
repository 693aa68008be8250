"""Kernel B (split, quotas, polish) against the fixed-point reference: exact
integers, same flags, same counters; and the certificate's rank order at R in 129..255."""

import random

import pytest
import torch
import triton
import triton.language as tl

from moe_lb_kernels.reference import SCALE_BITS, FixedPointSteps, FixedSpec, bound_gap, split_fixed
from moe_lb_kernels.split_kernels import _rank_keys, split_quotas
from sglang_moe_lb import Placement

from .helpers import random_placement


def _counts(rng, E, kind):
    if kind == "uniform":
        return torch.tensor([rng.randrange(60) for _ in range(E)])
    if kind == "skewed":
        return torch.tensor([int(rng.random() ** 3 * 300) for _ in range(E)])
    if kind == "hot":
        c = torch.zeros(E, dtype=torch.long)
        c[rng.randrange(E)] = rng.randint(1, 900)
        return c
    return torch.zeros(E, dtype=torch.long)


def _check(pl, c, sweeps, shared_tokens, device):
    out = split_quotas(pl.to(device), c.to(device), shared_tokens=shared_tokens, max_sweeps=sweeps)
    spec = FixedSpec("test", max_sweeps=sweeps, polish_at_bound=True)  # v1's rule: polish every layer
    fpl, c_ext = pl, c
    if shared_tokens is not None:
        fpl, c_ext = pl.with_shared_expert, torch.cat([c, torch.tensor([shared_tokens])])
    q, cert = FixedPointSteps(spec).split_round(fpl, c_ext)
    qf, _, n_sw = split_fixed(fpl, c_ext, spec)
    if shared_tokens is None:
        assert torch.equal(out["quotas"].cpu(), q[0])
    else:
        q = q[0].reshape(pl.num_ranks, -1)
        assert torch.equal(out["quotas"].cpu(), q[:, :-1].reshape(-1))
        assert torch.equal(out["shared_q"].cpu(), q[:, -1])
    flags = out["flags"].cpu().tolist()
    assert bool(flags[0]) == bool(cert)
    if pl.has_replicas or shared_tokens is not None and pl.num_ranks > 1:
        assert flags[1] == int(n_sw)
    # counters: one call, one solve, uncertified iff not certified, the sweeps, the gap
    gap = int(bound_gap(fpl, c_ext, fpl.rank_loads(qf), spec))
    assert gap >= 0
    assert out["wf"][2:8].cpu().tolist() == [1, 1, int(not cert), flags[1], gap, int(gap >= 1 << SCALE_BITS)]
    assert int(out["acc_after"].abs().sum()) == 0  # accumulators cleaned for the next call
    assert torch.equal(out["counts"].cpu(), c)


@pytest.mark.parametrize("seed", range(36))
def test_plan_matches_reference(device, seed):
    rng = random.Random(1000 + seed)
    pl = random_placement(rng)
    kind = ["uniform", "skewed", "hot", "zero"][seed % 4]
    c = _counts(rng, pl.num_logical, kind)
    sweeps = [0, 1, 2, 8][(seed // 4) % 4]
    shared = rng.randint(0, 80) if seed % 3 == 0 else None
    _check(pl, c, sweeps, shared, device)


@pytest.mark.parametrize("shared", [None, 17])
def test_plan_edge_cases(device, shared):
    # no replicas; one rank; all tokens on one replicated expert; empty batch
    cases = [
        (Placement(torch.randperm(8), 4, 8), torch.randint(0, 50, (8,))),
        (Placement(torch.tensor([0, 1, 0, 2]), 1, 3), torch.tensor([5, 0, 7])),
        (Placement(torch.tensor([0, 1, 0, 2, 0, 3]), 3, 4), torch.tensor([1000, 0, 0, 0])),
        (Placement(torch.tensor([0, 1, 0, 2, 0, 3]), 3, 4), torch.zeros(4, dtype=torch.long)),
        # three copies of expert 0 on rank 0, two on rank 1, one on rank 2 (same-rank copies share evenly)
        (Placement(torch.tensor([0, 0, 0, 1, 0, 0, 2, 3, 0, 4, 1, 2]), 3, 5), torch.tensor([1001, 7, 30, 2, 9])),
    ]
    for pl, c in cases:
        _check(pl, c, 8, shared, device)


def test_plan_slow_instance_flags_uncertified(device):
    """An instance needing 14 sweeps to certify: capped, flagged uncertified (and counted), still bit-identical."""
    p2l = torch.tensor([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0])  # a ring: every expert links two ranks
    pl = Placement(p2l, 6, 6)
    c = torch.tensor([1, 1000, 1000, 1, 5, 1000])
    for sweeps in (1, 2, 40):
        _check(pl, c, sweeps, None, device)
    out = split_quotas(pl.to(device), c.to(device), max_sweeps=1)
    assert int(out["flags"][0]) == 0 and int(out["wf"][4]) == 1 and int(out["wf"][6]) > 0


# ------------------------------------------------------------------------------------------------
# The certificate's rank order (the key collision at R in 129..255)
# ------------------------------------------------------------------------------------------------
@triton.jit
def _rank_order_probe(load_ptr, out_ptr, R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr):
    r = tl.arange(0, RB)
    load = tl.load(load_ptr + r, mask=r < R, other=0)
    sk = tl.sort(_rank_keys(load, R, RB, RBITS), dim=0)
    tl.store(out_ptr + r, tl.where(sk < (1 << 62), sk & (RB - 1), -1))  # -1: a padding lane


@pytest.mark.parametrize("R", [5, 130, 255])
def test_certificate_rank_order_with_idle_ranks(device, R):
    """``_certify`` walks the ranks in the order "load desc, rank asc" decoded from sorted keys,
    padding lanes last. With R in 129..255 (RB = 256, RBITS = 8) the old key of an idle rank,
    ``(2**54 - 0) << 8 | rank``, sorted *behind* the padding lanes, so the prefixes took padding
    (decoded as rank 0, counted again) for idle ranks; the kernel's certificate then disagreed
    with ``reference.certificate``. Checked directly on the key construction the kernel uses:
    running the whole split kernel at R >= 129 in the interpreter would take minutes, and a wrong
    certificate needs loads near the 2**53 limit to show in the quotas."""
    RB = triton.next_power_of_2(R)
    gen = torch.Generator().manual_seed(R)
    load = torch.randint(0, 4, (R,), generator=gen) * (1 << 40)  # many idle ranks, many ties
    load[torch.randint(R, (1,), generator=gen)] = (1 << 53) - 1  # the documented maximum
    out = torch.empty(RB, dtype=torch.int64, device=device)
    _rank_order_probe[(1,)](load.to(device), out, R=R, RB=RB, RBITS=max(RB.bit_length() - 1, 1))
    want = sorted(range(R), key=lambda r: (-int(load[r]), r))
    assert out.cpu().tolist() == want + [-1] * (RB - R)
