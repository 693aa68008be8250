"""Dispatch plans (plan.py) against independent oracles: exact binomial costs, brute force over
every weighting, HiGHS; and the map, the hash and the gather they are applied with."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_moe_lb import CostModel, Placement
from sglang_moe_lb import plan as P

from .strategies import placements

# 10 µs per weight read, 4 µs per tile of 8 tokens: compute passes reads from 3 tiles per copy.
CM = CostModel(weight_bytes=44e6, flops_per_token=1e6, bandwidth=4.4e12, peak_flops=2e12, tile_tokens=8)
READ, TILE_US = CM.weight_read_us, CM.tile_us


def _binom_pmf(n: int, p: float) -> list[float]:
    return [math.comb(n, x) * p**x * (1 - p) ** (n - x) for x in range(n + 1)]


def _exact_costs(pi: float, N: int, w: int, W: int, tile: int) -> tuple[float, float]:
    """P(active) and E[ceil(X / tile)] of X ~ Binomial(N, pi w / W), by summing the pmf."""
    pmf = _binom_pmf(N, min(1.0, pi * w / W))
    return 1.0 - pmf[0], sum(q * math.ceil(x / tile) for x, q in enumerate(pmf))


@pytest.mark.parametrize("N", [1, 5, 8, 40, 200])
@pytest.mark.parametrize("pi", [0.0, 0.03, 0.4, 1.0])
def test_copy_costs_against_the_binomial_pmf(N, pi):
    act, til = P.copy_costs(np.array([pi]), np.array([N]), 8, 8)
    for w in range(9):
        a, t = _exact_costs(pi, N, w, 8, 8)
        assert act[0, 0, w] == pytest.approx(a, rel=1e-12, abs=1e-12)
        # exact where a copy cannot pass one tile; below a quarter tile of mean, off by the chance of a
        # second tile (which the oracle computes); above, the normal tail is within 5% of a tile
        past_one = sum(q * (math.ceil(x / 8) - 1) for x, q in enumerate(_binom_pmf(N, min(1.0, pi * w / 8))) if x > 8)
        tol = 1e-12 + past_one if (N <= 8 or N * pi * w / 8 <= 2) else 0.05 * max(1.0, t)
        assert til[0, 0, w] == pytest.approx(t, abs=tol)


def test_window_shares_and_errors():
    w = torch.tensor([[[3, 1, 0], [0, 0, 0]], [[1, 1, 2], [0, 0, 0]]])
    s = P.window_shares(w, 2, 3)
    assert s[0].tolist() == [0.5, 0.25, 0.25]
    assert s[1].tolist() == pytest.approx([1 / 3] * 3)  # a layer with no entries: uniform
    with pytest.raises(P.PlanError, match="window must be"):
        P.window_shares(torch.ones(2, 3), 3, 3)
    with pytest.raises(P.PlanError, match="finite and >= 0"):
        P.window_shares(torch.tensor([[1.0, -1.0]]), 1, 2)
    with pytest.raises(P.PlanError, match="window must be a torch.Tensor"):
        P.window_shares([[1, 2]], 1, 2)


def test_argument_errors():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    s = torch.tensor([0.5, 0.5])
    with pytest.raises(P.PlanError, match="power of two"):
        P.solve_layer_plan(pl, s, CM, top_k=1, hash_slots=12)
    with pytest.raises(P.PlanError, match="levels must be increasing"):
        P.solve_layer_plan(pl, s, CM, top_k=1, levels=(4, 2))
    with pytest.raises(P.PlanError, match="top_k must be"):
        P.solve_layer_plan(pl, s, CM, top_k=3)
    with pytest.raises(P.PlanError, match="milp solves the max objective"):
        P.solve_layer_plan(pl, s, CM, top_k=1, method="milp")
    with pytest.raises(P.PlanError, match="shares must be"):
        P.solve_layer_plan(pl, torch.tensor([0.5, float("nan")]), CM, top_k=1)


def _weightings(W: int, m: int):
    """Every way to give W hash slots to m copies."""
    for cut in itertools.product(range(W + 1), repeat=m - 1):
        if sum(cut) <= W:
            yield list(cut) + [W - sum(cut)]


def _brute_min_max(p2l: list[int], R: int, shares: list[float], k: int, N: int, W: int, costs) -> float:
    """The best ``max_r t_r`` over every plan, with ``costs(e, w) -> (activation, tiles)``."""
    S = len(p2l) // R
    copies: dict[int, list[int]] = {}
    for p, e in enumerate(p2l):
        copies.setdefault(e, []).append(p)
    rep = [e for e in sorted(copies) if len(copies[e]) > 1]
    fixed_a, fixed_t = [0.0] * R, [0.0] * R
    for e, slots in copies.items():
        if len(slots) == 1:
            a, t = costs(e, W)
            fixed_a[slots[0] // S] += a
            fixed_t[slots[0] // S] += t
    best = math.inf
    for choice in itertools.product(*[list(_weightings(W, len(copies[e]))) for e in rep]):
        A, T = list(fixed_a), list(fixed_t)
        for e, ws in zip(rep, choice):
            for p, w in zip(copies[e], ws):
                a, t = costs(e, w)
                A[p // S] += a
                T[p // S] += t
        best = min(best, max(max(READ * a, TILE_US * t) for a, t in zip(A, T)))
    return best


def _small_case(rng: random.Random):
    """2-3 ranks, 2-3 slots each, at most 3 replicated experts (brute force stays small)."""
    while True:
        R, S = rng.choice([(2, 2), (2, 3), (3, 2), (3, 3)])
        P_ = R * S
        E = rng.randint(max(1, P_ - 3), P_ - 1)
        p2l = list(range(E)) + [rng.randrange(E) for _ in range(P_ - E)]
        rng.shuffle(p2l)
        shares = [rng.random() ** 2 + 0.01 for _ in range(E)]
        tot = sum(shares)
        return p2l, R, E, [s / tot for s in shares]


@pytest.mark.parametrize("seed", range(12))
def test_decode_plans_against_brute_force_with_independent_costs(seed):
    """N <= tile: a copy's tiles equal its activation, both exact binomials computed here."""
    rng = random.Random(seed)
    p2l, R, E, shares = _small_case(rng)
    k, W = min(2, E), 4
    pl = Placement(torch.tensor(p2l), R, E)
    s = torch.tensor(shares, dtype=torch.float64)
    levels = tuple(n for n in (1, 2, 4) if n * R <= 8)  # N <= the 8-token tile
    for n in levels:
        N = n * R

        def costs(e, w):
            return _exact_costs(min(1.0, k * shares[e]), N, w, W, 8)

        opt = _brute_min_max(p2l, R, shares, k, N, W, costs)
        milp = P.solve_layer_plan(pl, s, CM, top_k=k, levels=(n,), hash_slots=W, objective="max",
                                  method="milp").expected_us[0]
        fast = P.solve_layer_plan(pl, s, CM, top_k=k, levels=(n,), hash_slots=W, objective="max").expected_us[0]
        lb = P.plan_lower_bound(pl, s, CM, top_k=k, levels=(n,), hash_slots=W)[0]
        assert float(milp) == pytest.approx(opt, rel=1e-9, abs=1e-9)
        assert float(lb) <= opt * (1 + 1e-7)
        assert float(fast) >= opt * (1 - 1e-7)


