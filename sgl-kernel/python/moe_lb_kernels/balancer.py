"""The per-layer GPU entry: ``LayerBalancer``.

Everything is allocated in ``__init__``; ``__call__`` only launches kernels (no host sync,
no allocation, no branch on data), so it can be captured in a CUDA graph and replayed.
It computes exactly what ``moe_lb_kernels.reference.reference_layer`` computes: the core's
one chain (``sglang_moe_lb.chain.balance_layer``) with the split in fixed point and at most
``max_sweeps`` sweeps (see reference.py and docs/kernels.md).

Modes are ungated ``sglang_moe_lb.BalanceMode`` values: per-batch LPLB with the token
objective (with or without Waterfill) and Waterfill alone (``unsupported`` says why any other
is refused). Launches per call:

=====================================  =================================================
mode                                   kernels
=====================================  =================================================
LPLB (per-batch, tokens)               A (count) -> B (split, quotas) -> C (dispatch)
joint, all_rank                        A -> B (joint split incl. shared expert) -> C
Waterfill conservative (any LPLB)      A -> B -> C (+ round 0) -> D x topk (rounds)
Waterfill alone (phys ids given)       A (routed loads) -> B (shared quotas) -> C [-> D x topk]
LPLB, built with ``static_only``       C (static logical -> physical map): nothing else
=====================================  =================================================

Global sync (``mode.collective``): ``local_stats`` runs A and writes this rank's int32
``chain.local_stats`` row; the caller all-gathers the rows (one collective) and passes them
to ``__call__(..., gathered=...)``, which counts its own per-block histograms again (A),
reduces the rows on the device and runs B, C (and D).
"""

from __future__ import annotations

import torch

from sglang_moe_lb import BalanceMode, Placement
from sglang_moe_lb.chain import LayerDispatch, stats_width

from ._launch import launch
from ._tables import LayerTables, next_pow2
from .count import _count_kernel, block_tokens
from .dispatch import _dispatch_kernel, _fuse_kernel, _wf_round_kernel
from .reference import SCALE_BITS, SLACK_UNITS, TOL_SHIFT, V1_SPEC
from .split_kernels import _gathered_kernel, _split_kernel, _stats_kernel

__all__ = ["LayerBalancer", "unsupported"]

COUNTERS = ("calls", "solves", "uncertified", "sweeps", "max_gap_units", "gaps_over_one_token")


def unsupported(mode: BalanceMode) -> str | None:
    """Why these kernels cannot run ``mode`` (None when they can)."""
    if not isinstance(mode, BalanceMode):
        return f"mode must be a BalanceMode, got {type(mode).__name__}"
    if not mode.active:
        return f"mode {mode.name} balances nothing"
    if mode.gate:  # the chain's rule too: the caller decides the gate, per batch size
        return f"mode {mode.name} is gated: pass its opened form ({mode.opened.name}); the gate is the caller's"
    if mode.plan:
        return f"mode {mode.name}: a plan is one gather (sglang_moe_lb.plan.apply_plan); it runs no kernel"
    if mode.objective == "tiles":
        return (f"mode {mode.name}: the kernels implement the token objective only "
                "(objective=tiles runs on the core path, which cannot be captured in CUDA graphs)")
    return None


