"""The single seam between the plugin and the per-batch math.

Every per-batch call the plugin makes goes through ``impl(device)``, which returns the
functions for that device:

* ``balance_layer(pl, topk_ids, **kw) -> LayerDispatch`` (signature of ``joint.balance_layer``)
* ``local_stats(topk_ids, num_logical, num_ranks, slots_per_rank, phys_ids=None)``
* ``fuse_topk(phys_ids, weights, shared_rank, slots_per_rank, shared_weight)``

The core's torch functions are the reference and the CPU path. The kernel package
(import name ``moe_lb_kernels``, distribution ``sglang-moe-lb-kernels``; its module
``moe_lb_kernels.seam``) becomes the CUDA path by exporting any of these three names with the same signature and semantics; the ones
it does not export stay on the core. If it also sets ``CUDA_GRAPH_SAFE = True``, it promises
that all three run without host synchronisation and read plans through fixed tensor
addresses, and the start-up check then allows ``--moe-lb`` with CUDA graphs. (On an H200 the
core path synchronises with the host in every call but ``fuse_topk``, so CUDA-graph capture
fails: see docs/usage.md.) To swap the implementation, change
``impl`` (or ``KERNEL_MODULE``): nothing else in the plugin names a per-batch function.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from ..joint import balance_layer as _core_balance_layer
from ..joint import local_stats as _core_local_stats
from ..waterfill import fuse_topk as _core_fuse_topk

__all__ = ["impl", "kernels_graph_safe", "KERNEL_MODULE"]

KERNEL_MODULE = "moe_lb_kernels.seam"  # sgl-kernel/python/moe_lb_kernels/seam.py
_NAMES = ("balance_layer", "local_stats", "fuse_topk")
_CORE = SimpleNamespace(
    name="core-torch",
    balance_layer=_core_balance_layer,
    local_stats=_core_local_stats,
    fuse_topk=_core_fuse_topk,
)
_cache: dict[str, SimpleNamespace] = {}


def _kernel_module():
    try:
        return importlib.import_module(KERNEL_MODULE)
    except ImportError:
        return None


def impl(device: torch.device | str) -> SimpleNamespace:
    """The per-batch functions for ``device``: kernels on CUDA where provided, else the core."""
    dev_type = torch.device(device).type
    got = _cache.get(dev_type)
    if got is not None:
        return got
    got = _CORE
    if dev_type == "cuda":
        mod = _kernel_module()
        provided = {n: getattr(mod, n) for n in _NAMES if mod is not None and callable(getattr(mod, n, None))}
        if provided:
            got = SimpleNamespace(name=f"{KERNEL_MODULE}+core", **{n: provided.get(n, getattr(_CORE, n)) for n in _NAMES})
    _cache[dev_type] = got
    return got


def kernels_graph_safe() -> bool:
    """Whether the kernel package provides all three functions and promises CUDA-graph safety."""
    mod = _kernel_module()
    return bool(
        mod is not None
        and all(callable(getattr(mod, n, None)) for n in _NAMES)
        and getattr(mod, "CUDA_GRAPH_SAFE", False)
    )
