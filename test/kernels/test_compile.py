"""Every kernel specialization the hot path launches compiles for a real GPU (sm_90), here on a
CPU-only machine, within a register/spill budget.

The launches of a layer path are recorded (not executed), then each distinct one goes through
Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin); ``cuobjdump`` reports
registers, the stack frame and the SASS, whose ``LDL``/``STL`` instructions are the spills
(cuobjdump's ``LOCAL`` stays 0 when ptxas spills to the stack: the stack is what to check).
Shapes: the goal shape (E=256, 32 redundant, R=32, 16k tokens), decode sizes (up to 2048
tokens: v2's one-launch path), red=64 at R=16/64, EP256 with 512 slots (decode), for the v1.1
and v2 kernel sets. ``MOE_LB_AOT_FULL=1`` adds v1 at EP256/512 (its split kernel takes ~16
minutes to compile there, with ~30 KB of stack: docs/kernels-v2.md) and more v2 modes;
``MOE_LB_ALT_TRITON=DIR``
(a ``pip install --target DIR triton==3.6.0``, the H200 image's version) compiles the v2 set
with that Triton too.
"""

import os
import shutil

import pytest
import torch

import moe_lb_kernels.balancer as balancer_mod
from moe_lb_kernels import seam
from moe_lb_kernels.aot import compile_specs, record_specs, spec_key
from moe_lb_kernels.v2 import make_layer_path as v2_path
from moe_lb_kernels.v2 import seam as v2_seam
from moe_lb_kernels.workload import greedy_placement, zipf_popularity
from sglang_moe_lb import BalanceMode
from sglang_moe_lb.cost import CostModel

GOAL, DECODE, RED64, EP256 = (256, 32, 32, 16384), (256, 32, 32, 2048), (256, 64, 16, 4096), (256, 256, 256, 2048)
# (shape (E, redundant, R, max_tokens), mode name)
V1 = [
    (GOAL, "lplb/per-batch/local/tokens"),
    (GOAL, "lplb/per-batch/global/tokens"),
    (GOAL, "waterfill+lplb/table/all_rank/local"),
    (RED64, "waterfill+lplb/per-batch/local/tokens/all_rank"),
    ((256, 64, 64, 256), "waterfill+lplb/per-batch/local/tokens/conservative"),
    ((256, 0, 32, 16384), "waterfill/conservative/global"),
    (DECODE, "lplb/per-batch/local/tokens"),
]
V1_FULL = [(EP256, "lplb/per-batch/local/tokens")]
V2 = [
    (GOAL, "lplb/per-batch/local/tokens"),
    (GOAL, "waterfill+lplb/per-batch/global/tiles/all_rank"),
    (GOAL, "waterfill+lplb/table/conservative/global"),
    (GOAL, "waterfill/all_rank/local"),
    (RED64, "lplb/per-batch/local/tokens"),
    (DECODE, "waterfill+lplb/per-batch/local/tokens/all_rank"),
    (DECODE, "waterfill/conservative/local"),
    (EP256, "lplb/per-batch/local/tokens"),
]
V2_FULL = [
    (GOAL, "lplb/per-batch/global/tokens"),
    (GOAL, "lplb/per-batch/local/tiles"),
    (DECODE, "lplb/per-batch/local/tiles"),
    (EP256, "lplb/per-batch/global/tokens"),
    (EP256, "waterfill+lplb/per-batch/global/tokens/all_rank"),
]
# (stack-frame bytes, LDL/STL instructions) allowed per kernel, by (set, shape). Known spills
# pinned at today's level (docs/kernels-v2.md): v1's split kernel at red=64 (its tl.sort over
# [32, 32] int64 tiles: ~1 KB), v2 at EP256/512 (64 replicated rows x 128 copies).
SMALL = (64, 32)
SPILL_LIMIT = {("v1.1", RED64): (1536, 1536), ("v1.1", (256, 64, 64, 256)): (1536, 1536),
               ("v1.1", EP256): (40000, 300000), ("v2", EP256): (2048, 1536)}
COST = CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1.0, peak_flops=1.0, tile_tokens=128)


