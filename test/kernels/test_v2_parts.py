"""The v2 device functions one by one against independent oracles (Triton interpreter).

* the water level (``_level_rows``) against brute force ``min_k floor((c + k lowest) / k)``;
* the prefix certificate and integer lower bound (``_prefix_nums``) against the kernels'
  reference (``reference.certificate``) and the core (``integer_lower_bound``), at the
  half-token boundary, and at R not a power of two between 128 and 256 (the v1 key collision);
* the shared-expert quotas in float64 (``_shared_quotas_f64``) against ``waterfill.shared_quotas``.
"""

import random

import pytest
import torch
import triton
import triton.language as tl

from moe_lb_kernels.reference import certificate
from moe_lb_kernels.v2 import V2_SPEC
from moe_lb_kernels.v2.solve import _certified, _int_bound, _level_rows, _prefix_nums, _shared_quotas_f64
from moe_lb_kernels.v2.tables import V2Tables
from sglang_moe_lb import Placement
from sglang_moe_lb.quota_dispatch import integer_lower_bound
from sglang_moe_lb.waterfill import shared_quotas

from .conftest import DEVICE
from .helpers import random_placement


def _log2(n):
    return max(n.bit_length() - 1, 0)


# ---------------------------------------------------------------------------------------------
@triton.jit
def _level_probe(base_ptr, fa_ptr, c_ptr, out_ptr, NEB: tl.constexpr, CB: tl.constexpr):
    row = tl.arange(0, NEB)
    col = tl.arange(0, CB)
    ix = row[:, None] * CB + col[None, :]
    lvl = _level_rows(tl.load(base_ptr + ix), tl.load(fa_ptr + ix) != 0, tl.load(c_ptr + row), CB)
    tl.store(out_ptr + row, lvl)


def test_level_is_the_minimum_over_prefixes():
    rng = random.Random(0)
    NEB, CB = 8, 8
    for _ in range(6):
        base = torch.tensor([[rng.choice([0, 1, 5, 40, 300, 301, 9000]) + rng.randrange(3) for _ in range(CB)]
                             for _ in range(NEB)], dtype=torch.int32)
        fa = torch.tensor([[int(rng.random() < 0.7) for _ in range(CB)] for _ in range(NEB)], dtype=torch.int32)
        fa[:, 0] = 1
        c = torch.tensor([rng.choice([0, 1, 3, 50, 1000, 20000]) for _ in range(NEB)], dtype=torch.int32)
        out = torch.zeros(NEB, dtype=torch.int32, device=DEVICE)
        _level_probe[(1,)](base.to(DEVICE), fa.to(DEVICE), c.to(DEVICE), out, NEB=NEB, CB=CB)
        out = out.cpu()
        for i in range(NEB):
            bs = sorted(int(b) for b, f in zip(base[i], fa[i]) if f)
            want = min((int(c[i]) + sum(bs[:k])) // k for k in range(1, len(bs) + 1))
            assert int(out[i]) == want, (base[i].tolist(), fa[i].tolist(), int(c[i]))


# ---------------------------------------------------------------------------------------------
@triton.jit
def _prefix_probe(load_ptr, fixed_ptr, counts_ptr, rep_expert_ptr, rep_colour_ptr, rep_rank_ptr, out_ptr,
                  R: tl.constexpr, RB: tl.constexpr, RBITS: tl.constexpr, NEB: tl.constexpr, LOGNEB: tl.constexpr,
                  CB: tl.constexpr, TOL: tl.constexpr, SLACK: tl.constexpr, SCALE: tl.constexpr):
    r = tl.arange(0, RB)
    row = tl.arange(0, NEB)
    col = tl.arange(0, CB)
    rank2 = tl.load(rep_rank_ptr + row[:, None] * CB + col[None, :])
    valid = rank2 >= 0
    rowvalid = tl.load(rep_colour_ptr + row) >= 0
    crow = tl.where(rowvalid, tl.load(counts_ptr + tl.load(rep_expert_ptr + row)), 0) << SCALE
    load = tl.load(load_ptr + r, mask=r < R, other=0)
    fixed = tl.load(fixed_ptr + r, mask=r < R, other=0) << SCALE
    num = _prefix_nums(load, fixed, crow, rowvalid, tl.where(valid, rank2, 0), valid, 0, R, RB, RBITS, NEB, LOGNEB,
                       NEB * CB, False)
    tl.store(out_ptr, _certified(num, load, R, RB, TOL, SLACK).to(tl.int64))
    tl.store(out_ptr + 1, _int_bound(num, R, RB))


def _probe(pl: Placement, counts: torch.Tensor, load: torch.Tensor, scale: int) -> tuple[bool, int]:
    tb = V2Tables.build(pl.to(DEVICE))
    c_slot = counts[pl.phy2log[0]]
    fixed = pl.rank_loads(torch.where(pl.replicated_slot[0], 0, c_slot)).to(torch.int32)
    out = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    _prefix_probe[(1,)](load.to(torch.int32).to(DEVICE), fixed.to(DEVICE), counts.to(torch.int32).to(DEVICE),
                        tb.rep_expert, tb.rep_colour, tb.rep_rank, out,
                        R=tb.R, RB=tb.RB, RBITS=_log2(tb.RB), NEB=tb.NEB, LOGNEB=_log2(tb.NEB), CB=tb.CB,
                        TOL=V2_SPEC.tol_shift, SLACK=V2_SPEC.slack_units, SCALE=scale)
    return bool(out[0]), int(out[1])


def test_certificate_and_integer_bound_match_the_reference():
    rng = random.Random(1)
    seen = set()
    for i in range(40):
        pl = random_placement(rng, max_ranks=7, max_spr=4)
        counts = torch.tensor([rng.choice([0, 1, 2, 7, 30]) for _ in range(pl.num_logical)])
        # a feasible fixed-point split's loads, nudged to land near the half-token boundary
        q = torch.zeros(pl.num_physical, dtype=torch.long)
        for e in range(pl.num_logical):
            slots = (pl.phy2log[0] == e).nonzero().flatten().tolist()
            left = int(counts[e]) << 8
            for s in slots[:-1]:
                take = rng.randint(0, left)
                q[s], left = take, left - take
            q[slots[-1]] = left
        load = pl.rank_loads(q)
        want_cert = bool(certificate(pl, counts, load, V2_SPEC))
        got_cert, _ = _probe(pl, counts, load, 8)
        assert got_cert == want_cert, (i, load.tolist(), counts.tolist())
        # integer units (the polish rule's bound)
        qi = q >> 8
        qi[pl.copy_order[0][pl.copy_start[0]]] += counts - torch.zeros_like(counts).index_add_(0, pl.phy2log[0], qi)
        li = pl.rank_loads(qi)
        _, got_bound = _probe(pl, counts, li, 0)
        assert got_bound == int(integer_lower_bound(pl, counts[None], li[None])[0]), (i, li.tolist())
        seen.add(want_cert)
    assert seen == {True, False}  # both outcomes exercised


def test_certificate_half_token_boundary():
    # Expert 0 on ranks 0 and 1 with 4 tokens; rank 0 carries 2 + d/256, rank 1 the rest; no fixed load.
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2, 3)
    counts = torch.tensor([4, 0, 0])
    for d, want in ((128, True), (129, False), (256, False)):
        load = torch.tensor([(2 << 8) + d, (2 << 8) - d])
        assert bool(certificate(pl, counts, load, V2_SPEC)) == want
        assert _probe(pl, counts, load, 8)[0] == want, d


