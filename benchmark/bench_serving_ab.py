#!/usr/bin/env python3
"""A/B serving benchmark of the ``--moe-lb`` modes: one table of throughput and latency per mode.

CPU (default): for each mode in turn, start the real SGLang 0.5.23 server on this CPU
with the tiny DeepSeek-V3 (the TEST AND DEMO harness ``sglang_moe_lb.testing.cpu_serving``:
EP=2, EPLB, dummy weights), warm it up, run ``python -m sglang.bench_serving`` with the
same random-ids prompts (same seed) against it, stop it, and tabulate. On a tiny model on
CPU the numbers measure the serving path and the balancer's overhead, not the benefit
of balancing GPU experts.

    python benchmark/bench_serving_ab.py                       # off, lplb, lplb-plan-only, lplb-per-batch (+ waterfill rows: skipped)
    python benchmark/bench_serving_ab.py --modes off,lplb --num-prompts 64 --output-len 32

Waterfill modes cannot run on the CPU server: the plugin refuses them without
``--moe-a2a-backend deepep`` (DeepEP carries the fused shared-expert slot to another rank,
and needs GPUs). Their rows say so instead of a number; ``--cluster`` includes them.

Cluster: ``--cluster`` prints the command lines to run the same A/B on a real DeepEP
cluster (one server per mode, each node started with its --node-rank, then the client),
and ``--tabulate`` builds the table from the JSONL files those runs wrote.

    python benchmark/bench_serving_ab.py --cluster --model-path deepseek-ai/DeepSeek-V3 \\
        --nnodes 2 --gpus-per-node 8 --dist-init-addr 10.0.0.1:5000 --host 10.0.0.1
    python benchmark/bench_serving_ab.py --tabulate ab_off.jsonl ab_lplb.jsonl ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

# mode -> server flags. "lplb" and the Waterfill rows are the server defaults
# (mode.SERVER_DEFAULTS: plans, local sync, token objective, gated: plans where the gate is
# closed, the per-batch split where it opens); "lplb-plan-only" serves plans at every size
# (gate off); "lplb-per-batch" is the ungated exact split of the global counts of every batch.
MODE_FLAGS = {
    "off": [],
    "lplb": ["--moe-lb", "lplb"],
    "lplb-plan-only": ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "plan", "--moe-lb-gate", "off"],
    "lplb-per-batch": ["--moe-lb", "lplb", "--moe-lb-lplb-schedule", "per-batch", "--moe-lb-lplb-sync", "global",
                       "--moe-lb-objective", "tokens", "--moe-lb-gate", "off"],
    "waterfill": ["--moe-lb", "waterfill"],
    "waterfill+lplb": ["--moe-lb", "waterfill+lplb"],
}
ALL_MODES = tuple(MODE_FLAGS)
CPU_SKIP = {
    mode: "skipped on CPU: Waterfill needs --moe-a2a-backend deepep (GPUs); see docs/cpu-demo.md"
    for mode in ("waterfill", "waterfill+lplb")
}

# (column title, result key, format)
COLUMNS = (
    ("completed", "completed", "{:d}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_throughput", "{:.1f}"),
    ("TTFT mean ms", "mean_ttft_ms", "{:.1f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.1f}"),
    ("TPOT mean ms", "mean_tpot_ms", "{:.2f}"),
    ("ITL p99 ms", "p99_itl_ms", "{:.2f}"),
    ("E2E mean ms", "mean_e2e_latency_ms", "{:.1f}"),
    ("E2E p99 ms", "p99_e2e_latency_ms", "{:.1f}"),
)


def mode_flag(mode: str) -> list[str]:
    return list(MODE_FLAGS[mode])


def slug(mode: str) -> str:
    return mode.replace("+", "_")


def table(rows: list[tuple[str, dict | None, str]]) -> str:
    """rows: (mode, bench_serving result or None, note) -> a markdown table."""
    head = ["mode", *[c[0] for c in COLUMNS], "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for mode, result, note in rows:
        cells = [mode]
        for _, key, fmt in COLUMNS:
            value = None if result is None else result.get(key)
            cells.append("-" if value is None else fmt.format(value))
        cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CPU run


def run_cpu(args) -> list[tuple[str, dict | None, str]]:
    from sglang_moe_lb.testing.cpu_serving import EP2_EPLB_ARGS, launch_cpu_server

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes:
        if mode in CPU_SKIP:
            print(f"[{mode}] {CPU_SKIP[mode]}", file=sys.stderr)
            rows.append((mode, None, CPU_SKIP[mode]))
            continue
        print(f"[{mode}] starting the server ...", file=sys.stderr, flush=True)
        server_args = [*EP2_EPLB_ARGS, "--dtype", args.dtype, *mode_flag(mode), *args.server_arg]
        t0 = time.monotonic()
        try:
            srv = launch_cpu_server(server_args, ep=2, log_path=out_dir / f"server_{slug(mode)}.log", timeout=args.startup_timeout)
        except Exception as e:  # a mode the installed plugin does not offer, a crash, ...
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"[{mode}] server failed to start: {first} (log: {out_dir / f'server_{slug(mode)}.log'})", file=sys.stderr)
            rows.append((mode, None, "server failed to start"))
            continue
        startup = time.monotonic() - t0
        try:
            if args.warmup_prompts:
                srv.generate(["def warmup(x):"] * args.warmup_prompts, max_new_tokens=args.output_len)
            extra = ["--request-rate", str(args.request_rate)]
            if args.max_concurrency:
                extra += ["--max-concurrency", str(args.max_concurrency)]
            result = srv.bench_serving(
                num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                output_file=out_dir / f"bench_{slug(mode)}.jsonl", seed=args.seed, extra_args=extra,
            )  # fmt: skip
            result.pop("_log", None)
            rows.append((mode, result, f"start {startup:.0f}s"))
        except Exception as e:
            print(f"[{mode}] benchmark failed: {e}", file=sys.stderr)
            rows.append((mode, None, "benchmark failed"))
        finally:
            srv.stop()
    return rows


# --------------------------------------------------------------------------- cluster


def cluster_commands(args) -> str:
    tp = args.nnodes * args.gpus_per_node
    server = [
        "python", "-m", "sglang.launch_server",
        "--model-path", args.model_path, "--trust-remote-code",
        "--tp", str(tp), "--ep-size", str(tp),
        "--moe-a2a-backend", "deepep", "--deepep-mode", "auto",
        "--ep-num-redundant-experts", str(args.redundant_experts),
        "--ep-dispatch-algorithm", "dynamic",
        "--enable-eplb", "--eplb-rebalance-num-iterations", str(args.rebalance_iterations),
        "--expert-distribution-recorder-mode", "stat",
        "--host", "0.0.0.0", "--port", str(args.port),
    ]  # fmt: skip
    if args.nnodes > 1:
        server += ["--nnodes", str(args.nnodes), "--dist-init-addr", args.dist_init_addr, "--node-rank", "<NODE_RANK>"]
    server += args.server_arg
    out = [
        "# A/B of --moe-lb modes on a DeepEP cluster. Install sglang==0.5.23 and sglang-moe-lb (with its GPU",
        "# extras) on every node; the plugin adds --moe-lb. Run one mode at a time: start the server on every",
        f"# node (NODE_RANK = 0..{args.nnodes - 1}), wait for 'The server is fired up', run the client, stop it.",
        "# Same --seed => same prompts in every mode.",
        "",
    ]
    files = []
    for mode in args.modes:
        bench = [
            "python", "-m", "sglang.bench_serving", "--backend", "sglang",
            "--host", args.host, "--port", str(args.port),
            "--dataset-name", "random-ids",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", "1.0", "--num-prompts", str(args.num_prompts),
            "--request-rate", str(args.request_rate), "--seed", str(args.seed),
            "--tokenizer", args.model_path,
            "--output-file", f"ab_{slug(mode)}.jsonl",
        ]  # fmt: skip
        if args.max_concurrency:
            bench += ["--max-concurrency", str(args.max_concurrency)]
        files.append(f"ab_{slug(mode)}.jsonl")
        out += [f"# --- mode: {mode}", shlex.join(server + mode_flag(mode)).replace("'<NODE_RANK>'", "<NODE_RANK>"), shlex.join(bench), ""]
    out += ["# Then the table:", shlex.join(["python", "benchmark/bench_serving_ab.py", "--tabulate", *files])]
    return "\n".join(out)


def tabulate_files(paths: list[str]) -> list[tuple[str, dict | None, str]]:
    rows = []
    for p in paths:
        lines = [ln for ln in Path(p).read_text().splitlines() if ln.strip()]
        mode = Path(p).stem.removeprefix("ab_").removeprefix("bench_").replace("_", "+")
        rows.append((mode, json.loads(lines[-1]) if lines else None, Path(p).name))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--modes", default=",".join(ALL_MODES),
                    help=f"comma-separated modes from {', '.join(ALL_MODES)} (default: all; on CPU the Waterfill ones are skipped)")
    ap.add_argument("--num-prompts", type=int, default=None, help="default 32 on CPU, 2000 with --cluster")
    ap.add_argument("--input-len", type=int, default=None, help="default 64 on CPU, 1024 with --cluster")
    ap.add_argument("--output-len", type=int, default=None, help="default 32 on CPU, 512 with --cluster")
    ap.add_argument("--request-rate", default="inf")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable), e.g. --server-arg=--moe-lb-foo")
    ap.add_argument("--json", help="also write the rows as JSON here")
    cpu = ap.add_argument_group("CPU run")
    cpu.add_argument("--out-dir", default="out/bench_serving_ab", help="server logs and bench_serving JSONL files")
    cpu.add_argument("--dtype", default="float32")
    cpu.add_argument("--warmup-prompts", type=int, default=4)
    cpu.add_argument("--startup-timeout", type=float, default=300.0)
    cl = ap.add_argument_group("cluster (print commands)")
    cl.add_argument("--cluster", action="store_true", help="print the command lines for a DeepEP cluster instead of running")
    cl.add_argument("--model-path", default="deepseek-ai/DeepSeek-V3")
    cl.add_argument("--nnodes", type=int, default=2)
    cl.add_argument("--gpus-per-node", type=int, default=8)
    cl.add_argument("--dist-init-addr", default="<HEAD_IP>:5000")
    cl.add_argument("--host", default="<HEAD_IP>")
    cl.add_argument("--port", type=int, default=30000)
    cl.add_argument("--redundant-experts", type=int, default=32)
    cl.add_argument("--rebalance-iterations", type=int, default=1000)
    ap.add_argument("--tabulate", nargs="+", metavar="JSONL", help="only print the table of existing bench_serving output files")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in ALL_MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {ALL_MODES}")
    big = args.cluster
    args.num_prompts = args.num_prompts or (2000 if big else 32)
    args.input_len = args.input_len or (1024 if big else 64)
    args.output_len = args.output_len or (512 if big else 32)

    if args.tabulate:
        rows = tabulate_files(args.tabulate)
    elif args.cluster:
        print(cluster_commands(args))
        return 0
    else:
        rows = run_cpu(args)
        print(f"\nCPU harness (tiny DeepSeek-V3, EP=2, EPLB, dummy weights, {args.dtype}); "
              f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, seed {args.seed}\n")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([{"mode": m, "result": r, "note": n} for m, r, n in rows], indent=1))
    failed = [m for m, r, note in rows if r is None and not note.startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