def _ptxas_available() -> bool:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path) or shutil.which("ptxas") is not None


def _placement(E, red, R):
    return greedy_placement(zipf_popularity(E, torch.Generator().manual_seed(0)), red, R)


def _drive(make, shape, name):
    """Build a path for the shape and run one call of its full token count (global: stats first)."""
    E, red, R, T = shape
    mode = BalanceMode.parse(name)
    pl = _placement(E, red, R)
    path = make(pl, mode, max_tokens=T, topk=8, source_rank=1, device="cpu", cost=COST)
    ids = torch.zeros(T, 8, dtype=torch.int32)
    phys = ids.clone() if mode.lplb == "off" else None
    if mode.collective:
        path.stats(ids, phys)
        W = (E if mode.lplb != "off" else R) + 1
        path(ids, gathered=torch.zeros(R, W, dtype=torch.int32), phys_ids=phys)
    else:
        path(ids, phys_ids=phys)


def _specs(configs, make_path, module):
    """(shape, mode name, spec) of every distinct launch the configs make, first config kept."""
    seen = {}
    for shape, name in configs:
        for s in record_specs(lambda: _drive(make_path, shape, name), (module,)):
            seen.setdefault(spec_key(s), (shape, name, s))
    return list(seen.values())


def _v1_specs(configs):
    return _specs(configs, seam.kernel_set("v1.1").make_layer_path, balancer_mod)


def _v2_specs(configs):
    return _specs(configs, v2_path, v2_seam)


def _check(items, results, label):
    rows, bad = [], []
    for (shape, name, _), r in zip(items, results):
        stack_lim, spill_lim = SPILL_LIMIT.get((label, shape), SMALL)
        rows.append(f"{label} {r.get('triton')} E={shape[0]} red={shape[1]} R={shape[2]} T={shape[3]} {name:52s} "
                    f"{r['name']:18s} regs={r.get('regs')} stack={r.get('stack')} spill_ops={r.get('spill_ops')} "
                    f"sass={r.get('sass')} {r['seconds']}s")
        if not r["ok"]:
            bad.append(f"{rows[-1]}: {r.get('error', '')[-1500:]}")
        elif r["shared"] >= 200_000 or r.get("stack", 0) > stack_lim or r.get("spill_ops", 0) > spill_lim:
            bad.append(f"{rows[-1]}: over budget (stack <= {stack_lim}, spill_ops <= {spill_lim}, shared < 200000)")
    print("\n".join(rows))  # the register report (pytest -s)
    assert not bad, "\n".join(bad)


needs_aot = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for real on the GPU itself"),
    pytest.mark.skipif(os.environ.get("MOE_LB_SKIP_AOT") == "1", reason="MOE_LB_SKIP_AOT=1"),
]


@needs_aot[0]
@needs_aot[1]
def test_v1_specializations_compile_for_sm90():
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is not available")
    items = _v1_specs(V1 + (V1_FULL if os.environ.get("MOE_LB_AOT_FULL") == "1" else []))
    assert len(items) >= 8
    _check(items, compile_specs([s for _, _, s in items], jobs=2), "v1.1")


@needs_aot[0]
@needs_aot[1]
def test_v2_specializations_compile_for_sm90():
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is not available")
    items = _v2_specs(V2 + (V2_FULL if os.environ.get("MOE_LB_AOT_FULL") == "1" else []))
    assert len(items) >= 12
    _check(items, compile_specs([s for _, _, s in items], jobs=2), "v2")


@needs_aot[0]
@needs_aot[1]
@pytest.mark.skipif(not os.environ.get("MOE_LB_ALT_TRITON"), reason="set MOE_LB_ALT_TRITON to a second Triton's --target dir")
def test_v2_compiles_with_a_second_triton():
    items = _v2_specs(V2)
    results = compile_specs([s for _, _, s in items], pythonpath=os.environ["MOE_LB_ALT_TRITON"], jobs=2)
    assert {r["triton"] for r in results} != {__import__("triton").__version__}, "the second Triton was not used"
    _check(items, results, "v2")
