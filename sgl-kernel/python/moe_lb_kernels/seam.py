"""The kernels' implementation of the core's layer-path contract (``sglang_moe_lb.layer_path``).

``KernelLayerPath`` is a ``layer_path.LayerPath``, built like every implementation, through the
core's one factory: ``layer_path.make_layer_path(pl, mode, ..., impl=KernelLayerPath)`` (the
SGLang plugin picks it on CUDA where ``supports(mode)``: ``sglang_moe_lb.plugin.hot_path``). It
owns one preallocated ``LayerBalancer``: a call launches kernels only (no host sync, no
allocation, outputs are views of fixed buffers), so captured graphs replay it, and placements
are written into the same addresses.

One kernel set is installed: v1.1 (``KERNELS_VERSION``). ``supports(mode)`` says which modes it
runs: per-batch LPLB with the token objective (with or without Waterfill) and Waterfill alone,
ungated; a plan runs no kernel (one gather, ``sglang_moe_lb.plan.apply_plan``).
"""

from __future__ import annotations

import os
import sys

import torch

from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import LayerDispatch
from sglang_moe_lb.cost import CostModel

from .balancer import COUNTERS, LayerBalancer, unsupported
from .reference import SCALE_BITS, V1_SPEC

__all__ = ["KERNELS_VERSION", "CUDA_GRAPH_SAFE", "VERIFIED_ON", "COUNTERS", "KernelLayerPath", "supports"]

KERNELS_VERSION = "v1.1"
CUDA_GRAPH_SAFE = True
# What each version was verified on (a record, not a switch; docs/kernels.md has the details).
VERIFIED_ON = ("v1: H200, 2026-11-27 (docs/gpu/h200_results.md): compiled, bit-exact, CUDA-graph replay. "
               "v1.1 = v1 + int32 global-sync rows, the certificate-key fix, device-side counters: "
               "CPU only (interpreter-exact, sm_90 AOT compile); no GPU run yet.")


def supports(mode: BalanceMode) -> tuple[bool, str]:
    """Whether the kernels run ``mode``: (True, "") or (False, the reason)."""
    why = unsupported(mode)
    return (why is None, why or "")


