"""One MoE layer's state in a scheduler, and how it is built and follows placements.

``LayerState`` holds what a layer serves (its placement row, the plan's maps, its layer path)
and the one decision that passes from the dispatch hook to the ``TopK`` Waterfill hook of the
same layer and batch (``pending_shared``). ``LayerBuild`` carries the few per-process values a
layer is built from (shapes, device, cost model, plan levels) and builds, re-places and grows
layers; which layer-path class serves is ``hot_path.pick``'s choice, the build the core's
``layer_path.make_layer_path``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cost import CostModel
from ..layer_path import LayerPath, make_layer_path
from ..mode import BalanceMode
from ..placement import Placement
from ..plan import plan_maps, static_like_weights
from . import hot_path

__all__ = ["HOME", "LayerState", "LayerBuild"]

HOME = "home"  # a pending Waterfill decision: the gate was closed, the shared expert stays on its rank


@dataclass
class LayerState:
    """One MoE layer and what it was built from.

    path: the per-batch ``LayerPath`` or None (a plan alone). row: the CPU physical->logical row
    being served. placement: the single-layer ``Placement`` on the serving device. maps: the
    plan's ``[levels, E, W]`` map on the device (plan schedule) or None. source: where the
    maps came from (``even`` until a solve installs, then the solve's label). pending_shared:
    Waterfill's shared rank per token ``[T]`` (long) decided with this batch's split, or ``HOME``
    (gate closed), set by the dispatch hook and taken once by the ``TopK`` Waterfill hook.
    """

    path: LayerPath | None
    row: torch.Tensor
    placement: Placement
    maps: torch.Tensor | None = None
    source: str = "even"
    pending_shared: torch.Tensor | str | None = None

    def take_shared(self) -> torch.Tensor | str | None:
        """The pending Waterfill decision (a ``[T]`` tensor, ``HOME`` or None), cleared."""
        got, self.pending_shared = self.pending_shared, None
        return got


@dataclass
class LayerBuild:
    """What this process's layers are built from.

    mode: the ungated mode of the layer paths (``layer_path.path_mode``; None: no path). plan:
    whether layers carry plan maps. num_ranks / num_logical: the EP group and routed experts.
    device: the serving device. topk, max_tokens: the shape a path is sized for.
    source_rank: this rank (0 without an a2a backend). cost: the cost model or None.
    levels, hash_slots: the plans' batch-size levels and hash slots.
    """

    mode: BalanceMode | None
    plan: bool
    num_ranks: int
    num_logical: int
    device: torch.device
    topk: int
    max_tokens: int
    source_rank: int
    cost: CostModel | None
    levels: tuple[int, ...]
    hash_slots: int

    def placement(self, row_cpu: torch.Tensor) -> Placement:
        return Placement(row_cpu.to(self.device), self.num_ranks, self.num_logical)

    def path(self, pl: Placement) -> LayerPath | None:
        if self.mode is None:
            return None
        return make_layer_path(pl, self.mode, max_tokens=max(1, self.max_tokens), topk=self.topk or 1,
                               source_rank=self.source_rank, device=self.device, cost=self.cost,
                               impl=hot_path.pick(self.device, self.mode))

    def even_maps(self, pl: Placement) -> torch.Tensor:
        """``[levels, E, W]`` int32 on the device: the plan that uses every copy evenly (before a solve)."""
        w = static_like_weights(pl.to("cpu"), self.levels, self.hash_slots)  # [B, 1, P]
        return plan_maps(pl.to("cpu"), w, self.hash_slots)[:, 0].to(device=self.device, dtype=torch.int32)

    def layer(self, row_cpu: torch.Tensor) -> LayerState:
        pl = self.placement(row_cpu)
        return LayerState(self.path(pl), row_cpu.clone(), pl, self.even_maps(pl) if self.plan else None, "even")

    def follow(self, st: LayerState, row_cpu: torch.Tensor) -> str | None:
        """Serve a new placement row in place (the even plan until a solve arrives). Returns why
        the layer path had to be rebuilt (it did not fit), else None."""
        pl = self.placement(row_cpu)
        rebuilt = None
        if st.path is not None:
            try:
                st.path.update_placement(pl)
            except ValueError as err:
                rebuilt, st.path = str(err), self.path(pl)
        if st.maps is not None:
            st.maps.copy_(self.even_maps(pl))  # same storage: what captured graphs read
        st.row, st.placement, st.source = row_cpu.clone(), pl, "even"
        return rebuilt
