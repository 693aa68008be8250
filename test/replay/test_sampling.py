"""Token generators: exact marginals, distinct experts, exact counts."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_moe_lb.replay.sampling import inclusion_probabilities, sample_topk, tokens_from_counts


def test_inclusion_probabilities_hand_cases():
    # Proportional when nothing exceeds 1: weights 4:1:1:1:1, k=2 -> 8/8 ... exactly 1 and 1/4 each.
    pi = inclusion_probabilities(torch.tensor([[4.0, 1, 1, 1, 1]]), 2)
    assert torch.allclose(pi, torch.tensor([[1.0, 0.25, 0.25, 0.25, 0.25]], dtype=torch.float64))
    # 10:1:1 with k=2 would give 1.67 to the first: capped at 1, the other two share the remaining 1.
    pi = inclusion_probabilities(torch.tensor([[10.0, 1, 1]]), 2)
    assert torch.allclose(pi, torch.tensor([[1.0, 0.5, 0.5]], dtype=torch.float64))
    # Two-step cap: 100:10:1:1, k=3 -> 1, then 10 vs 1:1 with 2 left -> 1, then 0.5, 0.5.
    pi = inclusion_probabilities(torch.tensor([[100.0, 10, 1, 1]]), 3)
    assert torch.allclose(pi, torch.tensor([[1.0, 1.0, 0.5, 0.5]], dtype=torch.float64))


def test_inclusion_probabilities_rejects_bad_k():
    with pytest.raises(ValueError, match="top-k"):
        inclusion_probabilities(torch.ones(1, 4), 5)


@given(st.lists(st.floats(0.0, 100.0), min_size=2, max_size=12), st.integers(1, 12), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_sample_topk_distinct_and_exactly_k(weights, k, seed):
    E = len(weights)
    k = min(k, E)
    w = torch.tensor([weights], dtype=torch.float64)
    if float(w.sum()) <= 0:
        w = torch.ones(1, E, dtype=torch.float64)
    pi = inclusion_probabilities(w, k)
    assert abs(float(pi.sum()) - k) < 1e-9 and float(pi.max()) <= 1 + 1e-12
    ids = sample_topk(pi, 50, k, torch.Generator().manual_seed(seed))
    assert ids.shape == (1, 50, k)
    assert int(ids.min()) >= 0 and int(ids.max()) < E
    assert all(len(set(row)) == k for row in ids[0].tolist())


def test_sample_topk_marginals_match_pi():
    # Independent check: empirical inclusion frequency vs the requested probability (4 sigma).
    pi = inclusion_probabilities(torch.tensor([[30.0, 12, 8, 5, 3, 1, 1, 0.5], [1, 1, 1, 1, 1, 1, 1, 1]]), 3)
    T = 20000
    ids = sample_topk(pi, T, 3, torch.Generator().manual_seed(7))
    for layer in range(2):
        freq = torch.bincount(ids[layer].flatten(), minlength=8).double() / T
        sigma = torch.sqrt(pi[layer] * (1 - pi[layer]) / T) + 1e-9
        assert bool(((freq - pi[layer]).abs() <= 4 * sigma + 1e-9).all()), (freq, pi[layer])


def test_sample_topk_is_seeded():
    pi = inclusion_probabilities(torch.rand(2, 16) + 0.1, 4)
    a = sample_topk(pi, 100, 4, torch.Generator().manual_seed(3))
    b = sample_topk(pi, 100, 4, torch.Generator().manual_seed(3))
    c = sample_topk(pi, 100, 4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tokens_from_counts_hand_case():
    # 3 experts, counts 3, 2, 1 (6 entries), k=2: T = max(ceil(6/2), 3) = 3 tokens.
    ids = tokens_from_counts(torch.tensor([[3, 2, 1]]), 2, torch.Generator().manual_seed(0))
    assert ids.shape == (1, 3, 2)
    assert torch.bincount(ids.flatten(), minlength=3).tolist() == [3, 2, 1]
    assert all(len(set(r)) == 2 for r in ids[0].tolist())


@given(st.lists(st.integers(0, 40), min_size=1, max_size=10), st.integers(1, 6), st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_tokens_from_counts_exact(counts, k, seed):
    c = torch.tensor([counts, list(reversed(counts))])
    ids = tokens_from_counts(c, k, torch.Generator().manual_seed(seed))
    T = ids.shape[1]
    assert T == max(math.ceil(sum(counts) / k), max(counts))
    for layer in range(2):
        valid = ids[layer][ids[layer] >= 0]
        assert torch.bincount(valid, minlength=len(counts)).tolist() == c[layer].tolist()
        for row in ids[layer].tolist():
            real = [x for x in row if x >= 0]
            assert len(real) == len(set(real))
