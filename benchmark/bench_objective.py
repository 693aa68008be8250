"""CPU time of the tile objective vs the token objective (``balanced_quotas``), in one run.

For each (redundant experts, EP size, tokens per rank) cell, one single-layer placement and
a set of drifted Zipf batches; both objectives run on the same batches. Reports the median
CPU time per call of each and their ratio, and what each objective does to the busiest
rank's tiles and to the modelled layer time (DeepSeek-V3 expert, FP8, H200 datasheet).

    .venv/bin/python benchmark/bench_objective.py [--repeats 9] [--md out.md]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _timing import median_time

from sglang_moe_lb import CostModel, balanced_quotas
from sglang_moe_lb.testing.workloads import greedy_placement, zipf_counts, zipf_popularity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per batch (median)")
    ap.add_argument("--batches", type=int, default=4, help="batches per cell")
    ap.add_argument("--md", help="also write the table to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    E, K = 256, 8
    cm = CostModel.for_model({"hidden_size": 7168, "moe_intermediate_size": 2048}, "H200", "fp8")
    rows = [
        "| redundant | R | tokens/rank | token obj. (ms) | tile obj. (ms) | tile / token | busiest-rank tiles: tokens -> tiles | modelled layer µs: tokens -> tiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for red, R in ((32, 16), (32, 32), (64, 32)):
        pop = zipf_popularity(E, gen)
        pl = greedy_placement(pop, red, R)
        S = pl.slots_per_rank
        for n in (16, 256, 4096):
            t_tok, t_til, tiles_tok, tiles_til, us_tok, us_til = [], [], 0, 0, 0.0, 0.0
            for _ in range(args.batches):
                c = zipf_counts(pop, n * R * K, gen)
                t_tok.append(median_time(lambda: balanced_quotas(pl, c), args.repeats))
                t_til.append(median_time(lambda: balanced_quotas(pl, c, cm), args.repeats))
                q_tok, q_til = balanced_quotas(pl, c), balanced_quotas(pl, c, cm)
                tiles_tok += int(pl.rank_loads(cm.tiles(q_tok)).max())
                tiles_til += int(pl.rank_loads(cm.tiles(q_til)).max())
                us_tok += float(cm.layer_time(q_tok, S))
                us_til += float(cm.layer_time(q_til, S))
            a, b = statistics.median(t_tok), statistics.median(t_til)
            rows.append(
                f"| {red} | {R} | {n} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} | "
                f"{tiles_tok / args.batches:.1f} -> {tiles_til / args.batches:.1f} | "
                f"{us_tok / args.batches:.0f} -> {us_til / args.batches:.0f} |"
            )
            print(rows[-1], flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
