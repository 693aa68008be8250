"""Every kernel specialization the hot path launches compiles for a real GPU (sm_90), here on a
CPU-only machine, within a register/spill budget.

The launches of a layer path are recorded (not executed), then each distinct one goes through
Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin); ``cuobjdump`` reports
registers, the stack frame and the SASS, whose ``LDL``/``STL`` instructions are the spills
(cuobjdump's ``LOCAL`` stays 0 when ptxas spills to the stack: the stack is what to check).
Shapes: the goal shape (E=256, 32 redundant, R=32, 16k tokens), decode (2048 tokens), red=64 at
R=16/64. ``MOE_LB_AOT_FULL=1`` adds EP256 with 512 slots (the split kernel takes ~16 minutes to
compile there, with ~30 KB of stack: docs/kernels.md). ``MOE_LB_ALT_TRITON=DIR`` (a
``pip install --target DIR triton==3.6.0``, the H200 image's version) compiles with that Triton too.
"""

import os
import shutil

import pytest
import torch

import moe_lb_kernels.balancer as balancer_mod
from moe_lb_kernels import seam
from moe_lb_kernels.aot import compile_specs, record_specs, spec_key
from sglang_moe_lb import BalanceMode
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.testing.workloads import greedy_placement, zipf_popularity

from .helpers import kernel_path

GOAL, DECODE, RED64, EP256 = (256, 32, 32, 16384), (256, 32, 32, 2048), (256, 64, 16, 4096), (256, 256, 256, 2048)
# (shape (E, redundant, R, max_tokens), mode name)
CONFIGS = [
    (GOAL, "lplb/per-batch/local/tokens"),
    (GOAL, "lplb/per-batch/global/tokens"),
    (GOAL, "waterfill+lplb/per-batch/global/tokens/all_rank"),
    (RED64, "waterfill+lplb/per-batch/local/tokens/all_rank"),
    ((256, 64, 64, 256), "waterfill+lplb/per-batch/local/tokens/conservative"),
    ((256, 0, 32, 16384), "waterfill/conservative/global"),
    (DECODE, "lplb/per-batch/local/tokens"),
]
FULL = [(EP256, "lplb/per-batch/local/tokens")]
# (stack-frame bytes, LDL/STL instructions) allowed per kernel, by shape. Known spills pinned at
# today's level (docs/kernels.md): the split kernel at red=64 (its tl.sort over [32, 32] int64
# tiles: ~1 KB) and at EP256/512.
SMALL = (64, 32)
SPILL_LIMIT = {RED64: (1536, 1536), (256, 64, 64, 256): (1536, 1536), EP256: (40000, 300000)}
COST = CostModel(weight_bytes=1.0, flops_per_token=1.0, bandwidth=1.0, peak_flops=1.0, tile_tokens=128)


def _ptxas_available() -> bool:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path) or shutil.which("ptxas") is not None


def _placement(E, red, R):
    return greedy_placement(zipf_popularity(E, torch.Generator().manual_seed(0)), red, R)


def _drive(shape, name):
    """Build a path for the shape and run one call of its full token count (global: stats first)."""
    E, red, R, T = shape
    mode = BalanceMode.parse(name)
    pl = _placement(E, red, R)
    path = kernel_path(pl, mode, max_tokens=T, topk=8, source_rank=1, device="cpu", cost=COST)
    ids = torch.zeros(T, 8, dtype=torch.int32)
    phys = ids.clone() if mode.lplb == "off" else None
    if mode.collective:
        path.stats(ids, phys)
        W = (E if mode.lplb != "off" else R) + 1
        path(ids, gathered=torch.zeros(R, W, dtype=torch.int32), phys_ids=phys)
    else:
        path(ids, phys_ids=phys)


def _specs(configs):
    """(shape, mode name, spec) of every distinct launch the configs make, first config kept."""
    seen = {}
    for shape, name in configs:
        for s in record_specs(lambda: _drive(shape, name), (balancer_mod,)):
            seen.setdefault(spec_key(s), (shape, name, s))
    return list(seen.values())


def _check(items, results):
    rows, bad = [], []
    for (shape, name, _), r in zip(items, results):
        stack_lim, spill_lim = SPILL_LIMIT.get(shape, SMALL)
        rows.append(f"{seam.KERNELS_VERSION} {r.get('triton')} E={shape[0]} red={shape[1]} R={shape[2]} T={shape[3]} {name:52s} "
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
def test_specializations_compile_for_sm90():
    if not _ptxas_available():
        pytest.skip("Triton's bundled ptxas is not available")
    items = _specs(CONFIGS + (FULL if os.environ.get("MOE_LB_AOT_FULL") == "1" else []))
    assert len(items) >= 8
    _check(items, compile_specs([s for _, _, s in items], jobs=2))


@needs_aot[0]
@needs_aot[1]
@pytest.mark.skipif(not os.environ.get("MOE_LB_ALT_TRITON"), reason="set MOE_LB_ALT_TRITON to a second Triton's --target dir")
def test_compiles_with_a_second_triton():
    items = _specs(CONFIGS)
    results = compile_specs([s for _, _, s in items], pythonpath=os.environ["MOE_LB_ALT_TRITON"], jobs=2)
    assert {r["triton"] for r in results} != {__import__("triton").__version__}, "the second Triton was not used"
    _check(items, results)
