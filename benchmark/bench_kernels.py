"""GPU check of the hot-path kernels (v1.1) and of the plan's gather.

``benchmark/gpu_check.sh`` runs one process per section (a sticky CUDA error stays in its
section), then ``--report``. Sections (each with its own time budget, results kept when it
runs out):

* ``warm``    compile every kernel specialization the other sections launch, in parallel
              worker processes (Triton's disk cache then serves the sections);
* ``latency`` the layer path (``seam.KernelLayerPath``) at the goal shape and decode sizes
              (latest.json's latencies), the joint mode at the goal shape, and variants of the
              bare ``LayerBalancer``: (polish, stop) in {(8, 1e-9), (0, 1e-9), (0, half a token)}
              x 4/8 split warps at the goal shape (count / split / dispatch breakdown), red=64;
* ``graphs``  CUDA-graph capture + replay in every mode the kernels run, with a placement update
              between replays;
* ``gather``  the plan's overhead: SGLang's static gather ``map1d[topk_ids]`` vs the plan's
              ``plan.apply_plan`` (``map2d[topk_ids, offsets[:T]]``), each in a CUDA graph, at
              T in ``GATHER_T`` tokens, E=256, top-8, W=16 hash slots;
* ``floor``   launch floor: CUDA-graph replay of 1 vs 20 empty kernels at grid 1 and 132, and
              whether a cooperative launch runs and can be captured;
* ``count``   counting with acq_rel atomics vs relaxed atomics vs per-block rows only;
every measured kernel configuration is also checked bit for bit against the CPU reference
(``reference_layer`` with its ``FixedSpec``). The report also renders the small-m calibration
(``calibrate_cost_model.py --small-m``) when ``OUT/calibration.json`` holds it.

    python benchmark/bench_kernels.py --section latency --out OUT --partial-dir DIR --budget-s 80 [--dry-run]
    python benchmark/bench_kernels.py --report --out OUT --partial-dir DIR [--dry-run]

``--dry-run`` runs the same steps on tiny shapes on the CPU (``TRITON_INTERPRET=1``); its
timings are CPU wall clock of the interpreter and are never reported as latencies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.join(HERE, "..", "python"), os.path.join(HERE, "..", "sgl-kernel", "python")):
    if os.path.isdir(_p) and _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

SECTIONS = ("warm", "floor", "count", "latency", "graphs", "gather")
LOCAL = "lplb/per-batch/local/tokens"
GATHER_T = (1, 8, 64, 256, 1024, 4096)  # tokens per rank of the plan-gather timing
GATHER_SHAPE = dict(E=256, k=8, W=16, red=32, R=32)
GOAL_US = 10.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)

    def ok(self, need: float = 0.0) -> bool:
        return self.left() > need


# ------------------------------------------------------------------------------------------------
# Shapes and configurations (one list: the warm-up compiles exactly what the sections run)
# ------------------------------------------------------------------------------------------------
def shapes(dry: bool) -> dict:
    if dry:
        return {"goal": (16, 4, 4, 64), "red64": [(16, 8, 4, 32)],
                "decode": ((16, 4, 4, 32), (8, 16, 32)), "graph": (12, 4, 4, 24), "K": 2}
    return {"goal": (256, 32, 32, 16384), "red64": [(256, 64, 16, 4096), (256, 64, 32, 4096), (256, 64, 64, 4096)],
            "decode": ((256, 32, 32, 2048), (128, 512, 2048)), "graph": (64, 16, 8, 256), "K": 8}


HALF = dict(tol_shift=62, slack_units=1 << 27)  # v1's 2**-28 units: stop at half a token


def latency_configs(dry: bool) -> list[dict]:
    """The layer path as shipped (keys ``goal``, ``decode_T``: latest.json), then variants of the
    bare ``LayerBalancer`` (``v1``: polish sweeps, stop rule, split warps)."""
    s = shapes(dry)
    goal, (dec, dec_T) = s["goal"], s["decode"]
    out = [dict(key="goal", shape=goal, T=goal[3], mode=LOCAL)]
    out += [dict(key=f"decode_{T}", shape=dec, T=T, mode=LOCAL) for T in dec_T]
    out.append(dict(key="goal joint all_rank", shape=goal, T=goal[3], mode="waterfill+lplb/per-batch/local/tokens/all_rank"))
    for polish, stop in ((8, "1e-9"), (0, "1e-9"), (0, "half")):
        for warps in (4, 8):
            out.append(dict(key=f"goal polish={polish} stop={stop} warps={warps}", shape=goal, T=goal[3], mode=LOCAL,
                            v1=dict(polish=polish, stop=stop, warps=warps)))
    for sh in s["red64"]:
        out.append(dict(key=f"red64 R={sh[2]}", shape=sh, T=sh[3], mode=LOCAL, v1=dict(polish=8, stop="1e-9", warps=4)))
    return out


def kernel_modes() -> list[str]:
    """Every ungated mode the kernels run (``seam.supports``)."""
    from moe_lb_kernels import seam
    from sglang_moe_lb.mode import every_mode

    return [m.name for m in every_mode(gates=(False,)) if seam.supports(m)[0]]


def graph_configs(dry: bool) -> list[dict]:
    g = shapes(dry)["graph"]
    return [dict(key=f"graph {m}", shape=g, T=g[3], mode=m) for m in kernel_modes()]


# ------------------------------------------------------------------------------------------------
# Building and running one configuration
# ------------------------------------------------------------------------------------------------
def _spec(cfg):
    from moe_lb_kernels.reference import V1_SPEC, FixedSpec

    v = cfg.get("v1")
    if not v:
        return V1_SPEC
    extra = HALF if v["stop"] == "half" else {}
    fields = {k: getattr(V1_SPEC, k) for k in ("scale_bits", "max_sweeps", "tol_shift", "slack_units", "polish_at_bound")}
    fields.update(extra)
    return FixedSpec(f"v1 polish={v['polish']} stop={v['stop']}", polish_sweeps=v["polish"], **fields)


class Case:
    """One configuration on the device: placement, this rank's batch, every rank's rows, a path."""

    def __init__(self, cfg: dict, dev, seed: int = 0):
        from sglang_moe_lb import BalanceMode
        from sglang_moe_lb.chain import local_stats
        from sglang_moe_lb.testing.workloads import batch_topk, greedy_placement, zipf_popularity

        self.cfg, self.dev = cfg, dev
        E, red, R, maxT = cfg["shape"]
        K = 8 if E >= 64 else 2
        self.mode = BalanceMode.parse(cfg["mode"])
        gen = torch.Generator().manual_seed(1000 + seed)
        self.pop = zipf_popularity(E, gen)
        self.pl = greedy_placement(self.pop, red, R)
        self.src = 1 % R  # this rank (source_rank)
        self.me = self.src if self.mode.collective else 0  # its index in the per-rank lists
        self.D = R if self.mode.collective else 1
        ids = batch_topk(self.pop, cfg["T"], K, gen)
        self.ids = self._others(ids, gen)  # [D] batches, this rank's at src
        self.phys = [self._static_phys(x) for x in self.ids] if self.mode.lplb == "off" else [None] * len(self.ids)
        self.gathered = (torch.stack([local_stats(self.pl, x, self.mode, p) for x, p in zip(self.ids, self.phys)])
                         if self.mode.collective else None)
        self.path = self._build(maxT, K)
        self.static = {"ids": self.ids[self.me].to(dev)}
        if self.phys[self.me] is not None:
            self.static["phys"] = self.phys[self.me].to(dev)
        if self.gathered is not None:
            self.static["gathered"] = self.gathered.to(dev)
        self.res = None

    def _others(self, ids, gen):
        if not self.mode.collective:
            return [ids]
        E = self.pl.num_logical
        out = []
        for d in range(self.pl.num_ranks):  # other ranks: the batch with experts and rows permuted
            if d == 1 % self.pl.num_ranks:
                out.append(ids)
            else:
                perm = torch.randperm(E, generator=gen).to(ids.dtype)
                out.append(perm[ids.long()][torch.randperm(ids.shape[0], generator=gen)])
        return out

    def _static_phys(self, ids):
        first = self.pl.copy_order[0][self.pl.copy_start[0]]
        return torch.where(ids >= 0, first[ids.clamp(min=0).long()], ids.long()).to(ids.dtype)

    def _build(self, maxT, K):
        cfg = self.cfg
        if cfg.get("v1"):
            from moe_lb_kernels import LayerBalancer

            v = cfg["v1"]
            return LayerBalancer(self.pl, maxT, K, self.mode, self.dev, source_rank=self.src, polish_sweeps=v["polish"],
                                 plan_warps=v["warps"])
        from moe_lb_kernels import seam

        return seam.KernelLayerPath(self.pl, self.mode, max_tokens=maxT, topk=K, source_rank=self.src, device=self.dev)

    def call(self):
        """One layer as the plugin runs it (global sync: stats, then the call with the rows)."""
        st, v = self.static, self.cfg.get("v1")
        with _v1_stop(v):
            if v:  # a bare LayerBalancer: its own output buffer
                self.res = self.path(st["ids"])
                return
            if self.mode.collective:
                self.path.stats(st["ids"], st.get("phys"))
            self.res = self.path(st["ids"], gathered=st.get("gathered"), phys_ids=st.get("phys"))

    def check(self) -> dict:
        """The device's outputs (of the last call or replay) against the CPU reference."""
        from moe_lb_kernels.reference import reference_layer

        sync(self.dev)
        ref = reference_layer(self.pl, self.ids[self.me], self.mode, spec=_spec(self.cfg), source_rank=self.src,
                              gathered=self.gathered, phys_ids=self.phys[self.me])
        r = self.res
        T = self.ids[self.me].shape[0]
        out = {"phys_ids": bool(torch.equal(r.phys_ids[:T].cpu().long(), ref.phys_ids.long()))}
        if ref.quotas is not None:
            out["quotas"] = bool(torch.equal(r.quotas.cpu().long(), ref.quotas.long()))
        if ref.shared_rank is not None:
            out["shared_rank"] = bool(torch.equal(r.shared_rank[:T].cpu().long(), ref.shared_rank.long()))
        if self.mode.per_batch and not self.cfg.get("v1"):
            out["certified"] = bool(bool(r.certified) == bool(ref.certified))
        out["ok"] = all(out.values())
        return out

    def flags(self) -> dict:
        f = (self.path.flags if hasattr(self.path, "flags") else self.path.balancer.flags).tolist()
        return {"certified": bool(f[0]), "sweeps": f[1], "polish_sweeps": f[2], "polish_kept": bool(f[3])}