def _fast_vs_brute(seed: int):
    rng = random.Random(1000 + seed)
    p2l, R, E, shares = _small_case(rng)
    shares_t = torch.tensor(shares, dtype=torch.float64)
    k, W = min(2, E), 4
    n = rng.choice([1, 4, 16, 64])
    N = n * R
    act, til = P.copy_costs(np.minimum(1.0, k * np.array(shares)), np.array([N]), W, 8)
    opt = _brute_min_max(p2l, R, shares, k, N, W, lambda e, w: (act[0, e, w], til[0, e, w]))
    pl = Placement(torch.tensor(p2l), R, E)
    got = {m: float(P.solve_layer_plan(pl, shares_t, CM, top_k=k, levels=(n,), hash_slots=W,
                                       objective="max", method=m).expected_us[0]) for m in ("fast", "milp")}
    return opt, got


def test_fast_path_is_near_the_optimum():
    """The fast path (greedy + sweeps + augmenting chains) on 60 random small layouts at decode and
    prefill sizes, against brute force on the same cost tables: optimal in most, never far off,
    and the MILP always optimal."""
    ratios = []
    for seed in range(60):
        opt, got = _fast_vs_brute(seed)
        assert got["milp"] == pytest.approx(opt, rel=1e-9, abs=1e-9)
        assert got["fast"] >= opt - 1e-9
        ratios.append(got["fast"] / opt if opt > 0 else 1.0)
    optimal = sum(r <= 1 + 1e-9 for r in ratios)
    assert optimal >= 50, f"fast path optimal on {optimal}/60 layouts"
    assert max(ratios) <= 1.12, f"worst fast/optimal {max(ratios):.3f}"


