"""The layer-path contract: what one MoE layer on one rank needs per batch, and its CPU path.

A *layer path* is built at start-up (after model load, before CUDA-graph capture), updated in
place when the layer's placement changes, and called per batch:

* ``stats(topk_ids [T, k], phys_ids=None) -> int32 [stats_width]``: this rank's row for the
  global-sync all-gather (``chain.local_stats``);
* ``__call__(topk_ids [T, k], *, gathered=None [R, stats_width], phys_ids=None) -> LayerDispatch``
  (``chain.balance_layer``);
* ``update_placement(pl)``: in place; ``ValueError`` when a placement does not fit what was
  sized at build time (the caller then builds a new path);
* ``counters() -> dict``: diagnostics, read off the critical path.

An implementation is a class built as ``cls(pl, mode, *, max_tokens, topk, source_rank,
device, cost=None)`` (``BUILD_KEYWORDS``); ``make_layer_path`` is the one factory, and
``contract_problems`` checks a class against the contract. ``CoreLayerPath`` is the core's
chain with ``FLOAT_STEPS`` (the CPU path and the CUDA fallback: it may allocate and synchronise);
the Triton kernels' ``moe_lb_kernels.seam.KernelLayerPath`` is the preallocated, graph-safe one.
Which one serves a layer is the caller's choice (the SGLang plugin's ``hot_path.pick``).

A layer path runs an ungated mode (``path_mode``): a plan's gather never reaches it.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from .chain import LayerDispatch, balance_layer, local_stats
from .cost import CostModel
from .mode import BalanceMode
from .objective import FLOAT_STEPS
from .placement import Placement

__all__ = ["LayerPath", "CoreLayerPath", "make_layer_path", "path_mode", "contract_problems", "BUILD_KEYWORDS"]

BUILD_KEYWORDS = ("max_tokens", "topk", "source_rank", "device", "cost")
_METHODS = ("stats", "__call__", "update_placement", "counters")


@runtime_checkable
class LayerPath(Protocol):
    """One MoE layer on one rank (module docstring). ``mode``: the ungated mode it runs;
    ``max_tokens``: rows of ``topk_ids`` a call may see."""

    mode: BalanceMode
    max_tokens: int

    def stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor: ...

    def __call__(self, topk_ids: torch.Tensor, *, gathered: torch.Tensor | None = None,
                 phys_ids: torch.Tensor | None = None) -> LayerDispatch: ...

    def update_placement(self, pl: Placement) -> None: ...

    def counters(self) -> dict: ...


def contract_problems(cls: type) -> list[str]:
    """What keeps ``cls`` from being a layer-path class (empty when it is one): the methods of
    ``LayerPath`` and the build signature ``(pl, mode, *, max_tokens, topk, source_rank, device, cost)``."""
    out = [f"no method {m}" for m in _METHODS if not callable(getattr(cls, m, None))]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return [*out, "no inspectable constructor"]
    names = list(params)
    if names[:2] != ["pl", "mode"]:
        out.append(f"the constructor takes {names[:2]} first, not ['pl', 'mode']")
    missing = [k for k in BUILD_KEYWORDS if k not in params or params[k].kind is not inspect.Parameter.KEYWORD_ONLY]
    if missing:
        out.append(f"the constructor lacks the keyword-only {', '.join(missing)}")
    return out


class CoreLayerPath:
    """``LayerPath`` over the core's chain (``chain.balance_layer`` with ``FLOAT_STEPS``).

    Args:
        pl: single-layer placement (moved to ``device``). mode: the ungated mode to run.
        max_tokens: rows of ``topk_ids`` a call may see (informational here: the core path has
        no fixed buffers). topk: routed experts per token. source_rank: this rank in the EP
        group (0 without an a2a backend). cost: the cost model (tile objective).
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


def make_layer_path(pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int, device,
                    cost: CostModel | None = None, impl: type | None = None) -> LayerPath:
    """The one layer-path factory: ``impl`` (a class that meets the contract; default
    ``CoreLayerPath``) built for one layer on one rank. ``mode`` must be ungated (``path_mode``)."""
    cls = CoreLayerPath if impl is None else impl
    return cls(pl, mode, max_tokens=max_tokens, topk=topk, source_rank=source_rank, device=device, cost=cost)


def path_mode(mode: BalanceMode) -> BalanceMode | None:
    """The ungated mode a layer's path runs: the per-batch form where the gate opens; for a plan
    without a gate, Waterfill on the plan's ids (None without Waterfill: the plan needs no path)."""
    if mode.plan and not mode.gate:
        return BalanceMode(waterfill=mode.waterfill, waterfill_sync=mode.waterfill_sync) if mode.waterfill else None
    return mode.opened