class _v1_stop:
    """Run v1's split with the half-token stop (its tolerance is a module constant read per launch)."""

    def __init__(self, v):
        self.on = bool(v) and v.get("stop") == "half"

    def __enter__(self):
        if self.on:
            import moe_lb_kernels.balancer as b

            self.saved = (b.TOL_SHIFT, b.SLACK_UNITS)
            b.TOL_SHIFT, b.SLACK_UNITS = HALF["tol_shift"], HALF["slack_units"]

    def __exit__(self, *exc):
        if self.on:
            import moe_lb_kernels.balancer as b

            b.TOL_SHIFT, b.SLACK_UNITS = self.saved


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def capture(fn, dev):
    """A CUDA graph of ``fn`` (warmed up twice on a side stream first); None on the CPU."""
    if dev.type != "cuda":
        return None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def time_us(fn, dev, reps: int = 15, inner: int = 40) -> dict:
    """Median µs per call: graph replays back to back on CUDA; eager wall clock on the CPU."""
    g = capture(fn, dev)
    times = []
    for _ in range(reps):
        if g is not None:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000.0 / inner)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return {"us": round(statistics.median(times), 2), "spread_us": round(max(times) - min(times), 2),
            "graph": g is not None}


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
def _warm_one(args):
    cfg, dry = args
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.time()
    try:
        c = Case(cfg, dev)
        c.call()
        sync(dev)
        return cfg["key"], round(time.time() - t, 1), None
    except Exception as err:  # noqa: BLE001
        return cfg["key"], round(time.time() - t, 1), f"{type(err).__name__}: {err}"


