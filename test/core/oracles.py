"""Independent oracles for the core tests (built here, not taken from the code under test)."""

from __future__ import annotations

import itertools

import highspy
import numpy as np


def lp_min_max(phy2log: list[int], num_ranks: int, counts: list[int]) -> float:
    """Optimal max rank load of the fractional split, as a plain LP over *all* slots.

    Variables: one per physical slot plus M. Rows: per logical expert the copies sum to its
    count; per rank the slots' sum minus M is <= 0. Independent of sglang_moe_lb.lp_split.
    """
    P = len(phy2log)
    S = P // num_ranks
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    inf = highspy.kHighsInf
    for _ in range(P):
        h.addVar(0.0, inf)
    m = h.addVar(0.0, inf)
    h.changeColCost(P, 1.0)
    for e in range(len(counts)):
        cols = [p for p in range(P) if phy2log[p] == e]
        h.addRow(counts[e], counts[e], len(cols), np.array(cols, dtype=np.int32), np.ones(len(cols)))
    for r in range(num_ranks):
        cols = list(range(r * S, (r + 1) * S)) + [P]
        vals = [1.0] * S + [-1.0]
        h.addRow(-inf, 0.0, len(cols), np.array(cols, dtype=np.int32), np.array(vals))
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return float(h.getInfo().objective_function_value)


def brute_integer_min_max(phy2log: list[int], num_ranks: int, counts: list[int]) -> int:
    """Best max rank load over every integral split (tiny instances only)."""
    P = len(phy2log)
    S = P // num_ranks
    per_expert = []
    for e, c in enumerate(counts):
        slots = [p for p in range(P) if phy2log[p] == e]
        options = []
        for cut in itertools.product(range(c + 1), repeat=len(slots) - 1):
            if sum(cut) <= c:
                options.append(list(zip(slots, list(cut) + [c - sum(cut)])))
        per_expert.append(options)
    best = None
    for choice in itertools.product(*per_expert):
        load = [0] * num_ranks
        for assignment in choice:
            for p, n in assignment:
                load[p // S] += n
        m = max(load)
        best = m if best is None else min(best, m)
    return best
