"""Every kernel specialization the hot path launches compiles for a real GPU (sm_90), here on a
CPU-only machine: the launches are recorded under the interpreter, then each distinct one goes
through Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin). Catches what the
interpreter does not check (constexpr globals, loop-carried types, layouts, register spills)."""

import os
import shutil

import pytest
import torch

from moe_lb_kernels import LayerBalancer
from moe_lb_kernels._launch import record_launches, spec_of
from moe_lb_kernels.aot import aot_compile_specs
from moe_lb_kernels.workload import greedy_placement, zipf_popularity

CONFIGS = [
    # (E, R, redundant, topk, max_tokens, mode, candidates, dynamic)
    (256, 32, 32, 8, 16384, "lplb", "all_rank", False),
    (256, 32, 32, 8, 16384, "lplb", "all_rank", True),
    (256, 16, 64, 8, 4096, "waterfill+lplb", "all_rank", False),
    (256, 64, 64, 8, 256, "waterfill+lplb", "conservative", False),
    (256, 32, 0, 8, 16384, "waterfill", "conservative", True),
    (256, 32, 0, 8, 16384, "lplb", "all_rank", False),  # no replicas: static map only
    (256, 32, 32, 8, 16384, "waterfill+lplb", "all_rank", False, "table"),  # rebalance-only split table
]


def _ptxas_available() -> bool:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path) or shutil.which("ptxas") is not None


def _placement(E, R, red, gen):
    return greedy_placement(zipf_popularity(E, gen), red, R)  # hot experts get up to ~24 copies


def recorded_launches():
    gen = torch.Generator().manual_seed(0)
    seen = {}
    for E, R, red, K, max_tokens, mode, cand, dyn, *split in CONFIGS:
        pl = _placement(E, R, red, gen)
        bal = LayerBalancer(pl, max_tokens, K, mode, "cpu", candidates=cand, source_rank=1, dynamic=dyn,
                            split=split[0] if split else "per_batch")
        ids = torch.randint(0, E, (3, K), dtype=torch.int32, generator=gen)
        phys = ids.clone() if mode == "waterfill" else None
        if mode == "waterfill":
            phys = pl.copy_order[0][pl.copy_start[0][ids.long()]].to(torch.int32)
        with record_launches() as rec:
            if dyn:
                row = bal.local_stats(ids, phys)
                bal(ids, phys_ids=phys, gathered=row.reshape(1, -1).repeat(R, 1))
            else:
                bal(ids, phys_ids=phys)
        for kernel, args, kwargs in rec:
            spec = spec_of(kernel, args, kwargs)
            key = repr((spec["name"], sorted(spec["signature"].items()), sorted(spec["constexprs"].items())))
            seen.setdefault(key, spec)
    return list(seen.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for real on the GPU itself")
@pytest.mark.skipif(os.environ.get("MOE_LB_SKIP_AOT") == "1", reason="MOE_LB_SKIP_AOT=1")
def test_all_specializations_compile_for_sm90():
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is not available")
    specs = recorded_launches()
    assert len(specs) >= 8
    results = aot_compile_specs(specs, arch=90)
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed[0].get("error")
    for r in results:
        assert r["shared"] < 200_000, r["name"]  # fits an SM's shared memory
        assert r.get("local", 0) == 0, (r["name"], r.get("regs"))  # no register spills