@settings(max_examples=40, deadline=None)
@given(placements(max_ranks=6, max_slots_per_rank=6), st.integers(1, 4), st.sampled_from(["soft", "max"]),
       st.randoms(use_true_random=False))
def test_plans_are_valid_deterministic_and_never_worse_than_even(case, k, objective, rnd):
    p2l, R, E = case
    k = min(k, E)
    pl = Placement(p2l, R, E)
    shares = torch.tensor([rnd.random() ** 3 + 1e-3 for _ in range(E)], dtype=torch.float64)
    shares /= shares.sum()
    levels = (1, 8, 64, 512)
    a = P.solve_layer_plan(pl, shares, CM, top_k=k, levels=levels, objective=objective)
    b = P.solve_layer_plan(pl, shares, CM, top_k=k, levels=levels, objective=objective)
    assert torch.equal(a.weights, b.weights)
    w = a.weights
    assert bool((w >= 0).all())
    per_expert = torch.zeros(len(levels), E, dtype=torch.long).scatter_add_(1, p2l.expand(len(levels), -1), w)
    assert bool((per_expert == P.DEFAULT_HASH_SLOTS).all())
    t = P.expected_rank_times(pl, w, shares, CM, top_k=k, levels=levels)
    assert torch.allclose(t.max(1).values, a.expected_us)
    even = P.static_like_weights(pl, levels)[:, 0]
    t_even = P.expected_rank_times(pl, even, shares, CM, top_k=k, levels=levels)
    if objective == "max":
        assert bool((t.max(1).values <= t_even.max(1).values + 1e-9).all())


def _expected_max_reads(act_rank0: list[float], act_rank1: list[float]) -> float:
    """E[max(A_0, A_1)] for independent activations, by enumerating every outcome."""
    acts = act_rank0 + act_rank1
    out = 0.0
    for bits in itertools.product((0, 1), repeat=len(acts)):
        p = math.prod(a if b else 1 - a for a, b in zip(acts, bits))
        out += p * max(sum(bits[: len(act_rank0)]), sum(bits[len(act_rank0):]))
    return out


