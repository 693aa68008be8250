"""Choose the defaults of ``--moe-lb lplb`` and ``--moe-lb waterfill+lplb`` by measurement.

Runs ``sglang-moe-lb replay --batch-sweep`` (the cost model with the measured H200 kernel
overheads, docs/cost-model.md) on every dataset and EP layout of issue 9's item 5:

* the bundled OLMoE data (its own expert shape), EP 8/16/32 with 16-64 redundant experts;
* the synthetic generator (256 experts, top-8, DeepSeek-V3 expert shape), EP 8/16/32 with 16-64 redundant;
* a recorder dump from ``scripts/demo_server.sh`` (``--dump PATH``; EP 2, 2 redundant, as recorded).

For every candidate mode and batch size it collects the modelled layer time (overhead
included) relative to SGLang static, then checks the two criteria: never slower than static
at any size (tolerance 0.5%), and faster than both SGLang static and dynamic from 256
tokens per rank on. Writes the tables (markdown) and the raw sweep JSONs.

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

SIZES = [1, 16, 64, 256, 1024, 4096, 16384]
LPLB = [
    "lplb/table", "lplb/table/gate",
    *(f"lplb/per-batch/{s}/{o}{g}" for s in ("local", "global") for o in ("tokens", "tiles") for g in ("", "/gate")),
]
JOINT = [
    *(f"waterfill+lplb/table/{c}/{s}{g}" for c in ("conservative", "all_rank") for s in ("local", "global") for g in ("", "/gate")),
    *(f"waterfill+lplb/per-batch/{s}/{o}/{c}{g}" for s in ("local", "global") for o in ("tokens", "tiles")
      for c in ("conservative", "all_rank") for g in ("", "/gate")),
]
TOLERANCE = 0.005  # "never modelled slower than SGLang static (tolerance -0.5%)"


def configs(dump: str | None, quick: bool) -> list[tuple[str, list[str]]]:
    out = []
    bundled = [(8, 16), (16, 16), (16, 32), (32, 32), (32, 64)]
    synthetic = [(8, 16), (16, 32), (32, 32), (32, 64)]
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


def sizes_for(label: str, args: list[str]) -> list[int]:
    """The sweep sizes; the synthetic generator draws a whole batch at once, so at EP 32 its
    largest batch (16,384 tokens per rank) is left out (~12 GiB to draw on this machine)."""
    R = int(args[args.index("--ep-size") + 1])
    return [n for n in SIZES if not ("synthetic" in label and R >= 32 and n > 8192)] + (
        [8192] if "synthetic" in label and R >= 32 else [])


def run(label: str, args: list[str], modes: list[str], out: Path, steps: int, reuse: bool) -> dict:
    path = out / (label.split(",")[0].split(" ")[0] + "_" + "_".join(a for a in args if a.isdigit()) + ".json")
    if reuse and path.exists():
        return json.loads(path.read_text())
    cmd = [sys.executable, "-m", "sglang_moe_lb", "replay", *args, "--batch-sweep", ",".join(map(str, sizes_for(label, args))),
           "--sweep-steps", str(steps), "--steps", "24", "--modes", ",".join(["static", "dynamic", *modes]),
           "--upstream-waterfill-steps", "0", "--no-progress", "--json", str(path)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: replay failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"[{time.time() - t0:5.0f} s] {label}", flush=True)
    return json.loads(path.read_text())


def table(label: str, res: dict, modes: list[str]) -> list[str]:
    sweep = res["sweep"]
    head = "| mode | " + " | ".join(str(s["tokens_per_rank"]) for s in sweep) + " | never slower | beats static+dynamic >= 256 |"
    rows = [f"**{label}** — modelled time / SGLang static (overhead included)", "", head,
            "|---|" + "---|" * (len(sweep) + 2)]
    for name in ["dynamic", *modes]:
        r = [s["modes"][name]["time_vs_static"] for s in sweep]
        rows.append(f"| `{name}` | " + " | ".join(f"{v:.3f}" for v in r) + f" | {verdict(res, name)[0]} | {verdict(res, name)[1]} |")
    return rows + [""]


def verdict(res: dict, name: str) -> tuple[str, str]:
    never = all(s["modes"][name]["time_vs_static"] <= 1 + TOLERANCE for s in res["sweep"])
    big = [s for s in res["sweep"] if s["tokens_per_rank"] >= 256]
    beats = all(s["modes"][name]["time_vs_static"] < min(1.0, s["modes"]["dynamic"]["time_vs_static"]) for s in big)
    return ("yes" if never else "**no**"), ("yes" if beats else "no")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/defaults", help="directory for the sweep JSONs and defaults.md")
    ap.add_argument("--dump", help="a recorder dump from scripts/demo_server.sh")
    ap.add_argument("--sweep-steps", type=int, default=6, help="steps per batch size")
    ap.add_argument("--quick", action="store_true", help="two layouts only (a smoke run)")
    ap.add_argument("--reuse", action="store_true", help="reuse sweep JSONs already in --out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    lines = ["# Defaults study: modelled time / SGLang static per batch size", ""]
    passing: dict[str, int] = {}
    for label, cli in configs(args.dump, args.quick):
        modes = LPLB + (JOINT if "synthetic" in label or "dump" in label else [])
        res = run(label, cli, modes, out, args.sweep_steps, args.reuse)
        lines += table(label, res, modes)
        for name in modes:
            ok = verdict(res, name)
            passing[name] = passing.get(name, 0) + (ok[0] == "yes")
            passing[name + " #beats"] = passing.get(name + " #beats", 0) + (ok[1] == "yes")
            passing[name + " #n"] = passing.get(name + " #n", 0) + 1
    lines += ["## Summary: layouts where each mode is never slower than static / beats static and dynamic from 256 on", "",
              "| mode | never slower | beats >= 256 |", "|---|---|---|"]
    for name in LPLB + JOINT:
        if name in passing:
            n = passing[name + " #n"]
            lines.append(f"| `{name}` | {passing[name]}/{n} | {passing[name + ' #beats']}/{n} |")
    (out / "defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
