"""CPU timing of the exact split: fast block-coordinate solver vs HiGHS, measured in one run.

Reports ratios (HiGHS time / fast time) per configuration, since absolute times depend on the
machine. Also times a full rebalance (61 layers): the HiGHS LP on a window's total counts and
the plan solve over the same window (``plan.solve_plans``, what the rebalance cycle runs;
``benchmark/bench_plan.py`` times it on SGLang's own placement).

    .venv/bin/python benchmark/bench_split.py [--repeats 20] [--md docs/benchmarks_split.md]

Placements are built here by a small greedy (hottest experts replicated, then packed onto the
least-loaded rank with a free slot); batch counts are Zipf-skewed and redrawn per repeat.
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_time as timeit

from sglang_moe_lb import CostModel, Placement, integer_quotas, solve_split
from sglang_moe_lb.plan import solve_plans
from sglang_moe_lb.testing.workloads import greedy_placement as _greedy


def greedy_placement(popularity: torch.Tensor, num_redundant: int, num_ranks: int) -> torch.Tensor:
    """phy2log ``[P]`` of ``testing.workloads.greedy_placement``."""
    return _greedy(popularity, num_redundant, num_ranks).phy2log[0]


def zipf_counts(E: int, tokens: int, topk: int, gen: torch.Generator, s: float = 1.1) -> torch.Tensor:
    w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    w = w[torch.randperm(E, generator=gen)]
    return torch.distributions.Multinomial(tokens * topk, probs=w).sample().to(torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats per cell (median reported)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch (top-8)")
    ap.add_argument("--layers", type=int, default=61, help="layers in the full-rebalance timing")
    ap.add_argument("--window", type=int, default=32, help="recorded steps in the scenario LP")
    ap.add_argument("--md", help="also write the markdown tables to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.manual_seed(0)
    E, K = 256, 8
    rows = ["| redundant | R | fast, 1 layer (ms) | HiGHS, 1 layer (ms) | HiGHS / fast | fast, per layer of 61 batched (ms) | HiGHS / fast (batched) | max-load gap |",
            "|---|---|---|---|---|---|---|---|"]
    for red in (0, 32, 64):
        for R in (16, 32, 64):
            if (E + red) % R:
                rows.append(f"| {red} | {R} | n/a: {E + red} slots do not divide over {R} ranks | | | | | |")
                print(rows[-1], flush=True)
                continue
            pop = zipf_counts(E, 100_000, K, gen).to(torch.float64)
            pl = Placement(greedy_placement(pop, red, R), R, E)
            c = zipf_counts(E, args.tokens, K, gen)
            t_fast = timeit(lambda: solve_split(pl, c), args.repeats)
            t_highs = timeit(lambda: solve_split(pl, c, method="highs"), args.repeats)
            gap = float(pl.rank_loads(solve_split(pl, c)).max() / pl.rank_loads(solve_split(pl, c, "highs")).max() - 1)
            pl_l = Placement(pl.phy2log.expand(args.layers, -1).clone(), R, E)
            c_l = torch.stack([zipf_counts(E, args.tokens, K, gen) for _ in range(args.layers)])
            t_fast_l = timeit(lambda: solve_split(pl_l, c_l), max(3, args.repeats // 5)) / args.layers
            t_highs_l = timeit(lambda: solve_split(pl_l, c_l, "highs"), max(3, args.repeats // 5)) / args.layers
            rows.append(
                f"| {red} | {R} | {t_fast * 1e3:.3f} | {t_highs * 1e3:.3f} | {t_highs / t_fast:.2f} | "
                f"{t_fast_l * 1e3:.3f} | {t_highs_l / t_fast_l:.2f} | {gap:.1e} |"
            )
            print(rows[-1], flush=True)
    # Full rebalance: 61 layers, red=32, R=32.
    red, R = 32, 32
    pop = zipf_counts(E, 100_000, K, gen).to(torch.float64)
    pl_l = Placement(greedy_placement(pop, red, R).expand(args.layers, -1).clone(), R, E)
    window = torch.stack([torch.stack([zipf_counts(E, args.tokens, K, gen) for _ in range(args.layers)]) for _ in range(args.window)])
    t_lp = timeit(lambda: solve_split(pl_l, window.sum(0), "highs"), 3)
    cost = CostModel.for_model({"hidden_size": 7168, "moe_intermediate_size": 2048}, gpu="H200", dtype="fp8")
    t_sc = timeit(lambda: solve_plans(pl_l, window, cost, top_k=K), 1)
    t_q = timeit(lambda: integer_quotas(pl_l, solve_split(pl_l, window[0]), window[0]), 3)
    full = [
        f"| full rebalance, {args.layers} layers, E={E}, red={red}, R={R} | time (s) |",
        "|---|---|",
        f"| HiGHS min-max LP on the window's total counts | {t_lp:.3f} |",
        f"| plans of 13 levels from {args.window} recorded steps (the rebalance cycle's solve) | {t_sc:.3f} |",
        f"| fast split + integer quotas, all layers of one batch | {t_q:.3f} |",
    ]
    print("\n".join(full))
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(rows) + "\n\n" + "\n".join(full) + "\n")


if __name__ == "__main__":
    main()
