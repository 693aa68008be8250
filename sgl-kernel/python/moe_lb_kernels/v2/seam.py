"""The v2 kernel set behind the plugin's layer-path contract (``sglang_moe_lb.plugin.hot_path.LayerPath``).

``make_layer_path(pl, mode, max_tokens=, topk=, source_rank=, device=, cost=, split_table=)``
builds a ``LayerPathV2``: every buffer is allocated here, once; ``update_placement`` and
``set_split_table`` write into the same buffers (same addresses), so CUDA graphs captured
earlier see them; a call launches kernels only (no host sync, no allocation after the first
call of a new ids dtype, grids from shapes), so it can be captured and replayed.

It computes ``reference_layer(pl, ids, mode, spec=V2_SPEC, ...)`` bit for bit (phys ids,
shared-expert ranks, quotas, certificate). Not the default kernel set: only a GPU run that
shows it compiles, is exact and is faster can promote it (``VERIFIED_VERSIONS``).

Launches per call (``T`` tokens, ``k`` top-k; ``SINGLE``: ``T * k <= single_max``):

=====================================  ==========================  =====================
mode                                   local sync                  global sync
=====================================  ==========================  =====================
LPLB table / per-batch, joint all_rank 1 (SINGLE) or 2 (K1, K2)    stats: 1; call: 2
Waterfill all_rank (phys ids given)    1 or 2                      stats: 1; call: 2
+ conservative Waterfill               + top-k round launches      + top-k
=====================================  ==========================  =====================
"""

from __future__ import annotations

import torch

from sglang_moe_lb.chain import LayerDispatch, effective_tile, stats_width
from sglang_moe_lb.cost import CostModel
from sglang_moe_lb.mode import BalanceMode
from sglang_moe_lb.objective import TABLE_SCALE_BITS
from sglang_moe_lb.placement import Placement

from .._launch import launch
from .._tables import _replicated_rows
from ..reference import FixedSpec
from .kernels import _count_kernel, _greduce_kernel, _main_kernel, _round_kernel
from .spec import MAX_TOTAL, V2_SPEC
from .tables import V2Tables, next_pow2

__all__ = ["KERNELS_VERSION", "VERIFIED_VERSIONS", "CUDA_GRAPH_SAFE", "LayerPathV2", "make_layer_path", "supports"]

KERNELS_VERSION = "v2"
VERIFIED_VERSIONS: dict[str, str] = {}  # no GPU run has verified v2 yet (docs/kernels-v2.md)
CUDA_GRAPH_SAFE = True  # a call allocates nothing and never syncs (tests: test_v2_path.py)

SINGLE_MAX = 16384  # T * k at or below which a call is one launch (every program counts all tokens)
NUM_WARPS = 16  # main kernel: no spills at the goal shape (8 warps spill its dispatch tile; 4 take 255 registers)


def supports(mode: BalanceMode) -> tuple[bool, str]:
    """Whether v2 runs ``mode``: every active mode (the capacity limit is checked at build)."""
    if not isinstance(mode, BalanceMode):
        return False, f"mode must be a BalanceMode, got {type(mode).__name__}"
    if not mode.active:
        return False, f"mode {mode.name} balances nothing"
    return True, ""


def _log2(n: int) -> int:
    return max(n.bit_length() - 1, 0)


def _floor_pow2(n: int) -> int:
    return 1 << _log2(max(1, n))