def test_the_soft_objective_splits_less_than_the_hard_max_in_decode():
    """Two tied ranks, a replicated expert a token picks with probability 1/4: splitting it evenly
    lowers max_r E[t_r] (the hard max splits), but raises the expected maximum (enumerated here),
    so the soft objective, which weighs each rank by how likely it is to be the busiest, keeps it
    on one copy at 2 and 4 tokens per rank."""
    pl = Placement(torch.tensor([0, 1, 2, 0, 3, 4]), 2)  # expert 0 on both ranks
    shares = torch.tensor([0.25] + [0.1875] * 4, dtype=torch.float64)
    W = P.DEFAULT_HASH_SLOTS
    for n in (2, 4):
        soft = P.solve_layer_plan(pl, shares, CM, top_k=1, levels=(n,)).weights[0]
        hard = P.solve_layer_plan(pl, shares, CM, top_k=1, levels=(n,), objective="max").weights[0]
        assert sorted([int(soft[0]), int(soft[3])]) == [0, W]
        assert [int(hard[0]), int(hard[3])] == [W // 2, W // 2]
        N = 2 * n
        one, half, other = (1 - (1 - p) ** N for p in (0.25, 0.125, 0.1875))
        whole = _expected_max_reads([one, other, other], [other, other])
        split = _expected_max_reads([half, other, other], [half, other, other])
        assert whole < split


def test_a_hot_expert_is_split_where_compute_binds():
    """At a prefill size a hot replicated expert's tokens pass many tiles: the plan splits it over
    both copies (close to evenly, the ranks being symmetric)."""
    pl = Placement(torch.tensor([0, 1, 2, 0, 3, 4]), 2)
    shares = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    lp = P.solve_layer_plan(pl, shares, CM, top_k=1, levels=(512,))
    assert abs(int(lp.weights[0, 0]) - int(lp.weights[0, 3])) <= 2


@settings(max_examples=30, deadline=None)
@given(placements(max_ranks=4, max_slots_per_rank=4, max_layers=2), st.randoms(use_true_random=False))
def test_plan_maps_give_each_copy_its_hash_slots(case, rnd):
    p2l, R, E = case
    pl = Placement(p2l, R, E)
    W = 8
    L = pl.num_layers
    w = torch.zeros(3, L, pl.num_physical, dtype=torch.long)
    for b in range(3):
        for layer in range(L):
            row = pl.phy2log[layer].tolist()
            for e in range(E):
                slots = [p for p in range(pl.num_physical) if row[p] == e]
                cuts = sorted(rnd.randint(0, W) for _ in range(len(slots) - 1))
                parts = [b_ - a_ for a_, b_ in zip([0] + cuts, cuts + [W])]
                for p, n in zip(slots, parts):
                    w[b, layer, p] = n
    maps = P.plan_maps(pl, w, W)
    assert maps.shape == (3, L, E, W)
    for b in range(3):
        for layer in range(L):
            m = maps[b, layer]
            assert bool((pl.phy2log[layer][m] == torch.arange(E)[:, None]).all())  # every entry holds its expert
            got = torch.bincount(m.reshape(-1), minlength=pl.num_physical)
            assert torch.equal(got, w[b, layer])
    with pytest.raises(P.PlanError, match="sum to 8"):
        P.plan_maps(pl, w + 1, W)


def test_hash_offsets_are_fixed_spread_and_salted():
    h = P.hash_offsets(4096, 8, 16)
    assert h.shape == (4096, 8) and int(h.min()) >= 0 and int(h.max()) < 16
    assert torch.equal(h, P.hash_offsets(4096, 8, 16))
    freq = torch.bincount(h.reshape(-1), minlength=16).double() / h.numel()
    assert float((freq - 1 / 16).abs().max()) < 0.1 / 16
    assert not torch.equal(h, P.hash_offsets(4096, 8, 16, salt=1))
    # positions of one column spread too (an expert appears in any column)
    col = torch.bincount(h[:, 3], minlength=16).double() / 4096
    assert float((col - 1 / 16).abs().max()) < 0.25 / 16
    assert P.hash_offsets(0, 8, 16).shape == (0, 8)


def test_apply_plan_is_the_indexing_loop():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 50, (12, 16), generator=g)
    ids = torch.randint(0, 12, (33, 4), generator=g)
    off = P.hash_offsets(40, 4, 16, salt=3)
    want = torch.tensor([[int(maps[ids[t, j], off[t, j]]) for j in range(4)] for t in range(33)])
    assert torch.equal(P.apply_plan(maps, ids, off), want)


def test_level_index_is_nearest_in_log_scale():
    lv = (1, 4, 16, 64)
    assert [P.level_index(lv, n) for n in (0, 1, 2, 3, 8, 9, 31, 32, 33, 1000)] == [0, 0, 1, 1, 2, 2, 2, 3, 3, 3]


def test_solve_plans_covers_every_layer_and_uses_the_window():
    pl = Placement(torch.tensor([[0, 1, 0, 2], [0, 1, 2, 1]]), 2, 3)
    window = torch.tensor([[[90, 5, 5], [5, 90, 5]]] * 3)
    ps = P.solve_plans(pl, window, CM, top_k=1, levels=(1, 256))
    assert ps.weights.shape == (2, 2, 4) and ps.expected_us.shape == (2, 2)
    one = P.solve_layer_plan(pl.layer(1), P.window_shares(window, 2, 3)[1], CM, top_k=1, levels=(1, 256))
    assert torch.equal(ps.layer(1).weights, one.weights)
