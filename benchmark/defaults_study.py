"""Choose the defaults of ``--moe-lb lplb`` and ``--moe-lb waterfill+lplb`` by measurement.

Runs ``sglang-moe-lb replay --batch-sweep`` (the cost model with the measured H200 kernel
overheads, docs/cost-model.md) from decode to prefill sizes on:

* the bundled OLMoE data (its own expert shape), EP 8/16/32 with 16-32 redundant experts;
* the synthetic generator (256 experts, top-8, DeepSeek-V3 expert shape), EP 8/16/32 with 16-64 redundant;
* a recorder dump from ``scripts/demo_server.sh`` (``--dump PATH``; EP 2, 2 redundant, as recorded);

each with our modes on SGLang's EPLB placement and on the decode-aware post-step
(``--placement eplb|decode``; SGLang's own modes always on EPLB's). For every candidate mode
and batch size it collects the modelled layer time (overhead included) relative to SGLang
static, and checks issue 15's caps: <= 0.90 at 1-16 tokens per rank, <= 0.95 at 64-128,
<= 1.005 everywhere, and never more than 0.005 behind SGLang dynamic. Writes the tables
(markdown) and the raw sweep JSONs.

    .venv/bin/python benchmark/defaults_study.py --out out/defaults [--dump out/demo/.../x.pt] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = [1, 4, 16, 64, 128, 256, 1024, 4096]
LPLB = [
    "lplb/plan",
    "lplb/plan/local/tokens/gate",
    "lplb/plan/global/tokens/gate",
    "lplb/plan/local/tiles/gate",
    "lplb/per-batch/local/tokens",
    "lplb/per-batch/local/tokens/gate",
]
JOINT = [
    "waterfill/all_rank/global/gate",
    "waterfill+lplb/plan/local/tokens/all_rank/gate",
    "waterfill+lplb/plan/local/tokens/conservative/gate",
    "waterfill+lplb/plan/all_rank/local",
]
CAPS = ((1, 16, 0.90), (64, 128, 0.95))  # (from, to tokens per rank, cap)
TOLERANCE = 0.005  # <= 1.005 everywhere, <= dynamic + 0.005


def configs(dump: str | None, quick: bool) -> list[tuple[str, list[str]]]:
    out = []
    bundled = [(8, 16), (16, 16), (16, 32), (32, 32)]
    synthetic = [(8, 16), (8, 32), (16, 32), (32, 32), (32, 64)]
    if quick:
        bundled, synthetic = bundled[:1], synthetic[1:2]
    for R, red in bundled:
        out.append((f"bundled OLMoE, EP {R}, {red} redundant", ["--ep-size", str(R), "--redundant-experts", str(red)]))
    for R, red in synthetic:
        out.append((f"synthetic (256 experts, top-8), EP {R}, {red} redundant",
                    ["--synthetic", "--ep-size", str(R), "--redundant-experts", str(red), "--layers", "2"]))
    if dump:
        out.append(("demo-server dump (tiny DeepSeek-V3, EP 2, 2 redundant)",
                    [dump, "--ep-size", "2", "--redundant-experts", "2", "--top-k", "4"]))
    return out


def run(label: str, args: list[str], modes: list[str], placement: str, out: Path, steps: int, reuse: bool) -> dict:
    path = out / (label.split(",")[0].split(" ")[0] + "_" + "_".join(a for a in args if a.isdigit())
                  + f"_{placement}.json")
    if reuse and path.exists():
        return json.loads(path.read_text())
    cmd = [sys.executable, "-m", "sglang_moe_lb", "replay", *args, "--batch-sweep", ",".join(map(str, SIZES)),
           "--sweep-steps", str(steps), "--steps", "24", "--modes", ",".join(["static", "dynamic", *modes]),
           "--placement", placement, "--upstream-waterfill-steps", "0", "--no-progress", "--json", str(path)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: replay failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"[{time.time() - t0:5.0f} s] {label}, placement {placement}", flush=True)
    return json.loads(path.read_text())


def verdict(res: dict, name: str) -> str:
    """Which of issue 15's caps a mode meets on this layout: '' if all, else the failed ones."""
    bad = []
    for row in res["sweep"]:
        n, t = row["tokens_per_rank"], row["modes"][name]["time_vs_static"]
        dyn = row["modes"]["dynamic"]["time_vs_static"]
        for lo, hi, cap in CAPS:
            if lo <= n <= hi and t > cap:
                bad.append(f"{n}: {t:.3f} > {cap}")
        if t > 1 + TOLERANCE:
            bad.append(f"{n}: {t:.3f} > 1.005")
        if t > dyn + TOLERANCE:
            bad.append(f"{n}: {t:.3f} > dynamic {dyn:.3f} + 0.005")
    return "; ".join(bad)


