"""GPU check of the plugin's per-batch hot path (not a pytest file; needs CUDA, no SGLang).

Run from the repository root: ``python test/plugin/gpu_hot_path_check.py``. For each call the
forward path makes through a layer path (the class ``plugin.hot_path.pick`` chooses on CUDA: the
kernels where ``moe_lb_kernels`` runs the mode, else the core's torch chain), on a
DeepSeek-V3-sized layer (256 experts + 32 redundant, 16 EP ranks, top-8):

1. host synchronisations (``torch.cuda.set_sync_debug_mode``), which break CUDA-graph capture;
2. whether the call can be captured in a CUDA graph and replayed to the same result;
3. eager time per call.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

import torch  # noqa: E402

from sglang_moe_lb import BalanceMode, CoreLayerPath, Placement, fuse_topk, make_layer_path  # noqa: E402
from sglang_moe_lb.plugin import hot_path  # noqa: E402

E, RED, R, K = 256, 32, 16, 8
P = E + RED
S = P // R


def make_case(T: int, dev):
    g = torch.Generator().manual_seed(0)
    skew = torch.linspace(4.0, 0.3, E)
    p2l = torch.cat([torch.arange(E), torch.multinomial(skew, RED, replacement=False, generator=g)])
    p2l = p2l[torch.randperm(P, generator=g)]
    pl = Placement(p2l.to(dev), R, E)
    pl.replica_blocks  # noqa: B018
    pl.with_shared_expert.replica_blocks  # noqa: B018
    ids = torch.stack([torch.multinomial(skew, K, replacement=False, generator=g) for _ in range(T)]).to(dev)
    return pl, ids.to(torch.int32)


# Plans need no layer path (one gather into fixed maps: benchmark/gpu_check.sh's "gather" step).
MODES = ["waterfill/conservative/local", "waterfill/all_rank/local", "waterfill/conservative/global",
         "lplb/per-batch/local/tokens", "lplb/per-batch/global/tokens", "waterfill+lplb/per-batch/global/tokens/all_rank"]


def calls(pl, ids) -> dict:
    """name -> zero-argument call of one layer path (or ``fuse_topk``), as rank 3 of R."""
    dev = ids.device
    phys = CoreLayerPath(pl, BalanceMode.parse("lplb/per-batch/local/tokens"), max_tokens=ids.shape[0],
                         topk=K, source_rank=0, device=dev)(ids).phys_ids
    w = torch.rand(ids.shape, device=dev)
    shared = torch.zeros(ids.shape[0], dtype=torch.long, device=dev)
    out = {"fuse_topk": lambda: fuse_topk(phys, w, shared, S, 0.4)[0]}
    for name in MODES:
        mode = BalanceMode.parse(name)
        path = make_layer_path(pl, mode, max_tokens=ids.shape[0], topk=K, source_rank=3, device=dev,
                               impl=hot_path.pick(dev, mode))
        kw = {"phys_ids": phys} if mode.lplb == "off" else {}
        gathered = None
        if mode.collective:
            gathered = torch.stack([path.stats(ids.roll(r, 0), phys.roll(r, 0) if kw else None) for r in range(R)])
        pick = (lambda res: res.shared_rank) if mode.lplb == "off" else (lambda res: res.phys_ids)
        out[name] = (lambda p=path, g=gathered, k=kw, f=pick: f(p(ids, gathered=g, **k)))
        out[f"{name} stats"] = (lambda p=path, k=kw: p.stats(ids, k.get("phys_ids")))
    return out


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in got)


def try_graph(fn) -> str:
    try:
        ref = fn()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up on a side stream, as CUDA-graph capture requires
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        graph.replay()
        torch.cuda.synchronize()
        return "ok" if torch.equal(out, ref) else "captured, but replay differs"
    except Exception as err:  # noqa: BLE001
        return f"fails: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def time_ms(fn, reps=5) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def main():
    dev = torch.device("cuda")
    impl = {name: hot_path.impl_name(dev, BalanceMode.parse(name)) for name in MODES}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "impl": impl, "cases": {}}
    for T in (4096, 128):
        pl, ids = make_case(T, dev)
        case = {name: {"host_syncs": count_syncs(fn), "ms": round(time_ms(fn), 3)}
                for name, fn in calls(pl, ids).items()}
        report["cases"][f"T={T}"] = case
        print(f"T={T}", json.dumps(case), flush=True)
    # Capture attempts last: a failed capture can leave the CUDA context unusable.
    graphs = {}
    fns = calls(pl, ids)
    for name in ["fuse_topk"] + [n for n in fns if n != "fuse_topk"]:
        graphs[name] = try_graph(fns[name])
        print("cuda_graph", name, graphs[name], flush=True)
    report["cuda_graph_T128"] = graphs
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_hot_path.json"), "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
