"""Calibrate the cost model on a GPU: time one real expert shape, fit ``W/BW``, ``F/PEAK``, ``tile``.

The model (``sglang_moe_lb.cost``): a rank's grouped GEMM takes
``max(A * W / BW, T * tile * F / PEAK)`` with ``A`` active expert copies and ``T`` M-tiles
(``ceil(tokens / tile)`` per copy). This times ``A`` distinct experts of the DeepSeek-V3 shape
(hidden 7168, intermediate 2048: gate+up ``[7168 -> 4096]``, SiLU-and-mul, down ``[2048 -> 7168]``)
with ``n`` tokens each, for ``n`` in 1..4096 and ``A`` in 1..16, as one CUDA graph of per-expert
matmuls (per-expert calls, not a grouped-GEMM kernel), in bf16 and, where the device and torch
support it, fp8 (``torch._scaled_mm``, per-tensor scales). Distinct weights per expert, random
data, graph replay medians.

Fit: ``W/BW`` = the median per-copy time at ``n <= 8`` (weight-read bound); for each candidate
tile in {16, 32, 64, 128, 256}, ``F/PEAK`` by least squares on the compute-bound points; the tile
with the smallest mean relative error of the full model wins. Output: a calibration file in
``sglang_moe_lb.cost.CALIBRATION_FORMAT`` ("bandwidth", "peak_flops", "tile_tokens", "gpu",
plus ``dtype``, ``expert_shape``, the raw ``points`` and the fit's errors; an ``fp8`` entry holds the
same for fp8 where it ran), loadable by ``CostModel.for_model(calibration=...)`` (docs/cost-model.md).

    python benchmark/calibrate_cost_model.py --out OUT/calibration.json [--budget-s 60] [--dry-run]

``--small-m`` instead times the decode regime the cost model rests on ("time ∝ active copies"):
tokens per expert in {1, ..., 256} x active experts per rank in {1, ..., 32}, same expert shape,
as per-expert matmuls (bf16, and fp8 where ``torch._scaled_mm`` runs) and as one grouped GEMM
(``torch._grouped_mm``, bf16) where torch has it. Each timed layer cycles through at least
``COLD_EXPERTS`` distinct experts' weights, so no replay reads weights the L2 still holds (one
expert is 88 MB in bf16, the L2 50-60 MB). The raw points and a per-``n`` linear fit
``us = fixed + per_expert * A`` go under the key ``small_m`` of the ``--out`` file (added to
the calibration there, which stays in ``CALIBRATION_FORMAT``).

    python benchmark/calibrate_cost_model.py --small-m --out OUT/calibration.json [--budget-s 60] [--dry-run]

``--dry-run``: a tiny expert on the CPU (wall clock) to prove the script; never a calibration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

from sglang_moe_lb.cost import CALIBRATION_FORMAT, load_calibration  # noqa: E402

TILES = (16, 32, 64, 128, 256)
# tokens per expert: powers of two plus 96 / 192 / 384, where a 64-token tile and a 128-token
# tile give different tile counts (the fit can only tell tiles apart there)
NS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
ACTIVES = (1, 2, 4, 8, 16)
SMALL_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SMALL_ACTIVES = (1, 2, 4, 8, 16, 32)
COLD_EXPERTS = 8  # experts' weights a timed small-m layer cycles through (8 x 88 MB >> any L2)


def _experts(A, hidden, inter, dtype, dev):
    """Distinct random weights of ``A`` experts: gate+up ``[A, 2 inter, hidden]``, down ``[A, hidden, inter]``."""
    w1 = torch.stack([torch.randn(2 * inter, hidden, device=dev).div_(hidden ** 0.5).to(dtype) for _ in range(A)])
    w2 = torch.stack([torch.randn(hidden, inter, device=dev).div_(inter ** 0.5).to(dtype) for _ in range(A)])
    return w1, w2


def _layer_fn(xs, w1, w2, fp8):
    """One MoE layer's expert work on one rank: each active expert's tokens through its MLP."""
    if fp8:
        one = torch.ones((), device=xs[0].device)

        def fn():
            for x, a, b in zip(xs, w1, w2):
                h = torch._scaled_mm(x, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                g, u = h.chunk(2, dim=-1)
                y = (torch.nn.functional.silu(g) * u).to(torch.float8_e4m3fn)
                torch._scaled_mm(y, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return fn

    def fn():
        for x, a, b in zip(xs, w1, w2):
            g, u = (x @ a.t()).chunk(2, dim=-1)
            (torch.nn.functional.silu(g) * u) @ b.t()
    return fn


def _grouped_fn(x, w1, w2, offs):
    """The same layer as one grouped GEMM per projection: ``x [A n, hidden]`` (expert-major rows),
    ``w1 [A, 2 inter, hidden]``, ``w2 [A, hidden, inter]``, ``offs [A]`` int32 row ends."""
    def fn():
        g, u = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        torch._grouped_mm(torch.nn.functional.silu(g) * u, w2.transpose(-2, -1), offs=offs)
    return fn


def _time_us(fn, dev, reps=7, inner=5):
    if dev.type == "cuda":
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1000.0 / inner)
        return statistics.median(ts)
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    return statistics.median(ts)


def sweep(hidden, inter, dtype_name, dev, budget_end, ns, actives):
    fp8 = dtype_name == "fp8"
    dtype = torch.float8_e4m3fn if fp8 else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    w1, w2 = _experts(max(actives), hidden, inter, dtype, dev)
    pts = []
    for A in actives:
        for n in ns:
            if time.time() > budget_end:
                return pts, "time budget"
            xs = [torch.randn(n, hidden, device=dev).to(dtype) for _ in range(A)]
            try:
                us = _time_us(_layer_fn(xs, w1[:A], w2[:A], fp8), dev)
            except Exception as err:  # noqa: BLE001 - fp8 support varies
                return pts, f"{type(err).__name__}: {str(err)[:200]}"
            pts.append({"experts": A, "tokens_per_expert": n, "us": round(us, 3)})
    return pts, None


def fit(points, weight_bytes, flops_per_token):
    """(bandwidth, peak_flops, tile, errors): the cost model's max(A W/BW, T tile F/PEAK) fit."""
    small = [p["us"] / p["experts"] for p in points if p["tokens_per_expert"] <= 8]
    w_us = statistics.median(small)
    best = None
    for tile in TILES:
        # compute-bound points: tiles * tile * F / PEAK ~ us  ->  PEAK by least squares through 0
        big = [p for p in points if p["tokens_per_expert"] >= 4 * tile]
        if not big:
            continue
        xs = [p["experts"] * math.ceil(p["tokens_per_expert"] / tile) * tile * flops_per_token for p in big]
        ys = [p["us"] * 1e-6 for p in big]
        inv_peak = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
        err = []
        for p in points:
            model = max(p["experts"] * w_us, p["experts"] * math.ceil(p["tokens_per_expert"] / tile) * tile
                        * flops_per_token * inv_peak * 1e6)
            err.append(abs(model - p["us"]) / p["us"])
        cand = (statistics.mean(err), tile, 1.0 / inv_peak, max(err))
        best = cand if best is None or cand < best else best
    mean_err, tile, peak, max_err = best
    return weight_bytes / (w_us * 1e-6), peak, tile, {"mean_rel_error": round(mean_err, 4),
                                                      "max_rel_error": round(max_err, 4), "weight_read_us": round(w_us, 3)}