def section_warm(dev, dry, budget, out, jobs) -> None:
    cfgs = latency_configs(dry) + graph_configs(dry)
    if dry:
        cfgs = cfgs[:3]  # the dry run proves the mechanism; the interpreter compiles nothing
    log(f"warm-up: {len(cfgs)} configurations in {jobs} processes")
    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        it = pool.imap_unordered(_warm_one, [(c, dry) for c in cfgs])
        for _ in cfgs:
            left = budget.left()
            if left <= 0:
                out["warm"].append({"skipped": "time budget"})
                pool.terminate()
                break
            try:
                key, secs, err = it.next(timeout=left)
            except mp.TimeoutError:
                out["warm"].append({"skipped": "time budget"})
                pool.terminate()
                break
            out["warm"].append({"key": key, "seconds": secs, "error": err})
            if err:
                log(f"  {key}: {err}")


def section_floor(dev, dry, budget, out) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def _empty(x_ptr, N: tl.constexpr):
        if N < 0:
            tl.store(x_ptr, 0)

    x = torch.zeros(1, device=dev)
    for grid in (1, 132):
        for n in (1, 20):
            if not budget.ok(3):
                return

            def fn(grid=grid, n=n):
                for _ in range(n):
                    _empty[(grid,)](x, N=1)

            r = time_us(fn, dev)
            out["floor"].append({"grid": grid, "kernels": n, **r})
            log(f"  floor grid={grid} kernels={n}: {r}")
    rec = {"cooperative_eager": None, "cooperative_capture": None}
    try:
        _empty[(132,)](x, N=1, launch_cooperative_grid=True)
        sync(dev)
        rec["cooperative_eager"] = True
        if dev.type == "cuda":
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                _empty[(132,)](x, N=1, launch_cooperative_grid=True)
            g.replay()
            sync(dev)
            rec["cooperative_capture"] = True
    except Exception as err:  # noqa: BLE001
        rec["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    out["floor"].append(rec)
    log(f"  cooperative: {rec}")


def section_count(dev, dry, budget, out) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def _cnt(ids_ptr, T, acc_ptr, rows_ptr, K: tl.constexpr, KB: tl.constexpr, BT: tl.constexpr, EB: tl.constexpr,
             E: tl.constexpr, MODE: tl.constexpr):
        pid = tl.program_id(0)
        t = pid * BT + tl.arange(0, BT)
        k = tl.arange(0, KB)
        m = (t < T)[:, None] & (k < K)[None, :]
        x = tl.load(ids_ptr + t[:, None] * K + k[None, :], mask=m, other=-1)
        h = tl.histogram(tl.reshape(tl.where(m & (x >= 0), x, EB - 1), [BT * KB]), EB)
        b = tl.arange(0, EB)
        if MODE == 0:
            tl.atomic_add(acc_ptr + b, h, mask=(b < E) & (h > 0))  # Triton's default: acq_rel
        elif MODE == 1:
            tl.atomic_add(acc_ptr + b, h, mask=(b < E) & (h > 0), sem="relaxed")
        else:
            tl.store(rows_ptr + pid * EB + b, h)

    E, _, _, T = shapes(dry)["goal"]
    K = 8 if E >= 64 else 2
    EB = 1 << E.bit_length()
    ids = torch.randint(0, E, (T, K), dtype=torch.int32, device=dev)
    for BT in (64, 128):
        nb = -(-T // BT)
        acc = torch.zeros(EB, dtype=torch.int32, device=dev)
        rows = torch.zeros(nb, EB, dtype=torch.int32, device=dev)
        for mode, name in ((0, "acq_rel atomics"), (1, "relaxed atomics"), (2, "per-block rows only")):
            if not budget.ok(3):
                return
            r = time_us(lambda: _cnt[(nb,)](ids, T, acc, rows, K=K, KB=K, BT=BT, EB=EB, E=E, MODE=mode), dev)
            out["count"].append({"variant": name, "BT": BT, "blocks": nb, **r})
            log(f"  count {name} BT={BT}: {r}")


def _measure(cfg, dev, out_list, breakdown: bool = False) -> None:
    rec = {"key": cfg["key"], "E": cfg["shape"][0], "red": cfg["shape"][1], "R": cfg["shape"][2],
           "T": cfg["T"], "mode": cfg["mode"], **(cfg.get("v1") or {})}
    try:
        c = Case(cfg, dev)
        rec.update(time_us(c.call, dev))
        rec.update(c.flags() if c.mode.per_batch else {})
        rec["exact"] = c.check()
        if breakdown:
            rec.update(_breakdown(c, dev))
    except Exception as err:  # noqa: BLE001
        rec.update(error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])
    log(f"  {rec}")
    out_list.append(rec)


def _breakdown(c, dev) -> dict:
    """count / split / dispatch µs from graphs of the first 1, 2, 3 kernels (local LPLB)."""
    ids = c.static["ids"]
    bal = c.path.balancer if hasattr(c.path, "balancer") else c.path
    fns = bal._prefix_calls(ids, c.res.phys_ids)
    with _v1_stop(c.cfg.get("v1")):
        t = [time_us(f, dev)["us"] for f in fns]
    return {"count_us": t[0], "split_us": round(t[1] - t[0], 2), "dispatch_us": round(t[2] - t[1], 2)}


def section_latency(dev, dry, budget, out) -> None:
    for cfg in latency_configs(dry):
        if not budget.ok(8):
            out["latency"].append({"key": cfg["key"], "skipped": "time budget"})
            continue
        _measure(cfg, dev, out["latency"], breakdown=cfg["key"].startswith("goal") and cfg["mode"] == LOCAL)


def _rebalanced(c: "Case", seed: int):
    from sglang_moe_lb.testing.workloads import greedy_placement, zipf_popularity

    E, red, R, _ = c.cfg["shape"]
    for s in range(seed, seed + 8):
        pl = greedy_placement(zipf_popularity(E, torch.Generator().manual_seed(5000 + s)), red, R)
        try:
            c.path.update_placement(pl)
            return pl
        except ValueError:
            continue
    raise RuntimeError("no rebalanced placement fits the path's capacities")


def section_graphs(dev, dry, budget, out) -> None:
    """Capture once; replay on a new batch; update the placement; replay again."""
    from sglang_moe_lb.chain import local_stats
    from sglang_moe_lb.testing.workloads import batch_topk

    for cfg in graph_configs(dry):
        if not budget.ok(5):
            out["graphs"].append({"mode": cfg["mode"], "skipped": "time budget"})
            continue
        rec = {"mode": cfg["mode"]}
        try:
            c = Case(cfg, dev)
            g = capture(c.call, dev)
            rec["captured"] = g is not None
            run = g.replay if g is not None else c.call
            gen = torch.Generator().manual_seed(77)
            for step in ("new batch", "new placement"):
                if step == "new placement":
                    c.pl = _rebalanced(c, 1)
                K = c.ids[c.me].shape[1]
                fresh = c._others(batch_topk(c.pop, cfg["T"], K, gen), gen)
                c.ids = fresh
                c.phys = [c._static_phys(x) for x in fresh] if c.mode.lplb == "off" else [None] * len(fresh)
                c.static["ids"].copy_(fresh[c.me])
                if c.phys[c.me] is not None:
                    c.static["phys"].copy_(c.phys[c.me])
                if c.mode.collective:
                    c.gathered = torch.stack([local_stats(c.pl, x, c.mode, p) for x, p in zip(c.ids, c.phys)])
                    c.static["gathered"].copy_(c.gathered)
                run()  # the graph's outputs are views of the path's buffers: c.res sees the replay
                rec[step] = c.check()
            rec["ok"] = all(rec[s]["ok"] for s in ("new batch", "new placement"))
        except Exception as err:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1200:])
        log(f"  graph {rec['mode']}: ok={rec.get('ok')} {rec.get('error', '')}")
        out["graphs"].append(rec)


