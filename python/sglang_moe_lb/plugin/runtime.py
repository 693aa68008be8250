"""Per-scheduler-process state of the plugin: the options, one plan per MoE layer, and the
bookkeeping that keeps every EP rank's collectives in step.

A ``LayerPlan`` pairs the placement SGLang is serving for a layer (a core ``Placement``
built from ``ExpertLocationMetadata.physical_to_logical_map_cpu[layer]``) with the split
table for ``rebalance-only`` LPLB. Plans are replaced whole (one dict assignment per
layer), so the forward path always sees a placement and a table that belong together.
The placement follows SGLang's metadata in lockstep (hooked at ``ExpertLocationMetadata.update``):
a token must never be sent to a slot that no longer holds its expert. Tables follow later,
from the background solve (``rebalance.py``).

Nothing here decides anything about balancing: each per-batch decision is one call into
``hot_path.impl(device)`` (the core's ``joint.balance_layer`` and friends).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from ..lp_split import scenario_split
from ..placement import Placement
from . import comm, hot_path
from .options import ERRORS, MoeLbConfigError, MoeLbOptions

__all__ = ["LayerPlan", "Runtime", "get_runtime", "activate", "deactivate"]

logger = logging.getLogger("sglang_moe_lb.plugin")

_RUNTIME: "Runtime | None" = None
_LOCK = threading.Lock()


def get_runtime() -> "Runtime | None":
    """The active runtime of this process, or None (plugin off / not a scheduler)."""
    return _RUNTIME


@dataclass(frozen=True)
class LayerPlan:
    """What the forward path needs for one layer, installed atomically.

    placement: single-layer core ``Placement`` on the serving device.
    row: the CPU physical->logical row it was built from (identity checks).
    table: ``[P]`` float64 split fractions for rebalance-only LPLB (device), or None.
    source: ``"even"``, ``"scenario"`` (HiGHS over a recorded window) or ``"startup-scenario"``.
    """

    placement: Placement
    row: torch.Tensor
    table: torch.Tensor | None
    source: str = "even"


@dataclass
class _Counters:
    joined: dict = field(default_factory=dict)  # layer -> collectives done by the TopK path, not yet matched


class Runtime:
    """The plugin's state in one scheduler process (see module docstring)."""

    def __init__(self, opts: MoeLbOptions, *, rank_invariant: bool):
        self.opts = opts
        # No a2a backend: every EP rank runs the MoE over the same tokens and must pick the
        # same copy for each of them; counts are then already global and no collective runs.
        self.rank_invariant = rank_invariant
        self.plans: dict[int, LayerPlan] = {}
        self.num_logical = self.num_ranks = self.slots_per_rank = None
        self.device: torch.device | None = None
        self.attached = False
        self.moe_layers: set[int] = set()  # layers with a (non-draft) TopK; empty = unknown, all layers
        self.stash: dict[int, torch.Tensor] = {}
        self._counters = _Counters()
        self._ep: comm.EpGroup | None = None
        self._warned: set[str] = set()
        self.rebalancer = None  # set by rebalance.Rebalancer when LPLB tables are used
        self.last_report: dict | None = None

    # -- topology ------------------------------------------------------------------------
    @property
    def ep(self) -> comm.EpGroup:
        if self._ep is None:
            self._ep = comm.current_ep_group()
        return self._ep

    @property
    def collective_per_layer(self) -> bool:
        """Whether every MoE layer runs one EP collective on every rank in this mode."""
        return (self.opts.per_batch and not self.rank_invariant) or self.opts.dynamic_waterfill

    def warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("[moe-lb] " + msg, *args)

    # -- plans ---------------------------------------------------------------------------
    def _plan_for_row(self, row_cpu: torch.Tensor, table: torch.Tensor | None = None, source: str = "even") -> LayerPlan:
        pl = Placement(row_cpu.to(self.device), self.num_ranks, self.num_logical)
        # Build the lazily derived structures now, off the forward path.
        if pl.has_replicas:
            pl.replica_blocks  # noqa: B018
            if self.opts.joint and self.opts.waterfill_candidates == "all_rank":
                pl.with_shared_expert.replica_blocks  # noqa: B018
        if table is None and self.opts.lplb and not self.opts.per_batch:
            # The even split (every copy gets the same share) is the scenario LP with no scenarios.
            table = scenario_split(pl, torch.zeros(0, self.num_logical))
            source = "even"
        if table is not None:
            table = table.to(device=self.device, dtype=torch.float64)
        return LayerPlan(pl, row_cpu.clone(), table, source)

    def attach_metadata(self, metadata) -> None:
        """(Re)build every layer's plan from SGLang's expert-location metadata."""
        p2l = metadata.physical_to_logical_map_cpu
        self.num_logical = int(metadata.num_logical_experts)
        self.num_ranks = int(metadata.ep_size)
        self.slots_per_rank = int(metadata.num_local_physical_experts)
        self.device = metadata.physical_to_logical_map.device
        plans = {}
        for layer in range(p2l.shape[0]):
            old = self.plans.get(layer)
            if old is not None and torch.equal(old.row, p2l[layer]):
                plans[layer] = old
            else:
                plans[layer] = self._plan_for_row(p2l[layer])
        self.plans = plans
        self.attached = True

    def set_placement(self, layer: int, row_cpu: torch.Tensor) -> bool:
        """Follow SGLang's placement of one layer; keeps the plan if the row is unchanged."""
        old = self.plans.get(layer)
        if old is not None and torch.equal(old.row, row_cpu):
            return False
        self.plans[layer] = self._plan_for_row(row_cpu)
        return True

    def install_table(self, layer: int, row_cpu: torch.Tensor, table: torch.Tensor, source: str) -> bool:
        """Install a solved table if its layer still serves the placement it was solved for."""
        old = self.plans.get(layer)
        if old is None or not torch.equal(old.row, row_cpu):
            return False
        self.plans[layer] = LayerPlan(old.placement, old.row, table.to(device=self.device, dtype=torch.float64), source)
        return True

    # -- the forward path ----------------------------------------------------------------
    def _mask_padded(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Rows past the batch's real tokens (graph padding) route nowhere: -1."""
        try:
            from sglang.srt.model_executor.forward_context import get_forward_context, has_forward_context
        except ImportError:  # pragma: no cover
            return topk_ids
        if not has_forward_context():
            return topk_ids
        getter = get_forward_context().moe_num_token_non_padded
        n = getter() if getter is not None else None
        if n is None:
            return topk_ids
        rows = torch.arange(topk_ids.shape[0], device=topk_ids.device)
        return torch.where((rows < n)[:, None], topk_ids, torch.full_like(topk_ids, -1))

    def collective(self, layer: int, row: torch.Tensor) -> torch.Tensor:
        """The layer's one EP all-gather; counts it so the dispatcher safety net can match it."""
        out = comm.all_gather_rows(row, self.ep)
        self._counters.joined[layer] = self._counters.joined.get(layer, 0) + 1
        return out

    def _zero_row(self, device) -> torch.Tensor:
        return torch.zeros(self.num_logical + self.num_ranks + 1, dtype=torch.long, device=device)

    def dispatch(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor | None:
        """LPLB (and, in joint mode, Waterfill) for one layer: logical ``[T, k]`` -> physical ids.

        Returns None when this layer has no plan (the caller then keeps SGLang's mapping).
        """
        plan = self.plans.get(layer)
        if plan is None:
            return None
        ids = self._mask_padded(topk_ids)
        hp = hot_path.impl(ids.device)
        E, R, S = self.num_logical, self.num_ranks, self.slots_per_rank
        gathered = None
        source_rank = 0 if self.rank_invariant else self.ep.rank
        if self.opts.per_batch and not self.rank_invariant:
            gathered = self.collective(layer, hp.local_stats(ids, E, R, S))
        res = hp.balance_layer(
            plan.placement,
            ids,
            source_rank=source_rank,
            lplb="per_batch" if self.opts.per_batch else "table",
            split_table=plan.table,
            waterfill=self.opts.waterfill_candidates if self.opts.joint else None,
            gathered=gathered,
        )
        if self.opts.joint:
            self.stash[layer] = res.shared_rank
        return res.phys_ids.to(topk_ids.dtype)

    def join_empty(self, layer: int, device) -> None:
        """An idle rank's share of a per-batch layer: the same collective, with a zero row."""
        if not self.opts.per_batch or layer not in self.plans:
            return
        if not self.rank_invariant:
            self.collective(layer, self._zero_row(device))
        if self.opts.joint:
            self.stash[layer] = torch.zeros(0, dtype=torch.long, device=device)

    def shared_ranks(self, layer: int, phys_ids: torch.Tensor) -> torch.Tensor:
        """Waterfill's rank per token for one layer, from physical routed ids ``[T, k]``."""
        if self.opts.joint:
            got = self.stash.pop(layer, None)
            if got is not None and got.shape[0] == phys_ids.shape[0]:
                return got
            self.warn_once("joint-miss", "layer %d: no joint decision for this batch; Waterfill falls back to static", layer)
        plan = self.plans[layer]
        pl = plan.placement
        hp = hot_path.impl(phys_ids.device)
        E, R, S = self.num_logical, self.num_ranks, self.slots_per_rank
        p2l = pl.phy2log[0]
        logical = torch.where(phys_ids >= 0, p2l[phys_ids.clamp(min=0).to(torch.long)], -1)
        gathered = None
        if self.opts.dynamic_waterfill:
            gathered = self.collective(layer, hp.local_stats(logical, E, R, S, phys_ids=phys_ids))
        res = hp.balance_layer(
            pl, logical, source_rank=self.ep.rank, lplb="off", waterfill=self.opts.waterfill_candidates,
            gathered=gathered, phys_ids=phys_ids,
        )
        return res.shared_rank

    def ensure_joined(self, layer: int | None, device) -> None:
        """Dispatcher-side safety net: join this layer's collective if the TopK path skipped it.

        Called from the DeepEP dispatcher, which every EP rank must reach for every MoE layer.
        A model that returns early on an idle rank without calling TopK would otherwise leave
        the other ranks waiting in the all-gather.
        """
        if layer is None or not self.collective_per_layer or layer not in self.plans:
            return
        done = self._counters.joined.get(layer, 0)
        if done > 0:
            self._counters.joined[layer] = done - 1
            return
        self.warn_once(
            f"net-{layer}",
            "layer %d reached the DeepEP dispatcher without the TopK path on this rank; "
            "joined its collective from the dispatcher",
            layer,
        )
        comm.all_gather_rows(self._zero_row(device), self.ep)


def activate(opts: MoeLbOptions, *, rank_invariant: bool) -> Runtime:
    """Create this process's runtime (idempotent for the same options)."""
    global _RUNTIME
    with _LOCK:
        if _RUNTIME is None or _RUNTIME.opts != opts:
            _RUNTIME = Runtime(opts, rank_invariant=rank_invariant)
        return _RUNTIME


def deactivate() -> None:
    global _RUNTIME
    with _LOCK:
        if _RUNTIME is not None and _RUNTIME.rebalancer is not None:
            _RUNTIME.rebalancer.shutdown()
        _RUNTIME = None


def fusion_off_error(mode: str) -> MoeLbConfigError:
    return MoeLbConfigError(ERRORS["fusion_off_at_load"].format(mode=mode))
