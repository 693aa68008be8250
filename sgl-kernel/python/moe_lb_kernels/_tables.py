"""Per-layer lookup tables the kernels read, built once per placement on the host.

Everything here is derived from ``sglang_moe_lb.Placement`` (the core owns the placement;
these are only views of it laid out for one Triton program):

* Replicated experts (>= 2 copies) become rows ``0..n_rep-1`` (ascending logical id) of
  ``[NEB, CB]`` tiles, one column per copy in ascending slot order (the core's copy order).
* Colours are the core's conflict-free colours (``Placement.replica_blocks``) so the kernel
  sweeps blocks in exactly the core's order. ``colour_src[g, r]`` is the flat tile index
  (``row * CB + col``) of the first copy on rank ``r`` of colour ``g``'s expert, or -1.
* Sizes are capacities: a later placement fits in place (``LayerTables.fill``) while it
  needs no more rows, copies or colours, so a captured CUDA graph stays valid across
  EPLB rebalances.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_moe_lb import Placement

__all__ = ["LayerTables", "next_pow2"]


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _replicated_rows(pl: Placement) -> tuple[list[int], list[list[int]], list[int]]:
    """(experts, copy slots per expert, colour per expert) of a single-layer placement."""
    p2l = pl.phy2log[0].tolist()
    copies: dict[int, list[int]] = {}
    for slot, e in enumerate(p2l):
        copies.setdefault(e, []).append(slot)
    experts = sorted(e for e, s in copies.items() if len(s) >= 2)
    colour_of: dict[int, int] = {}
    for g, col in enumerate(pl.replica_blocks.colours):
        for e in col[1].tolist():
            colour_of[int(e)] = g
    return experts, [copies[e] for e in experts], [colour_of[e] for e in experts]


@dataclass
class LayerTables:
    """Device tables of one layer (see module doc). ``G`` = routed colours in use."""

    E: int
    R: int
    S: int
    NEB: int  # row capacity (pow2)
    CB: int  # copy capacity (pow2, >= 2)
    GB: int  # colour capacity
    RB: int  # pow2 >= R
    EB: int  # pow2 >= E + 1 (one bin for padding ids)
    p2l: torch.Tensor  # [P] int32
    log2phys0: torch.Tensor  # [E] int32, lowest slot of each expert
    rep_id: torch.Tensor  # [E] int32, row of a replicated expert or -1
    rep_expert: torch.Tensor  # [NEB] int32, logical id of each row (0 on padding)
    rep_slot: torch.Tensor  # [NEB, CB] int32, copy slots (-1 padding)
    rep_rank: torch.Tensor  # [NEB, CB] int32, copy ranks (-1 padding)
    rep_colour: torch.Tensor  # [NEB] int32 (-1 padding)
    colour_src: torch.Tensor  # [GB, RB] int32
    slot_flat: torch.Tensor  # [P] int32, flat tile index of a replicated slot or -1
    rep_fr: torch.Tensor  # [NEB, CB] int32, column of the first copy on the same rank (-1 padding)
    rep_next: torch.Tensor  # [NEB, CB] int32, column of the next copy on the same rank, or -1
    rep_mult: torch.Tensor  # [NEB, CB] int32, copies of the expert on that rank (1 on padding)
    rep_dup: torch.Tensor  # [NEB, CB] int32, index among the expert's copies on that rank
    meta: torch.Tensor  # [4] int32: G, n_rep, max copies, max copies of one expert on one rank

    @classmethod
    def build(
        cls,
        pl: Placement,
        *,
        max_rows: int | None = None,
        max_copies: int | None = None,
        max_colours: int | None = None,
    ) -> "LayerTables":
        if not pl.single_layer and pl.num_layers != 1:
            raise ValueError("LayerTables needs a single-layer placement (use Placement.layer(i))")
        experts, copies, colours = _replicated_rows(pl)
        n_rep = len(experts)
        c_max = max((len(c) for c in copies), default=2)
        g_used = (max(colours) + 1) if colours else 0
        NEB = next_pow2(max(max_rows or 0, n_rep, 1))
        CB = next_pow2(max(max_copies or 0, c_max, 2))
        GB = max(max_colours or 0, g_used, 1)
        R, E = pl.num_ranks, pl.num_logical
        dev = pl.device
        i32 = dict(dtype=torch.int32, device=dev)
        t = cls(
            E=E, R=R, S=pl.slots_per_rank, NEB=NEB, CB=CB, GB=GB, RB=next_pow2(R), EB=next_pow2(E + 1),
            p2l=torch.empty(pl.num_physical, **i32),
            log2phys0=torch.empty(E, **i32),
            rep_id=torch.empty(E, **i32),
            rep_expert=torch.empty(NEB, **i32),
            rep_slot=torch.empty(NEB, CB, **i32),
            rep_rank=torch.empty(NEB, CB, **i32),
            rep_colour=torch.empty(NEB, **i32),
            colour_src=torch.empty(GB, next_pow2(R), **i32),
            slot_flat=torch.empty(pl.num_physical, **i32),
            rep_fr=torch.empty(NEB, CB, **i32),
            rep_next=torch.empty(NEB, CB, **i32),
            rep_mult=torch.empty(NEB, CB, **i32),
            rep_dup=torch.empty(NEB, CB, **i32),
            meta=torch.empty(4, **i32),
        )
        t.fill(pl)
        return t

    def split_args(self) -> tuple:
        """Table arguments of the split kernel, in its order."""
        return (self.p2l, self.rep_expert, self.rep_rank, self.rep_colour, self.colour_src, self.slot_flat,
                self.rep_fr, self.rep_next, self.rep_mult, self.rep_dup, self.meta)

    def fits(self, pl: Placement) -> bool:
        experts, copies, colours = _replicated_rows(pl)
        return (
            pl.num_ranks == self.R
            and pl.num_logical == self.E
            and pl.slots_per_rank == self.S
            and len(experts) <= self.NEB
            and max((len(c) for c in copies), default=0) <= self.CB
            and ((max(colours) + 1) if colours else 0) <= self.GB
        )

    def fill(self, pl: Placement) -> None:
        """Write ``pl``'s tables into the existing buffers (in place; same capacities)."""
        if not self.fits(pl):
            raise ValueError("placement does not fit this LayerTables' capacities; build new tables")
        experts, copies, colours = _replicated_rows(pl)
        E, S, NEB, CB, GB, RB = self.E, self.S, self.NEB, self.CB, self.GB, self.RB
        p2l = pl.phy2log[0].cpu()
        P = p2l.numel()
        log2phys0 = torch.full((E,), -1, dtype=torch.int32)
        for slot in range(P - 1, -1, -1):
            log2phys0[int(p2l[slot])] = slot
        rep_id = torch.full((E,), -1, dtype=torch.int32)
        rep_expert = torch.zeros(NEB, dtype=torch.int32)
        rep_slot = torch.full((NEB, CB), -1, dtype=torch.int32)
        rep_rank = torch.full((NEB, CB), -1, dtype=torch.int32)
        rep_colour = torch.full((NEB,), -1, dtype=torch.int32)
        colour_src = torch.full((GB, RB), -1, dtype=torch.int32)
        slot_flat = torch.full((P,), -1, dtype=torch.int32)
        rep_fr = torch.full((NEB, CB), -1, dtype=torch.int32)
        rep_next = torch.full((NEB, CB), -1, dtype=torch.int32)
        rep_mult = torch.ones(NEB, CB, dtype=torch.int32)
        rep_dup = torch.zeros(NEB, CB, dtype=torch.int32)
        max_mult = 1
        for row, (e, slots, g) in enumerate(zip(experts, copies, colours)):
            on_rank: dict[int, list[int]] = {}
            for col, slot in enumerate(slots):
                on_rank.setdefault(slot // S, []).append(col)
            for cols in on_rank.values():
                max_mult = max(max_mult, len(cols))
                for i, col in enumerate(cols):
                    rep_fr[row, col] = cols[0]
                    rep_next[row, col] = cols[i + 1] if i + 1 < len(cols) else -1
                    rep_mult[row, col] = len(cols)
                    rep_dup[row, col] = i
            rep_id[e] = row
            rep_expert[row] = e
            rep_colour[row] = g
            for col, slot in enumerate(slots):
                rank = slot // S
                rep_slot[row, col] = slot
                rep_rank[row, col] = rank
                slot_flat[slot] = row * CB + col
                if colour_src[g, rank] < 0:
                    colour_src[g, rank] = row * CB + col
        meta = torch.tensor(
            [(max(colours) + 1) if colours else 0, len(experts), max((len(c) for c in copies), default=1), max_mult],
            dtype=torch.int32,
        )
        for dst, src in (
            (self.p2l, p2l.to(torch.int32)), (self.log2phys0, log2phys0), (self.rep_id, rep_id),
            (self.rep_expert, rep_expert), (self.rep_slot, rep_slot), (self.rep_rank, rep_rank),
            (self.rep_colour, rep_colour), (self.colour_src, colour_src), (self.slot_flat, slot_flat),
            (self.rep_fr, rep_fr), (self.rep_next, rep_next), (self.rep_mult, rep_mult), (self.rep_dup, rep_dup),
            (self.meta, meta),
        ):
            dst.copy_(src.to(dst.device))
        self.n_rep = len(experts)