def gather_inputs(dev, T_max: int) -> dict:
    """SGLang's static map ``map1d`` int32 [E] (each expert's first copy), a plan's map ``map2d``
    int32 [E, W] (``plan.plan_maps`` of the even plan), ``offsets`` int64 [T_max, k]
    (``plan.hash_offsets``) and routed ids int32 [T_max, k], on ``dev`` (GATHER_SHAPE)."""
    from sglang_moe_lb.plan import hash_offsets, plan_maps, static_like_weights
    from sglang_moe_lb.testing.workloads import batch_topk, greedy_placement, zipf_popularity

    E, k, W, red, R = (GATHER_SHAPE[x] for x in ("E", "k", "W", "red", "R"))
    gen = torch.Generator().manual_seed(7)
    pop = zipf_popularity(E, gen)
    pl = greedy_placement(pop, red, R)
    map2d = plan_maps(pl, static_like_weights(pl, levels=(1,), hash_slots=W)[0], W)[0]
    map1d = pl.copy_order[0][pl.copy_start[0]]
    return {"map1d": map1d.to(dev, torch.int32), "map2d": map2d.to(dev, torch.int32),
            "offsets": hash_offsets(T_max, k, W, salt=1).to(dev), "ids": batch_topk(pop, T_max, k, gen).to(dev)}


