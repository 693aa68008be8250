"""Per-layer device tables of the v2 kernels, built once per placement on the host.

Everything is a view of ``sglang_moe_lb.Placement`` laid out for one Triton program:

* replicated experts (>= 2 copies) are rows ``0..n_rep-1`` (ascending logical id) of
  ``[NEB, CB]`` tiles, one column per copy in ascending slot order (the core's copy order);
* ``rep_colour`` is the core's conflict-free colour of each row (``Placement.replica_blocks``),
  so the kernels sweep blocks in the core's order; ``colour_src[g, r]`` is the flat tile
  index (``row * CB + col``) of the first copy on rank ``r`` of colour ``g``'s expert, or -1
  (one expert per rank and colour: that is what conflict-free means);
* sizes are capacities: a later placement is written into the same buffers (``fill``) while
  it needs no more rows, copies or colours, so CUDA graphs captured earlier stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_moe_lb import Placement

from .._tables import _replicated_rows as _rows
from .._tables import next_pow2

__all__ = ["V2Tables", "next_pow2"]


_TILE_FIELDS = ("rep_slot", "rep_rank", "rep_fr", "rep_next", "rep_mult", "rep_dup")


@dataclass
class V2Tables:
    """Device tables of one layer (module docstring). Capacities: ``NEB`` rows, ``CB`` copies,
    ``GB`` colours (``NEB``, ``CB`` powers of two); ``RB``/``EB``/``SB``/``PB``: powers of two
    >= R, E + 1, S, P."""

    E: int
    R: int
    S: int
    P: int
    NEB: int
    CB: int
    GB: int
    RB: int
    EB: int
    SB: int
    PB: int
    p2l: torch.Tensor  # [P] int32
    log2phys0: torch.Tensor  # [E] int32: lowest slot of each expert
    rep_id: torch.Tensor  # [E] int32: row of a replicated expert, -1 otherwise
    slot_flat: torch.Tensor  # [P] int32: flat tile index of a replicated slot, -1 otherwise
    rep_expert: torch.Tensor  # [NEB] int32 (0 on padding rows)
    rep_colour: torch.Tensor  # [NEB] int32 (-1 on padding rows)
    rep_slot: torch.Tensor  # [NEB, CB] int32 copy slots (-1 padding)
    rep_rank: torch.Tensor  # [NEB, CB] int32 copy ranks (-1 padding)
    rep_fr: torch.Tensor  # [NEB, CB] int32: column of the first copy on the same rank (-1 padding)
    rep_next: torch.Tensor  # [NEB, CB] int32: column of the next copy on the same rank, or -1
    rep_mult: torch.Tensor  # [NEB, CB] int32: copies of the expert on that rank (1 on padding)
    rep_dup: torch.Tensor  # [NEB, CB] int32: index among the expert's copies on that rank
    colour_src: torch.Tensor  # [GB, RB] int32
    meta: torch.Tensor  # [4] int32: colours in use, replicated rows, most copies, most copies on one rank

    @classmethod
    def build(cls, pl: Placement, *, max_rows: int | None = None, max_copies: int | None = None,
              max_colours: int | None = None) -> "V2Tables":
        if pl.num_layers != 1:
            raise ValueError("V2Tables needs a single-layer placement (use Placement.layer(i))")
        experts, copies, colours = _rows(pl)
        E, R, P = pl.num_logical, pl.num_ranks, pl.num_physical
        NEB = next_pow2(max(max_rows or 0, len(experts), 1))
        CB = next_pow2(max(max_copies or 0, max((len(c) for c in copies), default=2), 2))
        GB = max(max_colours or 0, (max(colours) + 1) if colours else 0, 1)
        RB = next_pow2(R)
        i32 = dict(dtype=torch.int32, device=pl.device)
        t = cls(
            E=E, R=R, S=pl.slots_per_rank, P=P, NEB=NEB, CB=CB, GB=GB, RB=RB, EB=next_pow2(E + 1),
            SB=next_pow2(pl.slots_per_rank), PB=next_pow2(P),
            p2l=torch.empty(P, **i32), log2phys0=torch.empty(E, **i32), rep_id=torch.empty(E, **i32),
            slot_flat=torch.empty(P, **i32), rep_expert=torch.empty(NEB, **i32), rep_colour=torch.empty(NEB, **i32),
            **{f: torch.empty(NEB, CB, **i32) for f in _TILE_FIELDS},
            colour_src=torch.empty(GB, RB, **i32), meta=torch.empty(4, **i32),
        )
        t.fill(pl)
        return t

    def fits(self, pl: Placement) -> str | None:
        """None when ``pl`` fits these capacities, else the reason."""
        if pl.num_layers != 1:
            return "needs a single-layer placement"
        if (pl.num_logical, pl.num_ranks, pl.num_physical) != (self.E, self.R, self.P):
            return (f"shape (E={pl.num_logical}, R={pl.num_ranks}, P={pl.num_physical}) differs from "
                    f"(E={self.E}, R={self.R}, P={self.P})")
        experts, copies, colours = _rows(pl)
        if len(experts) > self.NEB:
            return f"{len(experts)} replicated experts > capacity {self.NEB}"
        if max((len(c) for c in copies), default=0) > self.CB:
            return f"{max(len(c) for c in copies)} copies of one expert > capacity {self.CB}"
        if ((max(colours) + 1) if colours else 0) > self.GB:
            return f"{max(colours) + 1} colours > capacity {self.GB}"
        return None

    def fill(self, pl: Placement) -> None:
        """Write ``pl``'s tables into the existing buffers (same addresses); ValueError if it does not fit."""
        why = self.fits(pl)
        if why is not None:
            raise ValueError(f"placement does not fit the v2 tables: {why}; build a new layer path")
        experts, copies, colours = _rows(pl)
        E, S, P, NEB, CB = self.E, self.S, self.P, self.NEB, self.CB
        p2l = pl.phy2log[0].cpu()
        log2phys0 = torch.full((E,), -1, dtype=torch.int32)
        for slot in range(P - 1, -1, -1):
            log2phys0[int(p2l[slot])] = slot
        h = dict(
            rep_id=torch.full((E,), -1, dtype=torch.int32), slot_flat=torch.full((P,), -1, dtype=torch.int32),
            rep_expert=torch.zeros(NEB, dtype=torch.int32), rep_colour=torch.full((NEB,), -1, dtype=torch.int32),
            rep_slot=torch.full((NEB, CB), -1, dtype=torch.int32), rep_rank=torch.full((NEB, CB), -1, dtype=torch.int32),
            rep_fr=torch.full((NEB, CB), -1, dtype=torch.int32), rep_next=torch.full((NEB, CB), -1, dtype=torch.int32),
            rep_mult=torch.ones(NEB, CB, dtype=torch.int32), rep_dup=torch.zeros(NEB, CB, dtype=torch.int32),
            colour_src=torch.full((self.GB, self.RB), -1, dtype=torch.int32),
        )
        max_mult = 1
        for row, (e, slots, g) in enumerate(zip(experts, copies, colours)):
            on_rank: dict[int, list[int]] = {}
            for col, slot in enumerate(slots):
                on_rank.setdefault(slot // S, []).append(col)
            for cols in on_rank.values():
                max_mult = max(max_mult, len(cols))
                for i, col in enumerate(cols):
                    h["rep_fr"][row, col] = cols[0]
                    h["rep_next"][row, col] = cols[i + 1] if i + 1 < len(cols) else -1
                    h["rep_mult"][row, col] = len(cols)
                    h["rep_dup"][row, col] = i
            h["rep_id"][e], h["rep_expert"][row], h["rep_colour"][row] = row, e, g
            for col, slot in enumerate(slots):
                h["rep_slot"][row, col] = slot
                h["rep_rank"][row, col] = slot // S
                h["slot_flat"][slot] = row * CB + col
                if h["colour_src"][g, slot // S] < 0:
                    h["colour_src"][g, slot // S] = row * CB + col
        h["p2l"], h["log2phys0"] = p2l.to(torch.int32), log2phys0
        h["meta"] = torch.tensor([(max(colours) + 1) if colours else 0, len(experts),
                                  max((len(c) for c in copies), default=1), max_mult], dtype=torch.int32)
        for name, src in h.items():
            getattr(self, name).copy_(src)
        self.n_rep = len(experts)

    def solve_args(self) -> tuple:
        """Table arguments of the main kernel, in its order."""
        return (self.p2l, self.log2phys0, self.rep_id, self.slot_flat, self.rep_expert, self.rep_colour,
                self.rep_slot, self.rep_rank, self.rep_fr, self.rep_next, self.rep_mult, self.rep_dup,
                self.colour_src, self.meta)

