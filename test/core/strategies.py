"""Hypothesis strategies: random EP placements and routed batches."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def placements(draw, max_ranks: int = 8, max_slots_per_rank: int = 5, max_layers: int = 1):
    """(phy2log LongTensor [L, P] or [P], num_ranks, num_logical); every expert has >= 1 copy."""
    R = draw(st.integers(1, max_ranks))
    S = draw(st.integers(1, max_slots_per_rank))
    P = R * S
    E = draw(st.integers(1, P))
    L = draw(st.integers(1, max_layers))
    rows = []
    for _ in range(L):
        extra = draw(st.lists(st.integers(0, E - 1), min_size=P - E, max_size=P - E))
        perm = draw(st.permutations(list(range(E)) + extra))
        rows.append(perm)
    t = torch.tensor(rows, dtype=torch.long)
    return (t[0] if L == 1 else t), R, E


@st.composite
def counts_for(draw, num_logical: int, layers: int | None = None, max_count: int = 10_000):
    """Per-expert token counts; often skewed, sometimes all on one expert or empty."""
    kind = draw(st.sampled_from(["uniform", "skewed", "one_hot", "zero"]))
    shape = (num_logical,) if layers is None else (layers, num_logical)
    n = num_logical if layers is None else layers * num_logical
    if kind == "zero":
        vals = [0] * n
    elif kind == "one_hot":
        vals = [0] * n
        vals[draw(st.integers(0, n - 1))] = draw(st.integers(1, max_count))
    elif kind == "skewed":
        vals = [draw(st.integers(0, max_count)) ** 2 // max(max_count, 1) for _ in range(n)]
    else:
        vals = draw(st.lists(st.integers(0, max_count), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.long).reshape(shape)
