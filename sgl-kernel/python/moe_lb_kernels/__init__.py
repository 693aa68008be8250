"""Triton kernels for sglang-moe-lb's per-batch hot path (import name ``moe_lb_kernels``).

``seam.KernelLayerPath`` implements the core's layer-path contract (``sglang_moe_lb.layer_path``;
one preallocated, CUDA-graph capturable path per MoE layer; one kernel set, v1.1, of the
lineage an H200 verified); the SGLang plugin picks it on CUDA.
``LayerBalancer`` is its per-layer engine. Each kernel mirrors a core function, which stays
the CPU path; ``reference`` is the core's chain with the kernels' fixed-point arithmetic,
which the kernels match bit for bit. See docs/kernels.md.
"""

from .balancer import LayerBalancer
from .reference import DEFAULT_SWEEPS, V1_SPEC, reference_layer, split_fixed

__all__ = ["LayerBalancer", "DEFAULT_SWEEPS", "V1_SPEC", "reference_layer", "split_fixed", "available"]


def available() -> bool:
    """True when the kernels can run here: CUDA with Triton (or the Triton interpreter)."""
    import os

    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
