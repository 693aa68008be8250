"""The solve cache: batched independent problems give exactly what each gives alone, and a
memoised replay equals one where every rank runs its own chain."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_moe_lb.objective import FloatSteps
from sglang_moe_lb.placement import Placement
from sglang_moe_lb.replay.memo import MemoSteps
from sglang_moe_lb.replay.simulate import ReplayConfig, run_replay
from sglang_moe_lb.replay.sources import synthetic_trace


@st.composite
def problems(draw):
    """Several independent single-layer problems on one EP layout: random maps, skewed counts."""
    R = draw(st.integers(2, 5))
    S = draw(st.integers(2, 4))
    E = draw(st.integers(R * S // 2 + 1, R * S - 1))
    n = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p2l = torch.cat([torch.arange(E), torch.randint(0, E, (R * S - E,), generator=g)])[torch.randperm(R * S, generator=g)]
        w = torch.rand(E, generator=g, dtype=torch.float64) ** draw(st.sampled_from([1.0, 3.0]))
        c = torch.poisson(w / w.sum() * draw(st.integers(1, 400)), generator=g).to(torch.long)
        out.append((Placement(p2l, R, E), c[None]))
    return out


@settings(max_examples=40)
@given(problems(), st.sampled_from(["fast", "highs"]))
def test_batched_problems_equal_each_alone(probs, method):
    """What ``MemoSteps.solve_many`` relies on: the layers of one split_round call never interact."""
    steps = FloatSteps(method)
    memo = MemoSteps(steps)
    memo.solve_many(probs)
    assert memo.misses == len({(pl.phy2log.numpy().tobytes(), u.numpy().tobytes()) for pl, u in probs})
    for pl, u in probs:
        q_alone, cert_alone = steps.split_round(pl, u)
        q, cert = memo.split_round(pl, u)
        assert torch.equal(q, q_alone) and torch.equal(cert, cert_alone)
    assert memo.hits == len(probs)


def test_memo_returns_copies_and_credits_saved_time():
    pl = Placement(torch.tensor([0, 1, 0, 2]), 2, 3)
    memo = MemoSteps()
    u = torch.tensor([[4, 1, 1]])
    q1, _ = memo.split_round(pl, u)
    q1 += 100  # a caller writing into its result must not change the cache
    q2, _ = memo.split_round(pl, u)
    assert q2.sum() == 6 and memo.hits == 1 and memo.misses == 1
    assert memo.take_credit() > 0 and memo.take_credit() == 0.0


PER_BATCH = ("static", "lplb/per-batch/global/tokens", "lplb/per-batch/global/tiles", "lplb/per-batch/local/tokens",
             "lplb/per-batch/local/tiles", "waterfill+lplb/per-batch/global/tokens/conservative",
             "waterfill+lplb/per-batch/local/tiles/all_rank", "waterfill+lplb/per-batch/global/tiles/all_rank",
             "lplb/plan", "waterfill/conservative/global")


@pytest.mark.parametrize("lp_method", ["fast", "highs"])
def test_memoised_replay_equals_every_rank_on_its_own(lp_method):
    tr = synthetic_trace(steps=3, tokens=(96, 400), num_ranks=3, experts=9, top_k=2, layers=2, skew=0.4, seed=7)
    kw = dict(ep_size=3, redundant_experts=3, rebalance_every=2, modes=PER_BATCH, workers=1, progress=False,
              lp_method=lp_method)
    a = run_replay(tr, ReplayConfig(memo=True, **kw))
    b = run_replay(tr, ReplayConfig(memo=False, **kw))
    assert a.config["memo"]["hits"] > 0 and b.config["memo"]["hits"] == 0
    for m in PER_BATCH:
        assert np.array_equal(a.arrays["slots"][m], b.arrays["slots"][m]), m
