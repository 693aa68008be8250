"""Which layer path serves a MoE layer: the plugin picks, the core builds.

The contract (``LayerPath``), the CPU path (``CoreLayerPath``) and the one factory
(``make_layer_path``) live in the core's ``sglang_moe_lb.layer_path``. Here only the choice:

* ``pick(device, mode)``: on CUDA the kernel package's ``moe_lb_kernels.seam.KernelLayerPath``
  when it is importable, meets the contract and runs the mode (``seam.supports``); else
  ``CoreLayerPath`` (the CPU path and the CUDA fallback; it may allocate and synchronise);
* ``graph_safety(mode)``: the start-up rule for CUDA graphs: allowed only when the mode needs
  no layer path (a plan alone: one gather) or the kernels run the mode's path and promise
  safety (``CUDA_GRAPH_SAFE = True``);
* ``impl_name``: what the start-up log line and ``doctor`` print.
"""

from __future__ import annotations

import importlib

import torch

from ..layer_path import CoreLayerPath, contract_problems, path_mode
from ..mode import BalanceMode

__all__ = ["pick", "impl_name", "graph_safety", "KERNEL_MODULE", "KERNEL_CLASS"]

KERNEL_MODULE = "moe_lb_kernels.seam"  # sgl-kernel/python/moe_lb_kernels/seam.py
KERNEL_CLASS = "KernelLayerPath"


def _kernel_module():
    """The kernel seam, or (None, why not)."""
    try:
        return importlib.import_module(KERNEL_MODULE), ""
    except ImportError as err:
        return None, f"{KERNEL_MODULE} is not importable ({type(err).__name__}: {err})"


def _kernels_for(mode: BalanceMode | None):
    """The kernel seam if it exists, meets the contract and runs ``mode``: (module | None, why not)."""
    mod, why = _kernel_module()
    if mod is None:
        return None, why
    cls = getattr(mod, KERNEL_CLASS, None)
    if not isinstance(cls, type):
        return None, f"{KERNEL_MODULE} provides no {KERNEL_CLASS}"
    problems = contract_problems(cls)
    if problems:
        return None, f"{KERNEL_MODULE}.{KERNEL_CLASS} does not meet the layer-path contract: {'; '.join(problems)}"
    supports = getattr(mod, "supports", None)
    if mode is not None and callable(supports):
        ok, reason = supports(mode)
        if not ok:
            return None, f"{KERNEL_MODULE} (kernels {getattr(mod, 'KERNELS_VERSION', '?')}) does not run {mode.name}: {reason}"
    return mod, ""


def pick(device, mode: BalanceMode) -> type:
    """The layer-path class for ``mode`` (ungated: ``layer_path.path_mode``) on ``device``."""
    if torch.device(device).type == "cuda":
        mod, _ = _kernels_for(mode)
        if mod is not None:
            return getattr(mod, KERNEL_CLASS)
    return CoreLayerPath


def impl_name(device, mode: BalanceMode | None = None) -> str:
    """Which implementation ``pick`` chooses on ``device`` (for the start-up log line)."""
    if mode is not None:
        mode = path_mode(mode)
        if mode is None:
            return "none (the plan's gather only)"
    if torch.device(device).type == "cuda":
        mod, _ = _kernels_for(mode)
        if mod is not None:
            return f"{KERNEL_MODULE} (kernels {getattr(mod, 'KERNELS_VERSION', '?')})"
    return CoreLayerPath.name


def graph_safety(mode: BalanceMode | None = None) -> tuple[bool, str]:
    """Whether ``--moe-lb`` (in ``mode``) may run under CUDA graphs, and the reason when it may not.

    True when the mode needs no layer path (a plan alone: one gather into fixed maps), or when
    the kernel seam is importable, its ``KernelLayerPath`` meets the contract, it runs the
    mode's path (its ``supports``) and promises safety (``CUDA_GRAPH_SAFE is True``: no host
    sync or allocation per call, in-place updates)."""
    if mode is not None:
        mode = path_mode(mode)
        if mode is None:
            return True, ""
    mod, why = _kernels_for(mode)
    if mod is None:
        return False, (f"the per-batch path would be the core's torch reference, which synchronises with the host "
                       f"in every MoE layer and cannot be captured ({why})")
    if getattr(mod, "CUDA_GRAPH_SAFE", False) is not True:
        version = getattr(mod, "KERNELS_VERSION", "?")
        return False, f"{KERNEL_MODULE} (kernels {version}) does not promise CUDA-graph safety (CUDA_GRAPH_SAFE is not True)"
    return True, ""