def table(label: str, placement: str, res: dict, modes: list[str]) -> list[str]:
    sweep = res["sweep"]
    head = "| mode | " + " | ".join(str(s["tokens_per_rank"]) for s in sweep) + " | caps |"
    rows = [f"**{label}, placement {placement}**: modelled time / SGLang static (overhead included)", "", head,
            "|---|" + "---|" * (len(sweep) + 1)]
    for name in ["dynamic", *modes]:
        r = [s["modes"][name]["time_vs_static"] for s in sweep]
        v = verdict(res, name) if name != "dynamic" else "-"
        rows.append(f"| `{name}` | " + " | ".join(f"{x:.3f}" for x in r) + f" | {v or 'all met'} |")
    return rows + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/defaults", help="directory for the sweep JSONs and defaults.md")
    ap.add_argument("--dump", help="a recorder dump from scripts/demo_server.sh")
    ap.add_argument("--sweep-steps", type=int, default=6, help="steps per batch size")
    ap.add_argument("--placements", default="eplb,decode", help="placements to run (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="two layouts only (a smoke run)")
    ap.add_argument("--reuse", action="store_true", help="reuse sweep JSONs already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    lines = ["# Defaults study: modelled time / SGLang static per batch size", ""]
    met: dict[tuple[str, str], list[int]] = {}
    for label, cli in configs(args.dump, args.quick):
        modes = LPLB + (JOINT if "synthetic" in label or "dump" in label else [])
        for placement in args.placements.split(","):
            res = run(label, cli, modes, placement, out, args.sweep_steps, args.reuse)
            lines += table(label, placement, res, modes)
            for name in modes:
                m = met.setdefault((name, placement), [0, 0])
                m[0] += not verdict(res, name)
                m[1] += 1
    lines += ["## Summary: layouts where each mode meets every cap", "",
              "(issue 15's caps are for its acceptance layouts; on the others read the tables)", "",
              "| mode | placement | layouts |", "|---|---|---|"]
    for (name, placement), (ok, n) in met.items():
        lines.append(f"| `{name}` | {placement} | {ok}/{n} |")
    lines += ["", *server_default_tables(out, args.placements.split(","))]
    (out / "defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def server_default_tables(out: Path, placements: list[str]) -> list[str]:
    """docs/defaults.md's compact tables: the server default (placement resolved as ``auto``
    would), SGLang dynamic and the previous default, one row per layout, and the worst cases."""
    from sglang_moe_lb.decode_placement import resolve_placement
    from sglang_moe_lb.mode import BalanceMode

    default = BalanceMode.from_flag("lplb").name
    rows: dict[str, list[str]] = {"default": [], "dynamic": [], "before": []}
    worst = (0.0, "")
    behind = (-1.0, "")
    head = None
    for path in sorted(out.glob("*_eplb.json")):
        res = json.loads(path.read_text())
        ranks = res["config"]["ep_size"]
        placement = resolve_placement("auto", ranks)
        if placement not in placements:
            continue
        auto = json.loads(path.with_name(path.name.replace("_eplb", f"_{placement}")).read_text())
        sweep = auto["sweep"]
        head = head or [s["tokens_per_rank"] for s in sweep]
        label = path.stem.rsplit("_", 1)[0]
        ours = [s["modes"][default]["time_vs_static"] for s in sweep]
        dyn = [s["modes"]["dynamic"]["time_vs_static"] for s in sweep]
        rows["default"].append(f"| {label} ({placement}) | " + " | ".join(f"{x:.3f}" for x in ours) + " |")
        rows["dynamic"].append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in dyn) + " |")
        if "lplb/per-batch/local/tokens/gate" in sweep[0]["modes"]:
            before = [s["modes"]["lplb/per-batch/local/tokens/gate"]["time_vs_static"] for s in res["sweep"]]
            rows["before"].append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in before) + " |")
        worst = max(worst, (max(ours), label))
        behind = max(behind, (max(o - d for o, d in zip(ours, dyn)), label))
    if head is None:
        return []
    top = "| layout | " + " | ".join(map(str, head)) + " |\n|---|" + "---|" * len(head)
    return [f"## `{default}` (placement auto) / SGLang static", "", top, *rows["default"], "",
            "## SGLang dynamic / static", "", top, *rows["dynamic"], "",
            "## Before: `lplb/per-batch/local/tokens/gate` / static", "", top, *rows["before"], "",
            f"worst: {worst[0]:.3f} of static ({worst[1]}); largest lead of dynamic over the default: "
            f"{behind[0]:+.3f} ({behind[1]}; negative = the default is faster everywhere)"]


if __name__ == "__main__":
    main()