def section_gather(dev, dry, budget, out) -> None:
    """The plan's gather against SGLang's static gather, each captured alone in a CUDA graph."""
    from sglang_moe_lb.plan import apply_plan

    g = gather_inputs(dev, max(GATHER_T))
    for T in GATHER_T:
        if not budget.ok(3):
            out["gather"].append({"T": T, "skipped": "time budget"})
            continue
        ids = g["ids"][:T]  # a fixed buffer's rows, as SGLang's topk_ids in a captured batch size
        rec = {"T": T, **{f"{k}": v for k, v in GATHER_SHAPE.items() if k in ("E", "k", "W")}}
        try:
            static = time_us(lambda: g["map1d"][ids], dev)
            plan = time_us(lambda: apply_plan(g["map2d"], ids, g["offsets"]), dev)
            rec.update(static_us=static["us"], plan_us=plan["us"], overhead_us=round(plan["us"] - static["us"], 2),
                       graph=static["graph"] and plan["graph"])
            want = g["map2d"].cpu().long()[ids.cpu().long(), g["offsets"].cpu()[:T]]
            rec["exact"] = bool(torch.equal(apply_plan(g["map2d"], ids, g["offsets"]).cpu().long(), want))
        except Exception as err:  # noqa: BLE001
            rec.update(error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1200:])
        log(f"  gather {rec}")
        out["gather"].append(rec)


