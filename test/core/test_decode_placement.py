"""The decode-aware placement post-step: same replica counts, no duplicate copies on a rank,
prefill token balance no worse than EPLB's, surplus copies spread evenly, and what it buys a plan."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sglang_moe_lb import CostModel, Placement
from sglang_moe_lb import decode_placement as D
from sglang_moe_lb.plan import solve_layer_plan, window_shares

# DeepSeek-V3 expert on the H200 datasheet: a read is ~1.6 tiles of compute.
CM = CostModel.for_model({"hidden_size": 7168, "moe_intermediate_size": 2048}, gpu="H200", dtype="fp8")


def _expected_tokens(row: list[int], shares: np.ndarray, R: int) -> list[float]:
    """Per rank: each expert's share split evenly over its copies (what EPLB balances), by hand."""
    S = len(row) // R
    copies = {e: row.count(e) for e in set(row)}
    return [sum(shares[e] / copies[e] for e in row[r * S:(r + 1) * S]) for r in range(R)]


def _eplb_like(rng: random.Random, E: int, R: int, S: int) -> list[int]:
    """A placement with some hot experts replicated, packed without regard to decode."""
    P = R * S
    extra = [rng.randrange(max(1, E // 4)) for _ in range(P - E)]  # replicas of the first quarter
    row = list(range(E)) + extra
    rng.shuffle(row)
    # no expert twice on a rank (EPLB's packing would not do it either): repair by swapping
    for _ in range(1000):
        bad = [(r, e) for r in range(R) for e in set(row[r * S:(r + 1) * S]) if row[r * S:(r + 1) * S].count(e) > 1]
        if not bad:
            return row
        r, e = bad[0]
        i = row.index(e, r * S)
        j = rng.randrange(P)
        row[i], row[j] = row[j], row[i]
    return row


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(2, 6), st.integers(0, 10_000), st.floats(0.0, 0.05))
def test_counts_kept_no_duplicates_tokens_not_worse(R, S, seed, tol):
    rng = random.Random(seed)
    E = max(2, R * S - rng.randint(1, R * S // 2))
    row = _eplb_like(rng, E, R, S)
    assume(all(len(set(row[r * S:(r + 1) * S])) == S for r in range(R)))  # EPLB never doubles a copy on a rank
    shares = np.array([rng.random() ** 3 + 1e-3 for _ in range(E)])
    window = torch.tensor(shares)[None] * 1000
    out = D.decode_aware_placement(torch.tensor([row]), window, R, top_k=min(2, E), cost=CM, tolerance=tol)
    new = out[0].tolist()
    assert sorted(new) == sorted(row)  # the same copies: EPLB's replica counts
    for r in range(R):
        part = new[r * S:(r + 1) * S]
        assert len(set(part)) == len(part), "a rank holds two copies of one expert"
    s = shares / shares.sum()
    assert max(_expected_tokens(new, s, R)) <= max(_expected_tokens(row, s, R)) * (1 + tol) + 1e-12
    again = D.decode_aware_placement(torch.tensor([row]), window, R, top_k=min(2, E), cost=CM, tolerance=tol)
    assert torch.equal(out, again)


def test_surplus_copies_are_spread_and_plans_switch_one_off_on_every_rank():
    """EP 4, one hot expert with 5 copies packed so two ranks hold no replica: after the step every
    rank holds a copy a plan can switch off, and at 16 tokens per rank the plan's busiest rank
    reads one weight fewer."""
    E, R, S = 12, 4, 4
    # expert 0 (hot) on 4 ranks + 1 extra copy... EPLB-like: copies of 0 and 1 on ranks 0-1 only
    row = [0, 1, 2, 3,
           0, 1, 4, 5,
           6, 7, 8, 9,
           10, 11, 0, 1]
    shares = np.array([0.3, 0.2] + [0.05] * 10)
    window = torch.tensor(shares)[None] * 1e4
    new = D.decode_aware_placement(torch.tensor([row]), window, R, top_k=2, cost=CM, tolerance=0.5)[0].tolist()
    copies = {e: new.count(e) for e in set(new)}
    switchable = [sum(copies[e] > 1 for e in new[r * S:(r + 1) * S]) for r in range(R)]
    assert min(switchable) >= 1 and sorted(new) == sorted(row)
    sh = window_shares(window, 1, E)[0]
    before = solve_layer_plan(Placement(torch.tensor(row), R, E), sh, CM, top_k=2, levels=(16,)).expected_us[0]
    after = solve_layer_plan(Placement(torch.tensor(new), R, E), sh, CM, top_k=2, levels=(16,)).expected_us[0]
    assert float(after) <= float(before) - 0.9 * CM.weight_read_us


def test_logical_to_all_physical_lists_copies_in_slot_order():
    got = D.logical_to_all_physical(torch.tensor([[1, 0, 1, 2], [2, 2, 0, 1]]), 3)
    assert got.tolist() == [[[1, -1], [0, 2], [3, -1]], [[2, -1], [3, -1], [0, 1]]]


def test_window_shape_is_checked():
    with pytest.raises(ValueError, match="window must be"):
        D.decode_aware_placement(torch.tensor([[0, 1, 0, 1]]), torch.ones(2, 3, 2), 2, top_k=1, cost=CM)


def test_auto_placement_is_decode_from_16_ranks_on():
    from sglang_moe_lb.decode_placement import resolve_placement

    assert [resolve_placement("auto", r) for r in (1, 2, 8, 15, 16, 32, 64)] == \
        ["eplb"] * 4 + ["decode"] * 3
    assert resolve_placement("eplb", 64) == "eplb" and resolve_placement("decode", 2) == "decode"
    with pytest.raises(ValueError, match="placement must be one of auto, eplb, decode, got 'dec'"):
        resolve_placement("dec", 8)
