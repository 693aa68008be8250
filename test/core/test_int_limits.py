"""Counts up to int64's limit: exact results, or one clean error; never a wrapped sum.

The oracle is Hall's condition on the transportation problem, in Python integers (no
overflow): the least integral busiest-rank load is the max over rank sets S of
``ceil((fixed load on S + units of replicated experts whose copies all lie on S) / |S|)``.
"""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.strategies import placements
from sglang_moe_lb import Placement, balanced_quotas
from sglang_moe_lb.lp_split import solve_split
from sglang_moe_lb.quota_dispatch import integer_quotas

I64 = (1 << 63) - 1
EXACT = 1 << 53


def hall_min_max(p2l: list[int], R: int, units: list[int]) -> int:
    """The least integral max rank load, by enumerating rank sets (small R only)."""
    S = len(p2l) // R
    ranks_of: dict[int, set[int]] = {}
    for p, e in enumerate(p2l):
        ranks_of.setdefault(e, set()).add(p // S)
    best = 0
    for size in range(1, R + 1):
        for chosen in itertools.combinations(range(R), size):
            inside = sum(units[e] for e, rs in ranks_of.items() if rs <= set(chosen))
            best = max(best, -(-inside // size))
    return best


def huge_counts(E: int):
    """Counts mixing small values, values near 2**53 and values up to int64's max."""
    value = st.one_of(st.integers(0, 50), st.integers(EXACT // 8 - 100, EXACT // 4),
                      st.integers(EXACT, I64), st.integers(0, I64))
    return st.lists(value, min_size=E, max_size=E)


def _one_line_naming(err: ValueError, name: str) -> bool:
    text = str(err)
    return "\n" not in text and text.startswith(name)


@settings(max_examples=200)
@given(st.data())
def test_balanced_quotas_is_exact_or_refuses_up_to_int64_max(data):
    p2l, R, E = data.draw(placements(max_ranks=3, max_slots_per_rank=3))
    pl = Placement(p2l, R, E)
    c = data.draw(huge_counts(E))
    tile = data.draw(st.sampled_from([1, 1, 8, 128]))
    try:
        q = balanced_quotas(pl, torch.tensor(c, dtype=torch.long), tile_tokens=tile)
    except ValueError as err:
        assert sum(c) > EXACT, (c, err)
        assert _one_line_naming(err, "counts"), err
        return
    assert sum(c) <= EXACT  # anything larger must have been refused
    got = q.tolist()
    assert min(got) >= 0
    per_expert = [0] * E
    for p, e in enumerate(p2l.tolist()):
        per_expert[e] += got[p]
    assert per_expert == c  # exact conservation, in Python integers
    S = len(got) // R
    units = [-(-x // tile) for x in c]
    tiles = [sum(-(-got[p] // tile) for p in range(r * S, (r + 1) * S)) for r in range(R)]
    assert max(tiles) == hall_min_max(p2l.tolist(), R, units)


@settings(max_examples=100)
@given(st.data())
def test_split_and_rounding_refuse_layers_past_exact_range(data):
    p2l, R, E = data.draw(placements(max_ranks=3, max_slots_per_rank=3))
    pl = Placement(p2l, R, E)
    c = data.draw(huge_counts(E))
    counts = torch.tensor(c, dtype=torch.long)
    if sum(c) <= EXACT:
        x = solve_split(pl, counts)
        q = integer_quotas(pl, x, counts)
        assert torch.zeros(E, dtype=torch.long).scatter_add_(0, pl.phy2log[0], q).tolist() == c
        return
    with pytest.raises(ValueError) as info:
        solve_split(pl, counts)
    assert _one_line_naming(info.value, "logical_counts")
    with pytest.raises(ValueError) as info:
        integer_quotas(pl, torch.zeros(pl.num_physical, dtype=torch.float64), counts)
    assert _one_line_naming(info.value, "logical_counts")


def test_float_counts_past_int64_are_refused_not_cast():
    pl = Placement(torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match=r"^counts has an entry of 1e\+19 tokens"):
        balanced_quotas(pl, torch.tensor([1e19, 0.0], dtype=torch.float64))


def test_hall_oracle_matches_hand_cases():
    # Rank 0 holds experts 0 and 1, rank 1 experts 0 and 2; expert 0 has a copy on each.
    assert hall_min_max([0, 1, 0, 2], 2, [7, 3, 0]) == 5  # 10 tokens, evenly
    assert hall_min_max([0, 1, 0, 2], 2, [1, 9, 0]) == 9  # expert 1 alone pins rank 0