@pytest.mark.parametrize("R", [129, 200, 255])
def test_certificate_key_has_no_collision_at_any_rank_count(R):
    """v1 packed (2**54 - load) << RBITS | rank, which for load 0 equals the padding key at
    RBITS = 8: zero-load ranks then read as rank 0 and a false prefix bound certified. Here rank 0
    carries 10 tokens of a single expert plus all 1 token of expert A (copies on ranks 0 and 5),
    every other rank is empty: the gap is 1 token > half a token, so not certified."""
    S = 2
    p2l = list(range(1, 2 * R - 1))  # experts 1.. single
    p2l.insert(1, 0)  # rank 0: [1, A]
    p2l.insert(11, 0)  # rank 5's second slot: A
    pl = Placement(torch.tensor(p2l[: R * S]), R, max(p2l[: R * S]) + 1)
    counts = torch.zeros(pl.num_logical, dtype=torch.long)
    counts[1], counts[0] = 10, 1
    load = torch.zeros(R, dtype=torch.long)
    load[0] = 11 << 8
    assert not bool(certificate(pl, counts, load, V2_SPEC))
    assert _probe(pl, counts, load, 8)[0] is False
    # Integer bound (the polish rule): rank 5 carries all 100 tokens of A, rank 0 a fixed 90;
    # order 5, 0, then the empty ranks. With A's copies on ranks 0 and 5 the bound is
    # {5, 0}: (90 + 100) / 2 = 95. A key that let padded positions read as rank 0 would count its
    # 90 again at every padded position (a bound near 90 in the second case).
    counts[1], counts[0] = 90, 100
    load = torch.zeros(R, dtype=torch.long)
    load[5], load[0] = 100, 90
    want = int(integer_lower_bound(pl, counts[None], load[None])[0])
    assert _probe(pl, counts, load, 0)[1] == want == 95
    # ... and with A's other copy on an empty rank the prefix bound stays at 45.
    p2l2 = list(p2l)
    p2l2[1], p2l2[15] = p2l[15], 0  # A on ranks 5 and 7
    pl2 = Placement(torch.tensor(p2l2), R, pl.num_logical)
    want = int(integer_lower_bound(pl2, counts[None], load[None])[0])
    assert _probe(pl2, counts, load, 0)[1] == want == 45


# ---------------------------------------------------------------------------------------------
@triton.jit
def _shared_probe(routed_ptr, n, out_ptr, R: tl.constexpr, RB: tl.constexpr):
    r = tl.arange(0, RB)
    routed = tl.load(routed_ptr + r, mask=r < R, other=0)
    tl.store(out_ptr + r, _shared_quotas_f64(routed, n.to(tl.int64), R, RB))


def test_shared_quotas_match_the_core_in_float64():
    rng = random.Random(2)
    for i in range(30):
        R = rng.choice([1, 2, 3, 5, 8, 13])
        routed = torch.tensor([rng.choice([0, 1, 3, 100, 101, 5000, 123457]) for _ in range(R)], dtype=torch.long)
        n = rng.choice([0, 1, 2, 7, 33, 1000, 99991])
        RB = 1 << max(R - 1, 0).bit_length()
        out = torch.zeros(RB, dtype=torch.long, device=DEVICE)
        _shared_probe[(1,)](routed.to(DEVICE), n, out, R=R, RB=RB)
        assert torch.equal(out[:R].cpu(), shared_quotas(routed, n)), (routed.tolist(), n)