def cold_groups(A: int, pool: int, cold: int = COLD_EXPERTS) -> list[range]:
    """Disjoint runs of ``A`` expert indices from a pool of ``pool``: enough of them that one timed
    call reads at least ``cold`` experts' weights (fewer if the pool ends first)."""
    g = max(1, min(pool // A, -(-cold // A)))
    return [range(i * A, (i + 1) * A) for i in range(g)]


def small_m_sweep(hidden, inter, dtype_name, method, dev, budget_end, ns, actives):
    """Points ``{experts, tokens_per_expert, us}`` of one (dtype, method); ``n`` outer, so a budget
    cut leaves whole curves over ``actives`` for the smallest ``n``. Returns (points, why stopped)."""
    fp8 = dtype_name == "fp8"
    dtype = torch.float8_e4m3fn if fp8 else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    pool = max(max(actives), COLD_EXPERTS)
    w1, w2 = _experts(pool, hidden, inter, dtype, dev)
    pts = []
    for n in ns:
        for A in actives:
            if time.time() > budget_end:
                return pts, "time budget"
            groups = cold_groups(A, pool)
            xs = [torch.randn(n, hidden, device=dev).to(dtype) for _ in range(A)]
            if method == "grouped":
                x, offs = torch.cat(xs), torch.arange(1, A + 1, dtype=torch.int32, device=dev) * n
                fns = [_grouped_fn(x, w1[g.start:g.stop], w2[g.start:g.stop], offs) for g in groups]
            else:
                fns = [_layer_fn(xs, w1[g.start:g.stop], w2[g.start:g.stop], fp8) for g in groups]
            try:
                us = _time_us(lambda: [f() for f in fns], dev) / len(groups)
            except Exception as err:  # noqa: BLE001 - fp8 / grouped GEMM support varies
                return pts, f"{type(err).__name__}: {str(err)[:200]}"
            pts.append({"experts": A, "tokens_per_expert": n, "us": round(us, 3)})
    return pts, None


def linear_fit(points) -> list[dict]:
    """Per tokens-per-expert ``n``: least squares ``us = fixed_us + us_per_expert * A`` over the
    active experts measured, and the largest relative deviation of a point from that line."""
    out = []
    for n in sorted({p["tokens_per_expert"] for p in points}):
        pts = [p for p in points if p["tokens_per_expert"] == n]
        if len({p["experts"] for p in pts}) < 2:
            continue
        a = [p["experts"] for p in pts]
        y = [p["us"] for p in pts]
        ma, my = statistics.mean(a), statistics.mean(y)
        slope = sum((x - ma) * (v - my) for x, v in zip(a, y)) / sum((x - ma) ** 2 for x in a)
        fixed = my - slope * ma
        dev = max(abs(fixed + slope * x - v) / v for x, v in zip(a, y))
        out.append({"tokens_per_expert": n, "us_per_expert": round(slope, 3), "fixed_us": round(fixed, 3),
                    "max_rel_dev": round(dev, 4)})
    return out


def small_m_runs(dry: bool) -> list[tuple[str, str]]:
    """(dtype, method) pairs to time, most important first."""
    runs = [("bf16", "per-expert")]
    if hasattr(torch, "_grouped_mm"):
        runs.append(("bf16", "grouped"))
    if not dry and hasattr(torch, "float8_e4m3fn"):
        runs.append(("fp8", "per-expert"))
    return runs


def write_small_m(path: str, record: dict, header: dict) -> None:
    """Put ``record`` under ``small_m`` of the calibration file at ``path`` (made from ``header``
    when absent or not a calibration file); everything else in the file is kept."""
    cal = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                cal = json.load(f)
        except json.JSONDecodeError:
            cal = None
    if not isinstance(cal, dict) or cal.get("format") != CALIBRATION_FORMAT:
        cal = dict(header, note="no cost-model fit in this file (the calibration sweep did not write one)")
    cal["small_m"] = record
    with open(path, "w") as f:
        json.dump(cal, f, indent=1)


def run_small_m(args, dry: bool, dev) -> int:
    hidden, inter = (64, 32) if dry else (7168, 2048)
    ns = [1, 4, 16] if dry else list(SMALL_NS)
    actives = [1, 2, 4] if dry else list(SMALL_ACTIVES)
    header = {"format": CALIBRATION_FORMAT, "gpu": _gpu_name(dry), "date": datetime.date.today().isoformat(),
              "dry_run": dry}
    record = {"question": "time vs active experts per rank at small tokens per expert (decode: time ∝ active copies)",
              "expert_shape": [hidden, inter], "tokens_per_expert": ns, "active_experts": actives,
              "cold_experts": COLD_EXPERTS, "gpu": header["gpu"], "dry_run": dry, "runs": []}
    runs = small_m_runs(dry)
    t0 = time.time()
    for i, (dtype_name, method) in enumerate(runs):
        share = t0 + args.budget_s * (i + 1) / len(runs)
        pts, stop = small_m_sweep(hidden, inter, dtype_name, method, dev, share, ns, actives)
        run = {"dtype": dtype_name, "method": {"per-expert": "per-expert matmuls", "grouped": "torch._grouped_mm"}[method],
               "points": pts, "stopped": stop, "fit": linear_fit(pts)}
        record["runs"].append(run)
        write_small_m(args.out, record, header)  # after every run: a later kill keeps it
        worst = max((f["max_rel_dev"] for f in run["fit"]), default=None)
        print(f"small-m {dtype_name} {method}: {len(pts)} points, stop={stop}, "
              f"us/expert at n=1: {next((f['us_per_expert'] for f in run['fit'] if f['tokens_per_expert'] == 1), None)}, "
              f"worst deviation from linear: {worst}", flush=True)
    return 0 if any(r["points"] for r in record["runs"]) else 1


def _gpu_name(dry: bool) -> str:
    return "dry-run (CPU): not a calibration" if dry else torch.cuda.get_device_name()


def main() -> int:
    ap = argparse.ArgumentParser(description="Fit the cost model's bandwidth, matrix rate and tile on this GPU")
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (proves the script only)")
    ap.add_argument("--small-m", action="store_true",
                    help="time vs active experts at 1-256 tokens per expert, into the file's small_m key")
    args = ap.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    dev = torch.device("cpu" if dry else "cuda")
    if args.small_m:
        return run_small_m(args, dry, dev)
    hidden, inter = (64, 32) if dry else (7168, 2048)
    ns = [1, 4, 16, 64] if dry else list(NS)
    actives = [1, 2] if dry else list(ACTIVES)
    end = time.time() + args.budget_s
    params = 3 * hidden * inter
    result = {"format": CALIBRATION_FORMAT, "gpu": _gpu_name(dry),
              "date": datetime.date.today().isoformat(), "dtype": "bf16", "expert_shape": [hidden, inter],
              "method": "per-expert matmuls in one CUDA graph (gate+up, SiLU*up, down), distinct weights, random data",
              "dry_run": dry}
    dtypes = ["bf16"] + ([] if dry or not hasattr(torch, "float8_e4m3fn") else ["fp8"])
    for name in dtypes:
        share = end if name == "fp8" else time.time() + args.budget_s * (0.6 if len(dtypes) > 1 else 1.0)
        pts, stop = sweep(hidden, inter, name, dev, share, ns, actives)
        rec = {"points": pts, "stopped": stop}
        if len(pts) >= 4 and any(p["tokens_per_expert"] <= 8 for p in pts):
            bw, peak, tile, errs = fit(pts, params * (1.0 if name == "fp8" else 2.0), 2.0 * params)
            rec.update(bandwidth=bw, peak_flops=peak, tile_tokens=tile, fit=errs)
        result[name] = rec
        print(f"{name}: {len(pts)} points, stop={stop}, fit={ {k: rec.get(k) for k in ('bandwidth', 'peak_flops', 'tile_tokens', 'fit')} }",
              flush=True)
    if "bandwidth" not in result["bf16"]:
        print("calibration: not enough bf16 points to fit", file=sys.stderr)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return 1
    for k in ("bandwidth", "peak_flops", "tile_tokens"):  # the file's numbers: bf16 (fp8 under "fp8")
        result[k] = result["bf16"][k]
    result["points"] = result["bf16"]["points"]
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    load_calibration(args.out)  # the file is what CostModel.for_model reads
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
