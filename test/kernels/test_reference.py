"""The fixed-point reference against the core and HiGHS: same rounding rule, same optimum, a
valid gap (torch only; the kernels are checked against this reference elsewhere)."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("highspy")  # the core's oracle; absent on bare GPU boxes (these are CPU-only checks)

from core.oracles import lp_min_max  # noqa: E402
from core.strategies import counts_for, placements  # noqa: E402

from moe_lb_kernels.reference import (  # noqa: E402
    SCALE_BITS,
    V1_SPEC,
    FixedPointSteps,
    FixedSpec,
    bound_gap,
    reference_layer,
    split_fixed,
)
from sglang_moe_lb import BalanceMode, Placement, solve_split  # noqa: E402
from sglang_moe_lb.objective import round_fixed  # noqa: E402
from sglang_moe_lb.quota_dispatch import largest_remainder  # noqa: E402

from .helpers import random_ids, random_placement  # noqa: E402

SPEC24 = FixedSpec("test-24", max_sweeps=24, polish_at_bound=True)  # the reference always runs every sweep


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_fixed_point_rounding_is_largest_remainder(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=1000))
    qf, _, _ = split_fixed(pl, c, FixedSpec("test-3", max_sweeps=3))
    # values below 2**53 / 2**SCALE_BITS tokens are exact in float64: the core's float rounding must agree
    x = qf.to(torch.float64) / 2**SCALE_BITS
    assert torch.equal(round_fixed(pl, qf[None], c[None], SCALE_BITS)[0], largest_remainder(x, pl.phy2log[0], c))


@given(st.data())
@settings(max_examples=40, deadline=None)
def test_split_conserves_is_optimal_when_certified_and_the_gap_bounds_it(data):
    p2l, R, E = data.draw(placements(max_ranks=6, max_slots_per_rank=4))
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E))
    qf, cert, _ = split_fixed(pl, c, SPEC24)
    per_expert = torch.zeros(E, dtype=torch.long).scatter_add_(0, pl.phy2log[0], qf)
    assert torch.equal(per_expert, c << SCALE_BITS)
    assert bool((qf >= 0).all())
    load = pl.rank_loads(qf)
    got = float(load.max()) / 2**SCALE_BITS
    best = lp_min_max(p2l.tolist(), R, c.tolist())
    assert got >= best - 1e-6 * max(best, 1.0)
    if cert:
        assert got <= best * (1 + 2e-9) + 1e-6
    # max - gap is a lower bound on the optimum (the counters report a true gap)
    gap = int(bound_gap(pl, c, load, SPEC24))
    assert 0 <= gap and (int(load.max()) - gap) / 2**SCALE_BITS <= best * (1 + 1e-9) + 1e-6


@pytest.mark.parametrize("seed", range(20))
def test_quotas_close_to_core(seed):
    """Same LP value as the core's float solver; integer quotas conserve and stay within the rounding bound."""
    rng = random.Random(seed)
    pl = random_placement(rng, max_ranks=6, max_spr=5)
    c = torch.tensor([int(rng.random() ** 3 * 500) for _ in range(pl.num_logical)])
    q, cert = FixedPointSteps(SPEC24).split_round(pl, c)
    q = q[0]
    qf, _, _ = split_fixed(pl, c, SPEC24)
    assert torch.equal(torch.zeros_like(c).scatter_add_(0, pl.phy2log[0], q), c)
    lp = float(pl.rank_loads(solve_split(pl, c, "highs")).max())
    frac_max = float(pl.rank_loads(qf).max()) / 2**SCALE_BITS
    if bool(cert):
        assert frac_max == pytest.approx(lp, rel=1e-8, abs=1e-6)
    # largest remainder: < 1 token per replicated slot above the split (polish never raises the max)
    assert int(pl.rank_loads(q).max()) < frac_max + int(pl.rank_replicated_slots.max()) + 1


def test_v1_spec_is_what_the_kernels_verified():
    """The numbers the H200 run verified (docs/kernels.md): a change here is a new kernel set."""
    assert (V1_SPEC.scale_bits, V1_SPEC.max_sweeps, V1_SPEC.tol_shift, V1_SPEC.slack_units,
            V1_SPEC.polish_sweeps, V1_SPEC.polish_at_bound) == (28, 16, 30, 256, 8, True)


def test_reference_layer_takes_one_layer_of_a_multi_layer_placement():
    rng = random.Random(4)
    pl1 = random_placement(rng, min_ranks=2)
    pl = Placement(torch.stack([pl1.phy2log[0], pl1.phy2log[0]]), pl1.num_ranks, pl1.num_logical)
    ids = random_ids(rng, 12, 2, pl1.num_logical)
    mode = BalanceMode.parse("lplb/per-batch/local/tokens")
    a, b = reference_layer(pl, ids, mode), reference_layer(pl1, ids, mode)
    assert torch.equal(a.phys_ids, b.phys_ids) and torch.equal(a.quotas, b.quotas)
