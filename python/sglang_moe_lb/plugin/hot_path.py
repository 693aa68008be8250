"""The single seam between the plugin and the per-batch math: one layer path per MoE layer.

A *layer path* (``LayerPath``, the contract in docs/usage.md and the kernels' ``seam.py``)
owns what one MoE layer needs per batch on one rank. It is built at start-up (after model
load, before CUDA-graph capture), updated in place at rebalance, and called per batch:

* ``stats(topk_ids, phys_ids=None)``: this rank's int32 row for the global-sync all-gather
  (``chain.local_stats``);
* ``__call__(topk_ids, *, gathered=None, phys_ids=None) -> LayerDispatch``
  (``chain.balance_layer``);
* ``update_placement(pl)``: in place (``ValueError`` when a placement does not fit the
  capacities chosen at build time: the caller rebuilds);
* ``counters()``: diagnostics read off the critical path.

``make_layer_path`` picks the implementation: on CUDA the kernel package's
``moe_lb_kernels.seam.make_layer_path`` when it is importable, else ``CoreLayerPath`` (the
core's torch chain with ``FLOAT_STEPS``; the CPU path and the CUDA fallback; it may allocate
and synchronise). ``graph_safety()`` is the start-up rule for CUDA graphs: they are allowed
only when the mode needs no layer path (a plan alone: one gather) or the kernel seam is
importable, runs the mode's per-batch form and sets ``CUDA_GRAPH_SAFE = True``.

A layer path runs an ungated mode (``runtime.path_mode``): plans never reach it.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from ..chain import LayerDispatch, balance_layer, local_stats
from ..cost import CostModel
from ..mode import BalanceMode
from ..objective import FLOAT_STEPS
from ..placement import Placement
from ..waterfill import fuse_topk

__all__ = ["LayerPath", "CoreLayerPath", "make_layer_path", "path_mode", "impl_name", "graph_safety", "fuse_topk",
           "KERNEL_MODULE"]

KERNEL_MODULE = "moe_lb_kernels.seam"  # sgl-kernel/python/moe_lb_kernels/seam.py


class LayerPath(Protocol):
    mode: BalanceMode
    max_tokens: int

    def stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor: ...

    def __call__(self, topk_ids: torch.Tensor, *, gathered: torch.Tensor | None = None,
                 phys_ids: torch.Tensor | None = None) -> LayerDispatch: ...

    def update_placement(self, pl: Placement) -> None: ...

    def counters(self) -> dict: ...


class CoreLayerPath:
    """``LayerPath`` over the core's chain (``chain.balance_layer`` with ``FLOAT_STEPS``).

    Args:
        pl: single-layer placement on ``device``. mode: what to do. max_tokens: rows of
        ``topk_ids`` a call may see (informational here: the core path has no fixed buffers).
        topk: routed experts per token. source_rank: this rank in the EP group (0 without an
        a2a backend). cost: the cost model (tile objective).
    """

    name = "core-torch"

    def __init__(self, pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int,
                 device, cost: CostModel | None = None):
        self.mode = mode
        self.max_tokens = int(max_tokens)
        self.topk = int(topk)
        self.source_rank = int(source_rank)
        self.device = torch.device(device)
        self.cost = cost
        self._calls = 0
        self._uncertified = 0
        self.pl = self._prepared(pl)

    def _prepared(self, pl: Placement) -> Placement:
        if not pl.single_layer:
            raise ValueError(f"a layer path needs a single-layer placement, got {pl}")
        if pl.phy2log.device != self.device:
            pl = pl.to(self.device)
        if pl.has_replicas:  # build the lazily derived structures now, off the forward path
            pl.replica_blocks  # noqa: B018
            if self.mode.waterfill == "all_rank" and self.mode.per_batch:
                pl.with_shared_expert.replica_blocks  # noqa: B018
        return pl

    def stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor:
        return local_stats(self.pl, topk_ids, self.mode, phys_ids=phys_ids)

    def __call__(self, topk_ids: torch.Tensor, *, gathered: torch.Tensor | None = None,
                 phys_ids: torch.Tensor | None = None) -> LayerDispatch:
        res = balance_layer(self.pl, topk_ids, self.mode, source_rank=self.source_rank, gathered=gathered,
                            phys_ids=phys_ids, cost=self.cost, steps=FLOAT_STEPS, check=False)
        self._calls += 1
        if not bool(res.certified):
            self._uncertified += 1
        return res

    def update_placement(self, pl: Placement) -> None:
        old = self.pl
        if (pl.num_physical, pl.num_ranks, pl.num_logical) != (old.num_physical, old.num_ranks, old.num_logical):
            raise ValueError(f"placement {pl} does not fit this layer path (built for {old})")
        self.pl = self._prepared(pl)

    def counters(self) -> dict:
        return {"calls": self._calls, "uncertified": self._uncertified}


def _kernel_module():
    """The kernel seam, or (None, why not)."""
    try:
        return importlib.import_module(KERNEL_MODULE), ""
    except ImportError as err:
        return None, f"{KERNEL_MODULE} is not importable ({type(err).__name__}: {err})"


def _kernels_for(mode: BalanceMode | None):
    """The kernel seam if it exists and runs ``mode``, and why not otherwise: (module | None, reason)."""
    mod, why = _kernel_module()
    if mod is None:
        return None, why
    if not callable(getattr(mod, "make_layer_path", None)):
        return None, f"{KERNEL_MODULE} provides no make_layer_path"
    supports = getattr(mod, "supports", None)
    if mode is not None and callable(supports):
        ok, reason = supports(mode)
        if not ok:
            return None, f"{KERNEL_MODULE} (kernels {getattr(mod, 'KERNELS_VERSION', '?')}) does not run {mode.name}: {reason}"
    return mod, ""


def make_layer_path(pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int, device,
                    cost: CostModel | None = None) -> LayerPath:
    """The layer path for ``device``: the kernel seam on CUDA where it runs ``mode``, else the core."""
    kw = dict(max_tokens=max_tokens, topk=topk, source_rank=source_rank, device=device, cost=cost)
    if torch.device(device).type == "cuda":
        mod, _ = _kernels_for(mode)
        if mod is not None:
            return mod.make_layer_path(pl, mode, **kw)
    return CoreLayerPath(pl, mode, **kw)


def impl_name(device, mode: BalanceMode | None = None) -> str:
    """Which implementation ``make_layer_path`` uses on ``device`` (for the start-up log line)."""
    if mode is not None:
        mode = path_mode(mode)
        if mode is None:
            return "none (the plan's gather only)"
    if torch.device(device).type == "cuda":
        mod, _ = _kernels_for(mode)
        if mod is not None:
            return f"{KERNEL_MODULE} (kernels {getattr(mod, 'KERNELS_VERSION', '?')})"
    return CoreLayerPath.name


def path_mode(mode: BalanceMode) -> BalanceMode | None:
    """The ungated mode a layer's path runs: the per-batch form where the gate opens; for a plan
    without a gate, Waterfill on the plan's ids (None without Waterfill: the plan needs no path)."""
    if mode.plan and not mode.gate:
        return BalanceMode(waterfill=mode.waterfill, waterfill_sync=mode.waterfill_sync) if mode.waterfill else None
    return mode.opened


def graph_safety(mode: BalanceMode | None = None) -> tuple[bool, str]:
    """Whether ``--moe-lb`` (in ``mode``) may run under CUDA graphs, and the reason when it may not.

    True when the mode needs no layer path (a plan alone: one gather into fixed maps), or when
    the kernel seam is importable, provides ``make_layer_path``, runs the mode's path (its
    ``supports``) and promises safety (``CUDA_GRAPH_SAFE is True``: no host sync or allocation
    per call, in-place updates)."""
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
