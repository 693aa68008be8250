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
    h.addVar(0.0, inf)
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


def _milp(build) -> float:
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    build(h)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal
    return float(h.getInfo().objective_function_value)


def milp_min_max_tokens(phy2log: list[int], num_ranks: int, counts: list[int]) -> int:
    """Best max rank load over integral token splits, as a HiGHS MILP over all slots."""
    P = len(phy2log)
    S = P // num_ranks
    inf = highspy.kHighsInf

    def build(h):
        for _ in range(P):
            h.addVar(0.0, inf)
        h.addVar(0.0, inf)  # M
        h.changeColCost(P, 1.0)
        h.changeColsIntegrality(P, np.arange(P, dtype=np.int32), np.array([highspy.HighsVarType.kInteger] * P))
        for e, c in enumerate(counts):
            cols = [p for p in range(P) if phy2log[p] == e]
            h.addRow(c, c, len(cols), np.array(cols, dtype=np.int32), np.ones(len(cols)))
        for r in range(num_ranks):
            cols = list(range(r * S, (r + 1) * S)) + [P]
            h.addRow(-inf, 0.0, len(cols), np.array(cols, dtype=np.int32), np.array([1.0] * S + [-1.0]))

    return round(_milp(build))


def milp_min_max_tiles(phy2log: list[int], num_ranks: int, counts: list[int], tile: int) -> int:
    """Best busiest-rank tile count over integral token splits, as a HiGHS MILP.

    Variables per slot: tokens q_p and tiles n_p (integers) with q_p <= tile * n_p; per
    expert the tokens sum to its count; per rank the tiles are <= M; minimise M.
    """
    P = len(phy2log)
    S = P // num_ranks
    inf = highspy.kHighsInf

    def build(h):
        for _ in range(2 * P):  # q_0..q_{P-1}, n_0..n_{P-1}
            h.addVar(0.0, inf)
        h.addVar(0.0, inf)  # M
        h.changeColCost(2 * P, 1.0)
        idx = np.arange(2 * P, dtype=np.int32)
        h.changeColsIntegrality(2 * P, idx, np.array([highspy.HighsVarType.kInteger] * (2 * P)))
        for e, c in enumerate(counts):
            cols = [p for p in range(P) if phy2log[p] == e]
            h.addRow(c, c, len(cols), np.array(cols, dtype=np.int32), np.ones(len(cols)))
        for p in range(P):
            h.addRow(-inf, 0.0, 2, np.array([p, P + p], dtype=np.int32), np.array([1.0, -float(tile)]))
        for r in range(num_ranks):
            cols = [P + p for p in range(r * S, (r + 1) * S)] + [2 * P]
            h.addRow(-inf, 0.0, len(cols), np.array(cols, dtype=np.int32), np.array([1.0] * S + [-1.0]))

    return round(_milp(build))
