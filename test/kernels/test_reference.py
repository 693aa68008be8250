"""The fixed-point reference against the core: same block step, same rounding, same optimum."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("highspy")  # the core's oracle; absent on bare GPU boxes (these are CPU-only checks)

from core.oracles import lp_min_max  # noqa: E402
from core.strategies import counts_for, placements
from moe_lb_kernels.reference import (
    SCALE_BITS,
    int_block_step,
    largest_remainder_fixed,
    quotas_ref,
    split_fixed,
    table_split_fixed,
)
from sglang_moe_lb import Placement, fractions_to_split, integer_quotas, solve_split
from sglang_moe_lb.quota_dispatch import _integer_block_step, largest_remainder

from .helpers import random_placement


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_int_block_step_is_the_cores(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E)).reshape(1, -1)
    q = integer_quotas(pl, solve_split(pl, c[0]), c[0], polish_sweeps=0).reshape(1, -1)
    for colour in pl.replica_blocks.colours:
        a_q = torch.cat([q.reshape(-1), q.new_zeros(1)])
        a_l = torch.cat([pl.rank_loads(q).reshape(-1), q.new_zeros(1)])
        b_q, b_l = a_q.clone(), a_l.clone()
        c_blk = c[colour[0], colour[1]]
        _integer_block_step(a_q, a_l, c_blk, colour)
        int_block_step(b_q, b_l, c_blk, colour)
        assert torch.equal(a_q, b_q) and torch.equal(a_l, b_l)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_fixed_point_rounding_is_largest_remainder(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E, max_count=1000))
    qf, _, _ = split_fixed(pl, c, 3)
    # values below 2**53 / 2**SCALE_BITS tokens are exact in float64: the core's rounding must agree
    x = qf.to(torch.float64) / 2**SCALE_BITS
    assert torch.equal(largest_remainder_fixed(pl, qf, c), largest_remainder(x, pl.phy2log[0], c))


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_split_conserves_and_is_optimal_when_certified(data):
    p2l, R, E = data.draw(placements())
    pl = Placement(p2l, R, E)
    c = data.draw(counts_for(E))
    qf, cert, _ = split_fixed(pl, c, 50)
    per_expert = torch.zeros(E, dtype=torch.long).scatter_add_(0, pl.phy2log[0], qf)
    assert torch.equal(per_expert, c << SCALE_BITS)
    assert bool((qf >= 0).all())
    got = float(pl.rank_loads(qf).max()) / 2**SCALE_BITS
    best = lp_min_max(p2l.tolist(), R, c.tolist())
    assert got >= best - 1e-6 * max(best, 1.0)
    if cert:
        assert got <= best * (1 + 2e-9) + 1e-6


@pytest.mark.parametrize("seed", range(30))
def test_quotas_close_to_core(seed):
    """Same LP value as the core's float solver; integer quotas conserve and stay within the rounding bound."""
    rng = random.Random(seed)
    pl = random_placement(rng, max_ranks=6, max_spr=5)
    c = torch.tensor([int(rng.random() ** 3 * 500) for _ in range(pl.num_logical)])
    q, qf, cert = quotas_ref(pl, c, 50)
    assert torch.equal(torch.zeros_like(c).scatter_add_(0, pl.phy2log[0], q), c)
    lp = float(pl.rank_loads(solve_split(pl, c, "highs")).max())
    frac_max = float(pl.rank_loads(qf).max()) / 2**SCALE_BITS
    if cert:
        assert frac_max == pytest.approx(lp, rel=1e-8, abs=1e-6)
    # largest remainder: < 1 token per replicated slot above the split (polish never raises the max)
    assert int(pl.rank_loads(q).max()) < frac_max + int(pl.rank_replicated_slots.max()) + 1


@pytest.mark.parametrize("seed", range(30))
def test_table_split_close_to_core(seed):
    from .test_plan import random_table

    rng = random.Random(seed)
    pl = random_placement(rng, max_ranks=6, max_spr=5)
    c = torch.tensor([int(rng.random() ** 3 * 5000) for _ in range(pl.num_logical)])
    f = random_table(rng, pl)
    qf = table_split_fixed(pl, f, c)
    assert torch.equal(torch.zeros_like(c).scatter_add_(0, pl.phy2log[0], qf), c << SCALE_BITS)
    x = fractions_to_split(pl, f, c)
    assert torch.allclose(qf.to(torch.float64) / 2**SCALE_BITS, x, rtol=0, atol=1e-7)