class KernelLayerPath:
    """One MoE layer on one rank over the kernels (``layer_path.LayerPath``; ``version``: the kernel set).

    Built as every layer path is (``layer_path.make_layer_path(..., impl=KernelLayerPath)``).
    ``__call__`` and ``stats`` launch kernels only; their outputs are views of buffers
    allocated here (phys ids in the dtype of ``topk_ids``: one buffer per dtype, made by the
    first call that uses it, i.e. at warm-up). ``cost`` is accepted for the contract's sake:
    the token objective does not read it. Raises ``ValueError`` for a mode it does not run
    (``supports``), a multi-layer placement, non-positive sizes, or a device other than CUDA
    (the CPU only under ``TRITON_INTERPRET=1``).
    """

    version = KERNELS_VERSION

    def __init__(self, pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int, device,
                 cost: CostModel | None = None):
        ok, why = supports(mode)
        if not ok:
            raise ValueError(why)
        if not isinstance(pl, Placement) or pl.num_layers != 1:
            raise ValueError("a kernel layer path takes a single-layer Placement (use Placement.layer(i))")
        if not isinstance(max_tokens, int) or max_tokens < 1 or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"max_tokens and topk must be positive ints, got {max_tokens!r}, {topk!r}")
        self.mode = mode
        self.max_tokens, self.topk, self.source_rank = max_tokens, topk, source_rank
        self.device = torch.device(device)
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1), not {self.device}")
        if self.device.type == "cuda" and self.device.index is None:  # tensors report cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        P, E = pl.num_physical, pl.num_logical
        # Capacities for later placements of the same shape: every replicated expert of any
        # placement with P slots fits (at most min(E, P - E) of them, each in at most one colour
        # of its own); copies per expert keep the build's power of two.
        rows = max(1, min(E, P - E))
        self.balancer = LayerBalancer(pl.to(self.device), max_tokens, topk, mode, self.device, source_rank=source_rank,
                                      max_sweeps=V1_SPEC.max_sweeps, max_rows=rows, max_colours=rows)
        # certified: flags[0] is 0/1 in an int32; its low byte read as a bool is a view, so the
        # result needs no op per call (little-endian, as every CUDA device and host we target).
        if sys.byteorder != "little":
            raise RuntimeError("the kernel layer path assumes a little-endian host")
        flags = self.balancer.flags
        self._certified = flags.view(torch.bool)[0] if mode.per_batch else torch.ones((), dtype=torch.bool, device=self.device)
        self._phys: dict[torch.dtype, torch.Tensor] = {}

    @property
    def placement(self) -> Placement:
        return self.balancer.placement

    # -- per batch ----------------------------------------------------------------------------------
    def stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's int32 ``chain.local_stats`` row ``[stats_width]`` (a view; global sync only)."""
        self._check(topk_ids, phys_ids)
        return self.balancer.local_stats(topk_ids, phys_ids)

    def __call__(self, topk_ids: torch.Tensor, *, gathered: torch.Tensor | None = None,
                 phys_ids: torch.Tensor | None = None) -> LayerDispatch:
        """``chain.balance_layer`` for this mode and rank; every tensor returned is a view of a fixed buffer."""
        self._check(topk_ids, phys_ids)
        out = None
        if self.balancer.lplb:
            buf = self._phys.get(topk_ids.dtype)
            if buf is None:  # first call with this dtype (warm-up, before any capture)
                buf = self._phys[topk_ids.dtype] = torch.zeros(max(self.max_tokens, 1), self.topk,
                                                              dtype=topk_ids.dtype, device=self.device)
            out = buf[: topk_ids.shape[0]]
        res = self.balancer(topk_ids, out, phys_ids=phys_ids, gathered=gathered)
        return LayerDispatch(res.phys_ids, res.shared_rank, res.quotas, self._certified)

    # -- at rebalance (host work; between replays, never inside a capture) ------------------------------
    def update_placement(self, pl: Placement) -> None:
        """Write a new single-layer placement into the existing buffers (ValueError if it does not fit)."""
        if not isinstance(pl, Placement):
            raise ValueError(f"placement must be a Placement, got {type(pl).__name__}")
        if pl.num_layers != 1:
            raise ValueError(f"a layer path takes a single-layer placement (use Placement.layer(i)), got {pl.num_layers} layers")
        tb = self.balancer.tables
        if (pl.num_ranks, pl.num_logical, pl.slots_per_rank) != (tb.R, tb.E, tb.S):
            raise ValueError(f"placement has {pl.num_ranks} ranks x {pl.slots_per_rank} slots, {pl.num_logical} experts; "
                             f"this layer path was built for {tb.R} x {tb.S}, {tb.E}")
        if not tb.fits(pl):
            raise ValueError(f"placement needs more replicated experts, copies or colours than this layer path "
                             f"holds (rows {tb.NEB}, copies {tb.CB}, colours {tb.GB}); build a new path")
        self.balancer.update_placement(pl)

    def counters(self) -> dict:
        """Device-side counters since the path was built (reads the device: off the critical path).

        calls; solves (per-batch splits); uncertified (splits stopped at the sweep cap without a
        certificate); sweeps (total); max_gap_units / max_gap_tokens (largest ``max load - prefix
        bound`` of a split, 2**-28-token units / tokens); gaps_over_one_token."""
        c = self.balancer.counters()
        c["max_gap_tokens"] = c["max_gap_units"] / float(1 << SCALE_BITS)
        c["kernels"] = self.version
        return c

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every device tensor the path owns, by name (for the graph-safety checks)."""
        own = {f"balancer.{k}": v for k, v in self.balancer.buffers().items()}
        own.update({f"phys.{d}": v for d, v in self._phys.items()})
        own["certified"] = self._certified
        return own

    def _check(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None) -> None:
        # Host-side metadata checks only (no values: that would sync with the device).
        if topk_ids.device != self.device:
            raise ValueError(f"topk_ids is on {topk_ids.device}, this layer path on {self.device}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if phys_ids is not None and phys_ids.device != self.device:
            raise ValueError(f"phys_ids is on {phys_ids.device}, this layer path on {self.device}")

