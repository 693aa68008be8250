"""Regenerate docs/replay.md's results and docs/img/replay_*.png from the bundled default.

Three runs of ``sglang-moe-lb replay`` on the bundled OLMoE data (see docs/replay.md):

1. exactly the no-argument command a user types first; its stdout and wall time go into the
   docs verbatim;
2. the same configuration with every mode (``--modes all``: SGLang's four, every ``--moe-lb``
   mode gated and not), SGLang's Waterfill scored on *every* step (``--upstream-waterfill-steps
   -1``: minutes, SGLang's Triton kernels run in the Triton interpreter). Its JSON becomes the
   results table (of the gated modes, the two server defaults) and the reading of it, and its
   plots go to docs/img;
3. the batch sweep ``--batch-sweep 1,16,64,256,1024,4096,16384`` (default modes): the modelled
   time table and docs/img/replay_sweep.png.

Usage (from the repo root, with the project venv)::

    .venv/bin/python benchmark/replay_default.py            # rewrite docs/replay.md + docs/img (~20 min on 2 cores)
    .venv/bin/python benchmark/replay_default.py --check    # only run, print, write nothing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "replay.md"
IMG = ROOT / "docs" / "img"
CLI = [sys.executable, "-m", "sglang_moe_lb", "replay", "--no-progress"]
SWEEP = "1,16,64,256,1024,4096,16384"


def run(args: list[str]) -> tuple[str, float, float]:
    """Run the CLI; returns (stdout, wall seconds, CPU seconds of the child processes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(CLI + args, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        sys.exit(f"replay {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return r.stdout, wall, cpu


def markdown_table(js: dict) -> str:
    rows = [
        "| mode | by | balancedness mean | p5 | gap to joint LP bound | gap to class bound | MoE time vs static (tokens) "
        "| modelled time vs static (with overhead) | overhead µs/layer | CPU ms/batch (this CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    defaults = set(js["server_default"].values())
    for name, m in js["modes"].items():
        if name.endswith("/gate") and name not in defaults:
            continue  # other gated modes: their closed or opened form per batch; see the sweep
        cls = "joint" if m["class_bound"] == "joint" else "shared-local"
        ovh = f"{m['overhead_ms_per_batch']:.2f}" + (" (Triton interpreter)" if "overhead_note" in m else "")
        rows.append(
            f"| `{name}`{' (server default)' if name in defaults else ''} | {'SGLang' if m['family'] == 'upstream' else 'ours'} | {m['balancedness_mean']:.4f} | "
            f"{m['balancedness_p5']:.4f} | {100 * m['gap_to_bound_mean']:.2f}% | {100 * m['gap_to_class_bound_mean']:.2f}% ({cls}) | "
            f"{m['moe_time_ratio_vs_static']:.4f} | {m['time_vs_static']:.4f} | {m['overhead_us_per_layer']:.1f} | {ovh} |"
        )
    for label, key in (("bound: joint LP", "bound"), ("bound: shared expert local", "bound_local_shared")):
        b = js[key]
        rows.append(
            f"| **{label}** | LP | {b['balancedness_mean']:.4f} | {b['balancedness_p5']:.4f} | | | "
            f"{b['moe_time_ratio_vs_static']:.4f} | | | |"
        )
    return "\n".join(rows)


def _grid(js: dict, names: list[str], cell, label=lambda n: f"`{n}`") -> list[str]:
    """One markdown row per mode name, one column per sweep size; ``cell(entry or None)``."""
    sizes = [row["tokens_per_rank"] for row in js["sweep"]]
    rows = ["| mode | " + " | ".join(str(n) for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for n in names:
        rows.append(f"| {label(n)} | " + " | ".join(cell(row["modes"].get(n)) for row in js["sweep"]) + " |")
    return rows


def sweep_table(js: dict) -> str:
    """Modelled time with overhead vs static per mode (rows) and tokens per rank (columns)."""
    names = list(dict.fromkeys(n for row in js["sweep"] for n in row["modes"]))
    defaults = set(js["server_default"].values())
    time = _grid(js, names, lambda m: "-" if m is None else f"{m['time_vs_static']:.3f}",
                 label=lambda n: f"`{n}`" + (" (server default)" if n in defaults else ""))

    def even(m):
        v = None if m is None else m.get("break_even_overhead_us")
        return "-" if v is None else f"{v:.1f}"

    return "\n".join(time + ["", "Break-even overhead (µs per layer at which the mode would only match static):", ""]
                     + _grid(js, names, even))


def reading(js: dict) -> str:
    """Ours vs SGLang vs the bound, in numbers, from the full run."""
    m = js["modes"]

    def line(name: str) -> str:
        x = m[name]
        return (f"`{name}` {x['balancedness_mean']:.4f} (p5 {x['balancedness_p5']:.4f}), MoE time x{x['moe_time_ratio_vs_static']:.3f}, "
                f"{100 * x['gap_to_bound_mean']:.1f}% from the joint bound")

    ups = [n for n in m if m[n]["family"] == "upstream"]
    ours = [n for n in m if m[n]["family"] == "ours" and not n.endswith("/gate")]
    best_up = max(ups, key=lambda n: m[n]["balancedness_mean"])
    best_ours = max(ours, key=lambda n: m[n]["balancedness_mean"])
    b = js["bound"]
    out = [
        f"- Joint LP bound: balancedness {b['balancedness_mean']:.4f} (p5 {b['balancedness_p5']:.4f}), "
        f"MoE time x{b['moe_time_ratio_vs_static']:.3f} of `static`; shared expert kept local: "
        f"{js['bound_local_shared']['balancedness_mean']:.4f}, x{js['bound_local_shared']['moe_time_ratio_vs_static']:.3f}.",
        f"- Best SGLang mode: {line(best_up)}.",
        f"- Best of ours: {line(best_ours)}.",
    ]
    for a, b_ in (("waterfill/conservative/global", "upstream-waterfill-dyn"),
                  ("waterfill/all_rank/global", "upstream-waterfill-dyn"),
                  ("waterfill/conservative/local", "upstream-waterfill"), ("waterfill/all_rank/local", "upstream-waterfill"),
                  ("lplb/per-batch/global/tokens", "dynamic"), ("lplb/per-batch/local/tokens", "dynamic"),
                  ("lplb/plan", "static")):
        if a in m and b_ in m:
            out.append(
                f"- `{a}` vs `{b_}`: {m[a]['balancedness_mean']:.4f} vs {m[b_]['balancedness_mean']:.4f} balancedness, "
                f"MoE time x{m[a]['moe_time_ratio_vs_static']:.3f} vs x{m[b_]['moe_time_ratio_vs_static']:.3f}."
            )
    for flag, name in js["server_default"].items():
        if name in m:
            x = m[name]
            # A gated mode runs its opened form where the gate opens, its closed one elsewhere
            # (the plan for a plan schedule, else SGLang static).
            closed = "the plan" if "/plan/" in name else "SGLang static"
            gate = (f" (gate open on {100 * x['gate_open_share']:.0f}% of the steps, {closed} on the rest)"
                    if "gate_open_share" in x else "")
            out.append(
                f"- `--moe-lb {flag}` runs `{name}`: {x['balancedness_mean']:.4f} balancedness, MoE time "
                f"x{x['moe_time_ratio_vs_static']:.3f}, modelled time x{x['time_vs_static']:.3f} of `static`{gate}."
            )
    return "\n".join(out)


def replace_block(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pat.search(text):
        sys.exit(f"docs/replay.md has no <!-- {name}:begin/end --> markers")
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run and print only; write nothing")
    args = ap.parse_args()

    print("1/3 default run: sglang-moe-lb replay", flush=True)
    default_out, wall, cpu = run([])
    print(default_out)
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s, {os.cpu_count()} cores", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        js_path = Path(tmp) / "full.json"
        img = Path(tmp) / "img"
        full_args = ["--modes", "all", "--upstream-waterfill-steps", "-1", "--json", str(js_path), "--plot", str(img)]
        print("2/3 full run: sglang-moe-lb replay " + " ".join(full_args[:4]), flush=True)
        full_out, full_wall, full_cpu = run(full_args)
        print(full_out)
        js = json.loads(js_path.read_text())
        sweep_path = Path(tmp) / "sweep.json"
        sweep_args = ["--batch-sweep", SWEEP, "--json", str(sweep_path), "--plot", str(Path(tmp) / "sweep_img")]
        print("3/3 sweep: sglang-moe-lb replay " + " ".join(sweep_args[:2]), flush=True)
        sweep_out, sweep_wall, sweep_cpu = run(sweep_args)
        print(sweep_out)
        sweep_js = json.loads(sweep_path.read_text())
        if args.check:
            return
        IMG.mkdir(parents=True, exist_ok=True)
        for p in img.iterdir():
            shutil.copy(p, IMG / p.name)
        shutil.copy(Path(tmp) / "sweep_img" / "replay_sweep.png", IMG / "replay_sweep.png")

    cfg = js["config"]
    text = DOC.read_text()
    text = replace_block(
        text,
        "replay-default",
        "```\n$ sglang-moe-lb replay\n" + default_out.rstrip() + "\n```\n\n"
        f"Wall time {wall:.1f} s ({cpu:.1f} s of CPU over {os.cpu_count()} cores, other jobs sharing the machine), "
        f"SGLang {cfg['sglang_version']}, torch {cfg['torch_version']}.",
    )
    text = replace_block(
        text,
        "replay-full",
        "```\n$ sglang-moe-lb replay --modes all --upstream-waterfill-steps -1\n```\n\n"
        + markdown_table(js)
        + f"\n\nEvery mode scored on all {cfg['num_steps']} steps x {cfg['num_layers']} layers "
        f"(EPLB rebalances at steps {js['rebalance_steps']}; domain phases "
        + ", ".join(f"{p['label']} from step {p['start_step']}" for p in js["phases"])
        + f"). Wall time {full_wall:.0f} s ({full_cpu:.0f} s CPU), most of it SGLang's Waterfill kernels in the Triton interpreter.",
    )
    text = replace_block(text, "replay-reading", reading(js))
    text = replace_block(
        text,
        "replay-sweep",
        f"```\n$ sglang-moe-lb replay --batch-sweep {SWEEP}\n```\n\n" + sweep_table(sweep_js)
        + f"\n\nCost model: {sweep_js['config']['cost_model']}; overheads: {sweep_js['config']['overheads_source']}. "
        f"{len(sweep_js['sweep'])} sizes x {sweep_js['config']['sweep_steps']} steps; wall time {sweep_wall:.0f} s "
        f"({sweep_cpu:.0f} s CPU over {os.cpu_count()} cores).",
    )
    DOC.write_text(text)
    print(f"rewrote {DOC.relative_to(ROOT)} and {IMG.relative_to(ROOT)}/replay_*.png")


if __name__ == "__main__":
    main()