# ------------------------------------------------------------------------------------------------
# Environment and report
# ------------------------------------------------------------------------------------------------
def env_report(dev) -> dict:
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": str(dev), "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(card=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["card"] = f"CPU ({platform.machine()})"
    for name in ("highspy", "sglang", "xdist"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "present")
        except Exception as err:  # noqa: BLE001
            info[name] = f"absent ({type(err).__name__})"
    return info


def _lat(rows, key):
    return next((x for x in rows if x.get("key") == key and "us" in x), None)


def _small_m(out_dir) -> dict | None:
    """The ``small_m`` record of ``OUT/calibration.json`` (calibrate_cost_model.py --small-m), if any."""
    path = os.path.join(out_dir, "calibration.json")
    try:
        with open(path) as f:
            return json.load(f).get("small_m")
    except (OSError, ValueError, AttributeError):
        return None


def report(out_dir, parts, dry) -> int:
    from moe_lb_kernels import seam

    res = {s: [] for s in SECTIONS}
    env = {}
    for s in SECTIONS:
        path = os.path.join(parts, f"{s}.json")
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            res[s] = d.get(s, [])
            env = env or d.get("env", {})
    res["env"] = env
    on_gpu = (not dry) and str(env.get("device", "")).startswith("cuda")
    lat = {}
    for name in ("goal", "ep256_512", "decode_128", "decode_2048"):  # ep256_512: not run (docs/kernels.md)
        r = _lat(res["latency"], name)
        lat[name] = r["us"] if (on_gpu and r and r.get("exact", {}).get("ok")) else None
    graphs = [g for g in res["graphs"] if "skipped" not in g]
    all_modes = on_gpu and len(graphs) == len(kernel_modes()) and all(g.get("ok") and g.get("captured") for g in graphs)
    latest = {"device": env.get("card", "?") if on_gpu else "dry-run", "date": datetime.date.today().isoformat(),
              "kernels_version": seam.KERNELS_VERSION, "graph_capture_all_modes": bool(all_modes), "latency_us": lat,
              "dry_run": not on_gpu,
              "exact_all": all(r.get("exact", {}).get("ok", False) for r in res["latency"] if "us" in r),
              "goal_us": GOAL_US}
    # what the cost model's "lplb/plan" overhead entry takes (data/overheads_*.json), µs by tokens
    overhead = {str(r["T"]): (r["overhead_us"] if on_gpu and r.get("exact") else None)
                for r in res["gather"] if "overhead_us" in r}
    with open(os.path.join(out_dir, "latest.json"), "w") as f:
        json.dump(latest, f, indent=1)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"latest": latest, "plan_gather_overhead_us": overhead, **res}, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(_markdown(res, latest, on_gpu, _small_m(out_dir)))
    failures = [r for r in res["latency"] if "us" in r and not r.get("exact", {}).get("ok")]
    failures += [g for g in graphs if not g.get("ok")]
    failures += [r for r in res["gather"] if "skipped" not in r and not r.get("exact")]
    print(json.dumps(latest))
    return 1 if failures else 0


