"""Triton kernels for sglang-moe-lb's per-batch hot path (import name ``moe_lb_kernels``).

``LayerBalancer`` is the per-layer entry (preallocated, CUDA-graph capturable). Each kernel
mirrors a core function, which stays the CPU path; ``reference`` holds the torch references
the kernels match bit for bit. See docs/kernels.md.
"""

from .balancer import LayerBalancer
from .reference import DEFAULT_SWEEPS, balance_layer_ref, quotas_ref, split_fixed

__all__ = ["LayerBalancer", "DEFAULT_SWEEPS", "balance_layer_ref", "quotas_ref", "split_fixed", "available"]


def available() -> bool:
    """True when the kernels can run here: CUDA with Triton (or the Triton interpreter)."""
    import os

    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