class LayerBalancer:
    """Per-layer dispatch decision on the GPU, into preallocated buffers.

    Args:
        placement: the EP placement (single-layer, or multi-layer with ``layer``).
        max_tokens: most tokens (rows of ``topk_ids``) any call will see on this rank.
        topk: routed experts per token (columns of ``topk_ids``).
        mode: a ``BalanceMode`` (or its name); see ``unsupported`` for what is not covered.
            Global sync (``mode.collective``) takes all-gathered rows (``local_stats`` +
            ``gathered=``); local sync decides from this rank's tokens only.
        device: where the buffers live (CUDA; CPU works under ``TRITON_INTERPRET=1``).
        layer: which layer of a multi-layer placement.
        source_rank: this rank in the EP group.
        max_sweeps: split sweep cap (stops earlier once the certificate holds).
        polish_sweeps: integer polish sweep cap of the per-batch split (None: the v1 spec's 8).
        max_rows / max_copies / max_colours: table capacities, so that later placements can
            be installed in place (``update_placement``) without re-capturing graphs.
        static_only: LPLB on a placement without replicas as one light kernel (the static
            logical -> physical map; no counts, no quotas). Off by default.
        plan_warps: warps of the single-CTA split kernel.
    """

    def __init__(
        self,
        placement: Placement,
        max_tokens: int,
        topk: int,
        mode: BalanceMode | str,
        device: torch.device | str | None = None,
        *,
        layer: int = 0,
        source_rank: int = 0,
        max_sweeps: int = V1_SPEC.max_sweeps,
        polish_sweeps: int | None = None,
        max_rows: int | None = None,
        max_copies: int | None = None,
        max_colours: int | None = None,
        static_only: bool = False,
        plan_warps: int = 4,
    ):
        mode = BalanceMode.parse(mode) if isinstance(mode, str) else mode
        why = unsupported(mode)
        if why:
            raise ValueError(why)
        if max_tokens < 0 or topk < 1:
            raise ValueError("max_tokens must be >= 0 and topk >= 1")
        device = torch.device(device) if device is not None else placement.device
        pl = placement.layer(layer).to(device)
        if not 0 <= source_rank < pl.num_ranks:
            raise ValueError(f"source_rank {source_rank} out of range for {pl.num_ranks} ranks")
        if pl.num_ranks > 256:  # the certificate's sort keys hold 8 rank bits (split_kernels.KEYPAD)
            raise ValueError(f"the v1 kernels support at most 256 EP ranks, got {pl.num_ranks}")
        self.placement = pl
        self.mode = mode
        self.source_rank = source_rank
        self.max_tokens, self.topk = max_tokens, topk
        self.max_sweeps = max_sweeps
        self.polish_sweeps = V1_SPEC.polish_sweeps if polish_sweeps is None else polish_sweeps
        self.plan_warps = plan_warps
        self.tables = LayerTables.build(pl, max_rows=max_rows, max_copies=max_copies, max_colours=max_colours)
        tb = self.tables
        E, P = tb.E, pl.num_physical
        self.lplb = mode.lplb != "off"
        self.wf = {None: 0, "conservative": 1, "all_rank": 2}[mode.waterfill]
        self.joint = mode.joint and mode.waterfill == "all_rank"
        self.dynamic = mode.collective
        if static_only and (mode.flag != "lplb" or pl.has_replicas):
            raise ValueError("static_only needs mode lplb without Waterfill and a placement without replicas")
        self.static_only = static_only
        self.BT = block_tokens(max_tokens, topk)
        self.KB = next_pow2(topk)
        self.max_blocks = max(1, -(-max_tokens // self.BT))
        budget = max(1, 4096 // (self.KB * max(tb.NEB, tb.RB)))  # one-hot tiles of <= 4096 elements
        self.CT = int(min(self.BT, 1 << (budget.bit_length() - 1)))
        self.NBMAX = next_pow2(self.max_blocks)
        chb = lambda width: int(min(self.NBMAX, max(1, 4096 // next_pow2(width))))  # noqa: E731
        self.chb = dict(NBMAX=self.NBMAX, CHB_REP=chb(tb.NEB), CHB_V=chb(2))
        self.chb_r = dict(NBMAX=self.NBMAX, CHB_R=chb(tb.RB))
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        EB, RB, NEB, CB = tb.EB, tb.RB, tb.NEB, tb.CB
        self.acc = torch.zeros(EB + 2 * RB + 8, **i32)
        self.rephist = torch.zeros(self.max_blocks, NEB, **i32)
        self.vcount = torch.zeros(self.max_blocks, **i32)
        self.counts = torch.zeros(E, **i64)
        self.quotas = torch.zeros(P, **i64)
        self.qcum = torch.zeros(NEB, CB, **i32)
        self.shared_quotas = torch.zeros(RB, **i64)
        self.flags = torch.zeros(8, **i32)
        # [0:2] Waterfill scalars for the dispatch kernel, [2:8] counters (``COUNTERS``)
        self.scalars = torch.zeros(8, **i64)
        self.routed_load = torch.zeros(RB, **i64)
        self.dp_off = torch.zeros(E, **i32)
        self.stats_width = stats_width(pl, mode)
        self.stats_row = torch.zeros(self.stats_width, **i32)
        self.caps = torch.zeros(topk + 1, RB + 1, **i64)
        nt = max(max_tokens, 1)
        self.pick = torch.zeros(nt, **i32)
        self.todo = torch.zeros(nt, **i32)
        self.hists = torch.zeros(topk, self.max_blocks, RB, **i32)
        self.shared_rank_buf = torch.zeros(nt, **i64)
        self.phys_buf = torch.zeros(nt, topk, **i32)
        self._dummy = torch.zeros(8, **i32)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every device tensor the balancer owns, by name (kernels read and write only these)."""
        own = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        own.update({f"tables.{k}": v for k, v in vars(self.tables).items() if isinstance(v, torch.Tensor)})
        return own

    # -- placement updates ---------------------------------------------------------------------
    def update_placement(self, placement: Placement, layer: int = 0) -> None:
        """Install a new placement in place (same capacities; raises ValueError otherwise).

        Host-to-device copies only: call it between graph replays, never inside a capture.
        """
        pl = placement.layer(layer).to(self.placement.device)
        if self.static_only and pl.has_replicas:
            raise ValueError("this balancer was built for a placement without replicas; build a new one")
        self.tables.fill(pl)
        self.placement = pl

    # -- phase 1 of global sync -------------------------------------------------------------------
    def local_stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's ``chain.local_stats`` row: int32 ``[stats_width]`` (a view of an internal buffer).

        Global sync only. ``phys_ids`` is required for Waterfill alone. The caller all-gathers
        these rows (``[D, stats_width]``, D = EP size) and passes them to
        ``__call__(..., gathered=...)`` with the same ``topk_ids``.
        """
        if not self.dynamic:
            raise ValueError(f"mode {self.mode.name} has no collective (local_stats is for global sync)")
        self._check_ids(topk_ids, phys_ids)
        self._launch_count(topk_ids, phys_ids)
        tb = self.tables
        launch(_stats_kernel, (1,), self.acc, self.stats_row, E=tb.E, R=tb.R, RB=tb.RB, EB=tb.EB, ROUTED=not self.lplb)
        return self.stats_row

    # -- the per-layer entry ------------------------------------------------------------------------
    def __call__(
        self,
        topk_ids: torch.Tensor,
        out_phys_ids: torch.Tensor | None = None,
        *,
        phys_ids: torch.Tensor | None = None,
        gathered: torch.Tensor | None = None,
        out_shared_rank: torch.Tensor | None = None,
        topk_weights: torch.Tensor | None = None,
        out_fused_ids: torch.Tensor | None = None,
        out_fused_weights: torch.Tensor | None = None,
        shared_weight: float = 1.0,
    ) -> LayerDispatch:
        """Decide physical ids (and shared-expert ranks) for this rank's ``topk_ids [T, topk]``.

        Args:
            topk_ids: logical ids (-1 = padding), int32 or int64, ``T <= max_tokens``.
            out_phys_ids: ``[T, topk]`` output for the physical ids (default: internal int32 buffer).
            phys_ids: ``[T, topk]`` physical ids from the upstream mapping (Waterfill alone).
            gathered: ``[D, stats_width]`` int32 all-gathered ``local_stats`` rows (global sync).
            out_shared_rank: ``[T]`` int64 output for the shared-expert rank (Waterfill modes).
            topk_weights / out_fused_ids / out_fused_weights / shared_weight: optionally also
                write ``waterfill.fuse_topk``'s ``[T, topk + 1]`` layout.
        Returns:
            ``LayerDispatch(phys_ids, shared_rank, quotas)`` of views into the outputs
            (``certified`` is left at its default: read ``flags[0]``, 1 when the per-batch split
            was certified optimal; ``flags[1]`` the sweeps it ran).
        """
        self._check_ids(topk_ids, phys_ids)
        if self.dynamic != (gathered is not None):
            raise ValueError(f"mode {self.mode.name}: pass gathered= exactly with global sync")
        if out_fused_ids is not None and (self.wf == 0 or topk_weights is None or out_fused_weights is None):
            raise ValueError("fused output needs a Waterfill mode, topk_weights and out_fused_weights")
        T = topk_ids.shape[0]
        if out_phys_ids is None:
            out_phys_ids = self.phys_buf[:T] if self.lplb else phys_ids
        shared = out_shared_rank if out_shared_rank is not None else self.shared_rank_buf[:T]
        if self.static_only:
            self._step_dispatch(topk_ids, out_phys_ids, None, shared)
            return LayerDispatch(out_phys_ids, None, None)
        # The per-block histograms the dispatch needs come from this call's own count, so the
        # call does not depend on how (or whether) ``local_stats`` ran; with global sync the
        # gathered rows then overwrite the totals.
        self._launch_count(topk_ids, phys_ids)
        if gathered is not None:
            self._step_gathered(gathered)
        self._step_split()
        self._step_dispatch(topk_ids, out_phys_ids, phys_ids, shared)
        phys = out_phys_ids if self.lplb else phys_ids
        if self.wf == 1:
            self._step_rounds(phys, shared)
        if out_fused_ids is not None:
            self._step_fuse(phys, topk_weights, shared, out_fused_ids, out_fused_weights, shared_weight)
        return LayerDispatch(phys, shared if self.wf else None, self.quotas if self.lplb else None)

    def counters(self) -> dict[str, int]:
        """The device-side counters accumulated since construction (reads the device: a sync)."""
        return dict(zip(COUNTERS, self.scalars[2:8].tolist()))

    def launches_per_call(self) -> int:
        """Kernel launches of one static-mode ``__call__`` (without the optional fused output)."""
        if self.static_only:
            return 1
        return 3 + (self.topk if self.wf == 1 else 0)

    # -- the steps (each one kernel launch) ---------------------------------------------------------
    def _common(self) -> dict:
        tb = self.tables
        return dict(K=self.topk, KB=self.KB, BT=self.BT, CT=self.CT, R=tb.R, RB=tb.RB, S=tb.S)

    def _step_gathered(self, gathered: torch.Tensor) -> None:
        tb = self.tables
        W = self.stats_width
        if (gathered.dim() != 2 or gathered.shape[1] != W or gathered.dtype != torch.int32
                or not 1 <= gathered.shape[0] <= tb.R or not gathered.is_contiguous()):
            raise ValueError(f"gathered must be contiguous int32 [ranks <= {tb.R}, {W}] local_stats rows, "
                             f"got {gathered.dtype} {list(gathered.shape)}")
        if self.source_rank >= gathered.shape[0]:
            raise ValueError(f"source_rank {self.source_rank} out of range for {gathered.shape[0]} gathered rows")
        BC = 256
        launch(_gathered_kernel, (-(-(W - 1) // BC),),
               gathered, gathered.shape[0], self.acc, self.dp_off, self.source_rank,
               E=tb.E, R=tb.R, RB=tb.RB, EB=tb.EB, BC=BC, BD=8, ROUTED=not self.lplb)

    def _step_split(self) -> None:
        tb = self.tables
        launch(_split_kernel, (1,),
               *tb.split_args(), self.acc, self.counts, self.quotas, self.qcum, self.shared_quotas, self.flags,
               self.scalars, self.caps, self.routed_load, self.source_rank, self.max_sweeps, self.polish_sweeps,
               E=tb.E, R=tb.R, S=tb.S, P=tb.p2l.numel(), NEB=tb.NEB, CB=tb.CB, RB=tb.RB, EB=tb.EB,
               SB=next_pow2(tb.S), PB=next_pow2(tb.p2l.numel()),
               CBITS=tb.CB.bit_length() - 1, RBITS=max(tb.RB.bit_length() - 1, 1),
               LPLB=self.lplb, JOINT=self.joint, WF=self.wf, DYNAMIC=self.dynamic,
               SCALE_B=SCALE_BITS, TOL_SHIFT_C=TOL_SHIFT, SLACK=SLACK_UNITS,
               num_warps=self.plan_warps)

    def _step_dispatch(self, topk_ids, out_phys_ids, phys_ids, shared) -> None:
        tb = self.tables
        T = topk_ids.shape[0]
        lplb = 1 if self.static_only else (2 if self.lplb else 0)
        launch(_dispatch_kernel, (max(1, -(-T // self.BT)),),
               topk_ids, out_phys_ids if lplb else self._dummy, phys_ids if phys_ids is not None else topk_ids, T,
               tb.rep_id, tb.log2phys0, tb.rep_slot, tb.rep_expert, self.qcum, self.rephist, self.dp_off,
               self.vcount, self.scalars, self.caps, shared, self.pick, self.todo, self.hists,
               self.source_rank, E=tb.E, NEB=tb.NEB, CB=tb.CB, CBITS=tb.CB.bit_length() - 1, LPLB=lplb,
               DYNAMIC=self.dynamic and not self.static_only, WF=0 if self.static_only else self.wf,
               **self.chb, **self._common())

    def _step_rounds(self, phys, shared) -> None:
        T = phys.shape[0]
        nb = max(1, -(-T // self.BT))
        for i in range(1, self.topk + 1):
            launch(_wf_round_kernel, (nb,),
                   phys, T, nb, self.pick, self.todo, self.hists[i - 1], self.hists[i % self.topk],
                   self.caps[i - 1], self.caps[i], shared, LAST=i == self.topk, **self.chb_r, **self._common())

    def _step_fuse(self, phys, topk_weights, shared, out_ids, out_w, shared_weight) -> None:
        T = phys.shape[0]
        launch(_fuse_kernel, (max(1, -(-T // self.BT)),),
               phys, topk_weights, shared, out_ids, out_w, T, float(shared_weight),
               K=self.topk, KB=self.KB, BT=self.BT, S=self.tables.S, MARKER=-1)

    def _prefix_calls(self, topk_ids: torch.Tensor, out_phys_ids: torch.Tensor) -> list:
        """Closures running the first 1, 2 and 3 kernels of a static LPLB call (benchmark breakdown)."""
        shared = self.shared_rank_buf[: topk_ids.shape[0]]

        def a():
            self._launch_count(topk_ids, None)

        def ab():
            a()
            self._step_split()

        def abc():
            ab()
            self._step_dispatch(topk_ids, out_phys_ids, None, shared)

        return [a, ab, abc]

    # -- helpers ------------------------------------------------------------------------------------
    def _check_ids(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None) -> None:
        if topk_ids.dim() != 2 or topk_ids.shape[1] != self.topk:
            raise ValueError(f"topk_ids must be [T, {self.topk}], got {list(topk_ids.shape)}")
        if topk_ids.shape[0] > self.max_tokens:
            raise ValueError(f"{topk_ids.shape[0]} tokens exceed max_tokens={self.max_tokens}")
        if not topk_ids.is_contiguous():
            raise ValueError("topk_ids must be contiguous")
        if not self.lplb:
            if phys_ids is None or phys_ids.shape != topk_ids.shape or not phys_ids.is_contiguous():
                raise ValueError(f"mode {self.mode.name} needs contiguous phys_ids shaped like topk_ids (SGLang's)")

    def _launch_count(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None) -> None:
        tb = self.tables
        T = topk_ids.shape[0]
        nb = max(1, -(-T // self.BT))
        launch(_count_kernel, (nb,),
            topk_ids, phys_ids if phys_ids is not None else topk_ids, T, self.acc,
            tb.rep_expert, tb.rep_colour, self.rephist, self.vcount,
            K=self.topk, KB=self.KB, BT=self.BT, E=tb.E, EB=tb.EB, R=tb.R, RB=tb.RB, S=tb.S, NEB=tb.NEB,
            COUNT=self.lplb, REP=self.lplb, ROUTED=not self.lplb, VALID=self.wf != 0 or self.dynamic,
        )