def _markdown(res, latest, on_gpu, small_m) -> str:
    env = res["env"]
    L = [f"# Hot-path kernels GPU check — {env.get('card', '?')}", "",
         f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda', '-')}; "
         f"{'dry run: CPU interpreter, timings are interpreter wall clock and mean nothing' if not on_gpu else 'graph replay'}",
         "", f"latest.json: `{json.dumps(latest['latency_us'])}`, graph capture in all {len(kernel_modes())} kernel "
         f"modes: {latest['graph_capture_all_modes']}", ""]

    def table(rows, cols, title):
        L.extend([f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])
        for r in rows:
            cells = []
            for c in cols:
                v = r.get(c, "–")
                if c == "exact" and isinstance(r.get("exact", {}), dict):
                    v = "skipped" if "skipped" in r else ("yes" if r.get("exact", {}).get("ok") else f"NO {r.get('exact') or r.get('error', '')}")
                cells.append(str(v))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")

    table(res["latency"], ["key", "T", "us", "spread_us", "count_us", "split_us", "dispatch_us", "sweeps",
                           "polish_sweeps", "certified", "exact"],
          "Latency per layer (µs): the layer path (goal, decode_T, joint), then LayerBalancer variants")
    table(res["gather"], ["T", "static_us", "plan_us", "overhead_us", "graph", "exact", "error"],
          "Plan gather overhead (µs per call, CUDA graph): map1d[topk_ids] vs plan.apply_plan (E=256, top-8, W=16)")
    if small_m:
        L.extend([f"## Small-m grouped GEMM (calibration.json `small_m`): expert {small_m.get('expert_shape')}, "
                  "µs per layer on one rank", "",
                  "Linear fit per tokens-per-expert n over the active experts A: `us = fixed + per_expert * A`.", "",
                  "| dtype | method | n | per_expert_us | fixed_us | max_rel_dev | points (A: us) |",
                  "|---|---|---|---|---|---|---|"])
        for run in small_m.get("runs", []):
            for f in run.get("fit", []):
                pts = ", ".join(f"{p['experts']}: {p['us']}" for p in run["points"]
                                if p["tokens_per_expert"] == f["tokens_per_expert"])
                L.append(f"| {run['dtype']} | {run['method']} | {f['tokens_per_expert']} | {f['us_per_expert']} | "
                         f"{f['fixed_us']} | {f['max_rel_dev']} | {pts} |")
            if run.get("stopped"):
                L.append(f"| {run['dtype']} | {run['method']} | stopped: {run['stopped']} | | | | |")
        L.append("")
    table(res["floor"], ["grid", "kernels", "us", "cooperative_eager", "cooperative_capture", "error"], "Launch floor")
    table(res["count"], ["variant", "BT", "blocks", "us"], "Counting atomics")
    L.extend(["## CUDA graphs (capture, replay on a new batch, placement update, replay)", "",
              "| mode | captured | new batch | new placement |", "|---|---|---|---|"])
    for g in res["graphs"]:
        if "skipped" in g:
            L.append(f"| {g['mode']} | skipped | | |")
            continue
        ok = lambda s: "–" if s not in g else ("yes" if g[s]["ok"] else f"NO {g[s]}")  # noqa: E731
        L.append(f"| {g['mode']} | {g.get('captured')} | {ok('new batch')} | {ok('new placement')} |"
                 + (f" {g['error']}" if "error" in g else ""))
    return "\n".join(L) + "\n"