def block_tokens(max_tokens: int) -> int:
    """Tokens per program: about 128 programs at ``max_tokens`` (one wave on an H100/H200), 16..256."""
    return int(min(max(next_pow2(-(-max(max_tokens, 1) // 128)), 16), 256))


class LayerPathV2:
    """One MoE layer's per-batch hot path on one rank, v2 kernels (module docstring).

    Args beyond ``make_layer_path``'s: ``spec`` (the fixed-point arithmetic: V2_SPEC unless a
    benchmark tries a variant; the reference must use the same), ``num_warps`` of the main
    kernel, ``block`` tokens per program, ``single_max`` (one-launch threshold on ``T * k``),
    ``max_rows/max_copies/max_colours`` (table capacities for later placements).
    """

    def __init__(self, pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int,
                 device, cost: CostModel | None = None, split_table: torch.Tensor | None = None,
                 spec: FixedSpec = V2_SPEC, num_warps: int = NUM_WARPS, block: int | None = None,
                 single_max: int = SINGLE_MAX, max_rows: int | None = None, max_copies: int | None = None,
                 max_colours: int | None = None):
        if not isinstance(mode, BalanceMode):
            raise ValueError(f"mode must be a BalanceMode, got {type(mode).__name__}")
        if not mode.active:
            raise ValueError(f"mode {mode.name} balances nothing; no layer path needed")
        if not isinstance(max_tokens, int) or max_tokens < 0 or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"max_tokens must be an int >= 0 and topk an int >= 1, got {max_tokens!r}, {topk!r}")
        if pl.num_layers != 1:
            raise ValueError("make_layer_path needs a single-layer placement (Placement.layer(i))")
        if not 0 <= source_rank < pl.num_ranks:
            raise ValueError(f"source_rank {source_rank} out of range for {pl.num_ranks} ranks")
        if spec.scale_bits != V2_SPEC.scale_bits or spec.polish_at_bound:
            raise ValueError(f"the v2 kernels run {V2_SPEC.scale_bits} fractional bits and skip polish at the "
                             f"integer bound; spec {spec.name} differs")
        device = torch.device(device)
        pl = pl.to(device)
        self.mode, self.max_tokens, self.topk, self.source_rank, self.spec = mode, max_tokens, topk, source_rank, spec
        self.device, self.placement = device, pl
        self.num_warps, self.single_max = num_warps, single_max
        self.lplb = {"off": 0, "table": 1, "per-batch": 2}[mode.lplb]
        self.wf = {None: 0, "conservative": 1, "all_rank": 2}[mode.waterfill]
        self.joint = mode.joint and mode.waterfill == "all_rank"
        self.glob = mode.collective
        R = pl.num_ranks
        self.tile = effective_tile(mode, cost, R) if mode.per_batch else 1
        sources = R if self.glob else 1
        total = max_tokens * (topk + (1 if self.joint else 0)) * sources
        limit = MAX_TOTAL if self.lplb == 2 else (1 << 31) - 1
        if total > limit:
            raise ValueError(
                f"max_tokens={max_tokens} x (topk {topk}{' + shared' if self.joint else ''}) x {sources} source rank(s) "
                f"= {total} entries exceeds the v2 int32 fixed-point range ({limit}); use the v1 kernels or the core")
        self.tables = V2Tables.build(pl, max_rows=max_rows, max_copies=max_copies, max_colours=max_colours)
        tb = self.tables
        self.W = stats_width(pl, mode)
        self.HB = next_pow2(self.W)
        self.BT = block or block_tokens(max_tokens)
        self.KB = next_pow2(topk)
        self.max_blocks = max(1, -(-max(max_tokens, 1) // self.BT))
        self.NBMAX = next_pow2(self.max_blocks)
        self.RB1 = next_pow2(R + 1)
        self.CT = int(min(self.BT, _floor_pow2(8192 // (self.KB * tb.NEB))))
        self.CT_round = int(min(self.BT, 64))
        self.CHB = int(min(self.NBMAX, max(1, 4096 // max(tb.NEB, self.RB1))))
        self.TS = next_pow2(max(1, min(max_tokens, single_max // topk)))
        self.CTS = int(min(self.TS, _floor_pow2(max(1, 2048 // self.KB))))
        self.UB = max(1, (total + 1).bit_length())
        i32, i64 = dict(dtype=torch.int32, device=device), dict(dtype=torch.int64, device=device)
        nt, nb = max(max_tokens, 1), self.max_blocks
        self.acc = torch.zeros(self.HB, **i32)
        self.done = torch.zeros(1, **i32)
        self.totals = torch.zeros(self.W, **i32)
        self.rephist = torch.zeros(nb, tb.NEB, **i32)
        self.vcount = torch.zeros(nb, **i32)
        self.gtot = torch.zeros(self.W, **i32)
        self.gpre = torch.zeros(self.W, **i32)
        self.toksrc = torch.zeros(tb.RB, **i32)
        self.quotas = torch.zeros(pl.num_physical, **i64)
        self.shared_quotas = torch.zeros(tb.RB, **i64)
        self.routed_load = torch.zeros(tb.RB, **i64)
        self.flags = torch.zeros(8, **i32)
        self.counter_buf = torch.zeros(8, **i64)
        self._cert = torch.ones(1, dtype=torch.bool, device=device)
        self.certified = self._cert.reshape(())
        self.caps = torch.zeros(topk + 1, self.RB1, **i64)
        self.pick = torch.zeros(nt, **i32)
        self.todo = torch.zeros(nt, **i32)
        self.hists = torch.zeros(topk, nb, self.RB1, **i32)
        self.shared_rank_buf = torch.zeros(nt, **i64)
        self._phys = {torch.int32: torch.zeros(nt, topk, **i32)}
        self.split_table = torch.zeros(pl.num_physical, dtype=torch.float64, device=device)
        self._even_table()
        if split_table is not None:
            self.set_split_table(split_table)
        self._zero = torch.zeros(1, **i32)
        # The main kernel's buffers and constants never change after this (rebalances write into
        # the same tensors), so a call only adds its ids, sizes and SINGLE.
        spec = self.spec
        self._main_args = (
            *tb.solve_args(), self.split_table,
            self.totals, self.rephist, self.vcount, self.gtot, self.gpre, self.toksrc,
            self.quotas, self.shared_quotas, self.routed_load, self.flags, self.counter_buf, self._cert,
            self.caps, self.pick, self.todo, self.hists[0],
            self.source_rank, spec.max_sweeps, spec.polish_sweeps, self.tile)
        self._main_const = dict(
            K=self.topk, KB=self.KB, BT=self.BT, CT=self.CT, E=tb.E, R=tb.R, S=tb.S, P=tb.P,
            NEB=tb.NEB, CB=tb.CB, RB=tb.RB, HB=self.HB, SB=tb.SB, PB=tb.PB, RB1=self.RB1,
            CBITS=_log2(tb.CB), RBITS=_log2(tb.RB), LOGNEB=_log2(tb.NEB),
            NBMAX=self.NBMAX, CHB=self.CHB, TS=self.TS, CTS=self.CTS, UB=self.UB,
            LPLB=self.lplb, TILES=self.lplb == 2 and self.tile > 1, JOINT=self.joint, WF=self.wf,
            GLOBAL=self.glob,
            SCALE_B=spec.scale_bits, TOL_SHIFT_C=spec.tol_shift, SLACK=spec.slack_units, TABLE_BITS=TABLE_SCALE_BITS,
            num_warps=self.num_warps)

    # -- updates between calls (host-to-device copies into the same buffers) ------------------------
    def _even_table(self) -> None:
        pl = self.placement
        self.split_table.copy_(1.0 / pl.num_copies[0][pl.phy2log[0]].to(torch.float64))

    def update_placement(self, pl: Placement) -> None:
        """Install a new placement in place (ValueError if it exceeds the capacities). A split
        table belongs to one placement: table mode goes back to the even split until
        ``set_split_table``. Call between graph replays, never inside a capture."""
        if pl.num_layers != 1:
            raise ValueError("update_placement needs a single-layer placement (Placement.layer(i))")
        pl = pl.to(self.device)
        self.tables.fill(pl)
        self.placement = pl
        self._even_table()

    def set_split_table(self, fractions: torch.Tensor) -> None:
        """Install split fractions ``[P]`` (each expert's copies sum to 1) in place."""
        if not isinstance(fractions, torch.Tensor) or fractions.numel() != self.split_table.numel():
            raise ValueError(f"split table must be a tensor of {self.split_table.numel()} fractions (one per slot)")
        if not fractions.dtype.is_floating_point:
            raise ValueError(f"split table must be float fractions, got {fractions.dtype}")
        f = fractions.reshape(-1).to(device=self.device, dtype=torch.float64)
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError("split table has negative, NaN or inf fractions")
        self.split_table.copy_(f)

    def counters(self) -> dict:
        """Device-side diagnostics since the path was built (syncs: read off the critical path)."""
        c = self.counter_buf.tolist()
        f = self.flags.tolist()
        return {"calls": c[0], "uncertified": c[1], "sweeps": c[2], "polish_needed": c[3], "polish_kept": c[4],
                "max_gap_units": c[5], "last": {"certified": bool(f[0]), "sweeps": f[1], "polish_sweeps": f[2],
                                                "polish_kept": bool(f[3]), "gap_units": f[5]}}

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every device tensor the path owns, by name (for the graph-safety checks)."""
        own = {name: t for name, t in vars(self).items() if isinstance(t, torch.Tensor)}
        own.update({f"tables.{i}": t for i, t in enumerate(self.tables.solve_args())})
        own.update({f"phys.{d}": t for d, t in self._phys.items()})
        return own

    # -- the per-batch calls -----------------------------------------------------------------------------
    def stats(self, topk_ids: torch.Tensor, phys_ids: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's int32 row for the all-gather (``chain.local_stats``; a view of a fixed
        buffer). Global-sync modes only; the next ``__call__`` must get the same ids (it reuses
        this count's per-block prefixes)."""
        if not self.glob:
            raise ValueError(f"mode {self.mode.name} has no collective; stats() is for global sync")
        self._check(topk_ids, phys_ids)
        self._count(topk_ids, phys_ids)
        return self.totals

    def __call__(self, topk_ids: torch.Tensor, *, gathered: torch.Tensor | None = None,
                 phys_ids: torch.Tensor | None = None) -> LayerDispatch:
        self._check(topk_ids, phys_ids)
        T = topk_ids.shape[0]
        if self.glob:
            self._check_gathered(gathered)
            self._reduce(gathered)
            single = False
        else:
            if gathered is not None:
                raise ValueError(f"mode {self.mode.name} has no collective; pass gathered=None")
            single = T * self.topk <= self.single_max
            if not single:
                self._count(topk_ids, phys_ids)
        out = self._out(topk_ids) if self.lplb else phys_ids
        shared = self.shared_rank_buf[:T]
        self._main(topk_ids, phys_ids, out, shared, single)
        if self.wf == 1:
            self._rounds(out, shared)
        return LayerDispatch(out, shared if self.wf else None, self.quotas if self.lplb else None,
                             self.certified)

    # -- launches ----------------------------------------------------------------------------------------
    def _nb(self, T: int) -> int:
        return max(1, -(-T // self.BT))

    def _count(self, topk_ids, phys_ids) -> None:
        tb = self.tables
        src = topk_ids if self.lplb else phys_ids
        T = src.shape[0]
        nb = self._nb(T)
        launch(_count_kernel, (nb,),
               src, T, nb, self.acc, self.done, self.totals, tb.rep_expert, tb.rep_colour,
               self.rephist, self.vcount,
               K=self.topk, KB=self.KB, BT=self.BT, W=self.W, HB=self.HB, S=tb.S, NEB=tb.NEB,
               ROUTED=not self.lplb, REP=bool(self.lplb))

    def _reduce(self, gathered) -> None:
        DB = self.tables.RB
        BC = int(min(next_pow2(self.W), max(1, 4096 // DB)))
        launch(_greduce_kernel, (-(-self.W // BC),),
               gathered, gathered.shape[0], self.source_rank, self.gtot, self.gpre, self.toksrc,
               W=self.W, BC=BC, DB=DB)

    def _main(self, topk_ids, phys_ids, out, shared, single: bool) -> None:
        T = topk_ids.shape[0]
        nb = self._nb(T)
        phys_in = phys_ids if phys_ids is not None else topk_ids
        launch(_main_kernel, (nb,),
               topk_ids, phys_in, out if out is not None else self._zero, shared, T, nb, *self._main_args,
               SINGLE=single, **self._main_const)

    def _rounds(self, phys, shared) -> None:
        T = phys.shape[0]
        nb = self._nb(T)
        for i in range(1, self.topk + 1):
            launch(_round_kernel, (nb,),
                   phys, T, nb, self.pick, self.todo, self.hists[i - 1], self.hists[i % self.topk],
                   self.caps[i - 1], self.caps[i], shared,
                   K=self.topk, KB=self.KB, BT=self.BT, CT=self.CT_round, R=self.tables.R, S=self.tables.S,
                   RB1=self.RB1, LAST=i == self.topk, NBMAX=self.NBMAX, CHB=self.CHB)

    def launches_per_call(self, T: int) -> int:
        """Kernel launches of one ``__call__`` with ``T`` tokens (``stats`` adds one in global sync)."""
        n = 1
        if self.glob or T * self.topk > self.single_max:
            n += 1
        return n + (self.topk if self.wf == 1 else 0)

    # -- checks (shapes and dtypes only: no device reads) -------------------------------------------------
    def _out(self, topk_ids: torch.Tensor) -> torch.Tensor:
        buf = self._phys.get(topk_ids.dtype)
        if buf is None:  # first call with this dtype (warm-up, before any capture)
            buf = self._phys[topk_ids.dtype] = torch.zeros(max(self.max_tokens, 1), self.topk, dtype=topk_ids.dtype,
                                                           device=self.device)
        return buf[: topk_ids.shape[0]]

    def _check(self, topk_ids, phys_ids) -> None:
        if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.shape[1] != self.topk:
            raise ValueError(f"topk_ids must be a [T, {self.topk}] tensor, got {getattr(topk_ids, 'shape', topk_ids)!r}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if topk_ids.shape[0] > self.max_tokens:
            raise ValueError(f"{topk_ids.shape[0]} tokens exceed max_tokens={self.max_tokens} of this layer path")
        if not topk_ids.is_contiguous() or topk_ids.device != self.device:
            raise ValueError(f"topk_ids must be contiguous on {self.device}")
        if self.lplb == 0:
            if (phys_ids is None or phys_ids.shape != topk_ids.shape or not phys_ids.is_contiguous()
                    or phys_ids.dtype not in (torch.int32, torch.int64) or phys_ids.device != self.device):
                raise ValueError(f"mode {self.mode.name} needs contiguous int phys_ids shaped like topk_ids on {self.device}")

    def _check_gathered(self, gathered) -> None:
        R = self.placement.num_ranks
        if (not isinstance(gathered, torch.Tensor) or gathered.dim() != 2 or gathered.shape[1] != self.W
                or not 1 <= gathered.shape[0] <= R or gathered.dtype != torch.int32 or not gathered.is_contiguous()):
            raise ValueError(f"mode {self.mode.name} needs gathered = contiguous int32 [ranks <= {R}, {self.W}] "
                             f"local_stats rows, got {getattr(gathered, 'dtype', None)} {list(getattr(gathered, 'shape', []))}")
        if self.source_rank >= gathered.shape[0]:
            raise ValueError(f"source_rank {self.source_rank} has no row in gathered [{gathered.shape[0]}, {self.W}]")


TILE_BUDGET = 1024  # default capacity: replicated rows x copies of the split's register tiles


def default_capacities(pl: Placement) -> dict:
    """Room for later placements of the same shape: every replicated expert any placement with
    P slots can have (``min(E, P - E)``, as v1), unless that makes the ``[rows, copies]`` tiles
    larger than ``TILE_BUDGET`` (red=64: 64 x 32, EP256: 256 x 128); then ``TILE_BUDGET // copies`` rows
    or the build's, whichever is more. Copies
    keep the build's power of two. A placement beyond these is refused by ``update_placement``
    (the caller rebuilds the path)."""
    experts, copies, _ = _replicated_rows(pl)
    CB = next_pow2(max([len(c) for c in copies] + [2]))  # as V2Tables.build
    rows = max(1, min(pl.num_logical, pl.num_physical - pl.num_logical))
    if next_pow2(rows) * CB > TILE_BUDGET:
        rows = max(next_pow2(max(len(experts), 1)), TILE_BUDGET // CB)
    return {"max_rows": rows, "max_colours": rows}


def make_layer_path(pl: Placement, mode: BalanceMode, *, max_tokens: int, topk: int, source_rank: int, device,
                    cost: CostModel | None = None, split_table: torch.Tensor | None = None, **options) -> LayerPathV2:
    """The v2 layer path (the contract's signature; ``options`` are ``LayerPathV2``'s extras)."""
    if not isinstance(pl, Placement) or pl.num_layers != 1:
        raise ValueError("make_layer_path takes a single-layer Placement (use Placement.layer(i))")
    for key, value in default_capacities(pl).items():
        options.setdefault(key, value)
    return LayerPathV2(pl, mode, max_tokens=max_tokens, topk=topk, source_rank=source_rank, device=device,
                       cost=cost, split_table=split_table, **options)
