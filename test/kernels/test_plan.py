"""Kernel B (split, quotas, polish) against the fixed-point reference: exact integers, same flags."""

import random

import pytest
import torch

from moe_lb_kernels.plan import plan_quotas
from moe_lb_kernels.reference import quotas_ref, split_fixed, table_quotas_ref
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
    out = plan_quotas(pl.to(device), c.to(device), shared_tokens=shared_tokens, max_sweeps=sweeps)
    if shared_tokens is None:
        q, _, cert = quotas_ref(pl, c, sweeps)
        _, _, n_sw = split_fixed(pl, c, sweeps)
        assert torch.equal(out["quotas"].cpu(), q)
    else:
        c_ext = torch.cat([c, torch.tensor([shared_tokens])])
        fpl = pl.with_shared_expert
        q, _, cert = quotas_ref(fpl, c_ext, sweeps)
        _, _, n_sw = split_fixed(fpl, c_ext, sweeps)
        q = q.reshape(pl.num_ranks, -1)
        assert torch.equal(out["quotas"].cpu(), q[:, :-1].reshape(-1))
        assert torch.equal(out["shared_q"].cpu(), q[:, -1])
    flags = out["flags"].cpu().tolist()
    assert bool(flags[0]) == cert
    if pl.has_replicas or shared_tokens is not None and pl.num_ranks > 1:
        assert flags[1] == n_sw
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


@pytest.mark.parametrize("shared", [None, 0, 17])
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
    """An instance needing many sweeps: capped, flagged uncertified, still bit-identical."""
    p2l = torch.tensor([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0])  # a ring: every expert links two ranks
    pl = Placement(p2l, 6, 6)
    c = torch.tensor([1000, 1, 1, 1, 1, 1])
    for sweeps in (1, 2, 40):
        _check(pl, c, sweeps, None, device)


def random_table(rng, pl):
    """Split fractions per copy: each expert's copies sum to 1 (float noise included)."""
    w = torch.tensor([rng.random() ** 2 for _ in range(pl.num_physical)], dtype=torch.float64)
    p2l = pl.phy2log[0]
    tot = torch.zeros(pl.num_logical, dtype=torch.float64).scatter_add_(0, p2l, w)
    return w / tot[p2l]


@pytest.mark.parametrize("seed", range(16))
def test_plan_table_matches_reference(device, seed):
    rng = random.Random(2000 + seed)
    pl = random_placement(rng)
    c = _counts(rng, pl.num_logical, ["uniform", "skewed", "hot", "zero"][seed % 4])
    f = random_table(rng, pl)
    out = plan_quotas(pl.to(device), c.to(device), split_table=f.to(device))
    assert torch.equal(out["quotas"].cpu(), table_quotas_ref(pl, f, c))