def sweep_study(seeds: int, md_path: str | None) -> None:
    """CPU study of the kernels' split (no GPU): sweeps to certify, and what each cap costs.

    Corpus: EPLB-like greedy placements (E=256, (R, redundant) in (16,32) (32,32) (16,64) (32,64)
    (64,64), Zipf 0.8/1.1), drifted batches of 256/4096/16384 tokens x top-8; truth: HiGHS.
    Quotas are the full split-round-polish (``FixedPointSteps(V1_SPEC)``) at each cap.
    """
    import dataclasses

    from moe_lb_kernels.reference import V1_SPEC, FixedPointSteps, split_fixed
    from sglang_moe_lb import solve_split
    from sglang_moe_lb.quota_dispatch import integer_lower_bound
    from sglang_moe_lb.testing.workloads import batch_topk, greedy_placement, zipf_popularity

    base = V1_SPEC
    caps = [1, 2, 3, 4, 6, 8, 16, 32]
    need, n = [], 0
    stats = {c: {"cert": 0, "gap": [], "over_bound": 0, "over_ceil_lp": 0} for c in caps}
    for seed in range(seeds):
        for R, red in ((16, 32), (32, 32), (16, 64), (32, 64), (64, 64)):
            for s_exp in (0.8, 1.1):
                gen = torch.Generator().manual_seed(1000 * seed + R + red + int(10 * s_exp))
                pop = zipf_popularity(256, gen, s_exp)
                pl = greedy_placement(pop, red, R)
                for T in (256, 4096, 16384):
                    c = torch.bincount(batch_topk(pop, T, 8, gen).reshape(-1).long(), minlength=256)
                    lp = float(pl.rank_loads(solve_split(pl, c, "highs")).max())
                    _, cert, sw = split_fixed(pl, c, dataclasses.replace(base, max_sweeps=64))
                    need.append(int(sw) if bool(cert) else 65)
                    n += 1
                    for cap in caps:
                        spec = dataclasses.replace(base, max_sweeps=cap)
                        qf, ok, _ = split_fixed(pl, c, spec)
                        q, _ = FixedPointSteps(spec).split_round(pl, c[None])
                        load = pl.rank_loads(q[0])
                        st = stats[cap]
                        st["cert"] += bool(ok)
                        st["gap"].append((float(pl.rank_loads(qf).max()) / 2 ** spec.scale_bits - lp) / max(lp, 1.0))
                        st["over_bound"] += int(load.max()) > int(integer_lower_bound(pl, c[None], load[None])[0])
                        st["over_ceil_lp"] += int(load.max()) - math.ceil(lp - 1e-9)
    lines = [f"Spec {base.name} (cap varied). Corpus: {n} batches (E=256, top-8; R/red 16/32, 32/32, 16/64, 32/64, "
             f"64/64; Zipf 0.8 and 1.1; T 256/4096/16384; {seeds} seed(s)). Truth: HiGHS.", "",
             "Sweeps needed to certify: " + ", ".join(f"{k}: {need.count(k)}" for k in sorted(set(need)))
             + " (65 = not within 64)", "",
             "| sweep cap | certified | split max vs HiGHS, relative excess: median / p99 / max | integer max "
             "above its prefix bound | integer max - ceil(LP), summed |", "|---|---|---|---|---|"]
    for cap in caps:
        st = stats[cap]
        g = sorted(st["gap"])
        p99 = g[min(len(g) - 1, int(0.99 * len(g)))]
        lines.append(f"| {cap} | {st['cert']}/{n} | {statistics.median(g):.1e} / {p99:.1e} / {g[-1]:.1e} | "
                     f"{st['over_bound']}/{n} | {st['over_ceil_lp']} |")
    text = "\n".join(lines)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out")
    ap.add_argument("--section", choices=SECTIONS)
    ap.add_argument("--partial-dir")
    ap.add_argument("--sweep-study", type=int, metavar="SEEDS", default=0,
                    help="CPU study of the split's sweeps and caps against HiGHS (no GPU); writes OUT/sweep_study.md")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--jobs", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.sweep_study:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
        sweep_study(args.sweep_study, os.path.join(args.out, "sweep_study.md") if args.out else None)
        return 0
    if not args.out or not args.partial_dir:
        ap.error("--out and --partial-dir are required for a section or --report")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.partial_dir, exist_ok=True)
    if args.report:
        return report(args.out, args.partial_dir, args.dry_run)
    if args.section is None:
        ap.error("--section or --report is required")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    out = {s: [] for s in SECTIONS}
    out["env"] = env_report(dev)
    budget = Budget(args.budget_s)
    log(f"section {args.section} on {dev} (budget {args.budget_s:.0f}s)")
    try:
        if args.section == "warm":
            section_warm(dev, args.dry_run, budget, out, args.jobs)
        else:
            globals()[f"section_{args.section}"](dev, args.dry_run, budget, out)
    finally:
        with open(os.path.join(args.partial_dir, f"{args.section}.json"), "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
