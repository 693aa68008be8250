"""Where expert copies live: a validated physical→logical map plus what the hot path needs.

Follows SGLang's convention: physical slot ``p`` lives on EP rank ``p // (P // R)``.
Everything here is derived once per placement (at start-up and after each EPLB
rebalance), never per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["Placement", "PlacementError", "ReplicaBlocks", "EXACT_TOKENS"]


class PlacementError(ValueError):
    """A physical→logical map that cannot describe an EP placement."""


@dataclass(frozen=True)
class _Derived:
    slot_rank: torch.Tensor  # [P] long, rank of each physical slot
    num_copies: torch.Tensor  # [L, E] long
    replicated_slot: torch.Tensor  # [L, P] bool, slot holds an expert with >= 2 copies
    copy_order: torch.Tensor  # [L, P] long, slots sorted by (logical id, slot id)
    copy_start: torch.Tensor  # [L, E] long, first position of expert e in copy_order


@dataclass(frozen=True)
class ReplicaBlocks:
    """The replicated experts of every layer, grouped into conflict-free colours.

    Two replicated experts of one layer conflict when they have copies on the same
    rank. Experts of one colour (over all layers) never conflict, so a block-coordinate
    step can update all of them at once. ``n`` = number of (layer, expert) pairs in a
    colour, ``C`` = most copies of any expert.

    Attributes:
        colours: per colour a tuple ``(layer [n], expert [n], flat_slot [n, C], flat_rank [n, C],
            same [n, C, C], pad_big [n, C], inv_mult [n, C], first [n, C])``, float tensors
            in float64. ``flat_slot = layer * P + slot`` and ``flat_rank = layer * R + rank``;
            padding points at the dummy slot ``L * P`` / dummy rank ``L * R``. ``same[i, a, b]``
            is 1 when copies a and b sit on one rank; ``first`` is 1 on the first copy of the
            expert on its rank (0 on padding); ``pad_big`` is 0 there and 1e300 elsewhere;
            ``inv_mult`` is 1 / (copies of the expert on that rank), 0 on padding.
        layer / expert / flat_rank / valid: all colours concatenated (``valid`` marks real copies).
    """

    colours: tuple
    layer: torch.Tensor
    expert: torch.Tensor
    flat_rank: torch.Tensor
    valid: torch.Tensor


class Placement:
    """A validated EP placement of logical experts onto physical slots.

    Args:
        physical_to_logical: LongTensor ``[P]`` (one layer) or ``[L, P]`` (per layer).
            Entry ``p`` is the logical expert held by physical slot ``p``.
        num_ranks: EP size ``R``; ``P`` must be divisible by ``R``.
        num_logical: number of logical experts ``E``; default ``max(id) + 1``.
            Every logical expert must have at least one copy in every layer.

    Attributes (all on the map's device):
        phy2log: ``[L, P]`` long.  ``L == 1`` for a single-layer map.
        slot_rank: ``[P]`` long.
        num_copies: ``[L, E]`` long.
        replicated_slot: ``[L, P]`` bool.
        rank_replicated_slots: ``[L, R]`` long, replicated slots held by each rank.
        copy_order / copy_start: slots grouped by logical expert (ascending slot id
            inside a group); the copies of ``e`` are
            ``copy_order[l, copy_start[l, e] : copy_start[l, e] + num_copies[l, e]]``.
    """

    def __init__(self, physical_to_logical: torch.Tensor, num_ranks: int, num_logical: int | None = None):
        p2l = physical_to_logical
        if not isinstance(p2l, torch.Tensor):
            raise PlacementError(f"physical_to_logical must be a torch.Tensor, got {type(p2l).__name__}")
        if p2l.dtype.is_floating_point or p2l.dtype.is_complex or p2l.dtype == torch.bool:
            raise PlacementError(f"physical_to_logical must have an integer dtype, got {p2l.dtype}")
        if p2l.dim() not in (1, 2):
            raise PlacementError(f"physical_to_logical must be [P] or [layers, P], got shape {tuple(p2l.shape)}")
        if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
            raise PlacementError(f"num_ranks must be a positive int, got {num_ranks!r}")
        self.single_layer = p2l.dim() == 1
        p2l = p2l.reshape(1, -1) if self.single_layer else p2l
        p2l = p2l.to(torch.long)
        L, P = p2l.shape
        if P == 0:
            raise PlacementError("physical_to_logical has no physical slots")
        if P % num_ranks:
            raise PlacementError(f"{P} physical slots cannot be split evenly over {num_ranks} ranks (P % R != 0)")
        lo, hi = int(p2l.min()), int(p2l.max())
        if num_logical is None:
            num_logical = hi + 1
        if lo < 0 or hi >= num_logical:
            raise PlacementError(f"physical_to_logical ids must lie in [0, {num_logical}), found range [{lo}, {hi}]")
        num_copies = torch.zeros(L, num_logical, dtype=torch.long, device=p2l.device)
        num_copies.scatter_add_(1, p2l, torch.ones_like(p2l))
        missing = (num_copies == 0).nonzero()
        if missing.numel():
            layer, expert = (int(v) for v in missing[0])
            raise PlacementError(
                f"logical expert {expert} has no physical copy in layer {layer} "
                f"({missing.shape[0]} (layer, expert) pairs without a copy)"
            )

        self.phy2log = p2l
        self.num_layers, self.num_physical = L, P
        self.num_ranks = num_ranks
        self.num_logical = num_logical
        self.slots_per_rank = P // num_ranks
        slot_rank = torch.arange(P, device=p2l.device) // self.slots_per_rank
        replicated_slot = num_copies.gather(1, p2l) >= 2
        # Stable sort by logical id keeps slot order inside each expert's group.
        copy_order = torch.sort(p2l, dim=1, stable=True).indices
        copy_start = torch.cumsum(num_copies, dim=1) - num_copies
        self._d = _Derived(slot_rank, num_copies, replicated_slot, copy_order, copy_start)
        self.rank_replicated_slots = replicated_slot.reshape(L, num_ranks, -1).sum(-1)

    @cached_property
    def replica_blocks(self) -> ReplicaBlocks:
        """Replicated experts grouped for parallel block-coordinate steps (built once)."""
        L, P, R, S = self.num_layers, self.num_physical, self.num_ranks, self.slots_per_rank
        p2l = self.phy2log.cpu().tolist()
        per_colour: dict[int, list] = {}
        C = 1
        for layer in range(L):
            copies: dict[int, list[int]] = {}
            for slot, e in enumerate(p2l[layer]):
                copies.setdefault(e, []).append(slot)
            rank_colours: list[set[int]] = [set() for _ in range(R)]
            for e in sorted(copies):
                slots = copies[e]
                if len(slots) < 2:
                    continue
                ranks = {s // S for s in slots}
                used = set().union(*(rank_colours[r] for r in ranks))
                colour = next(c for c in range(len(used) + 1) if c not in used)  # greedy colouring
                for r in ranks:
                    rank_colours[r].add(colour)
                per_colour.setdefault(colour, []).append((layer, e, slots))
                C = max(C, len(slots))
        dev = self.device
        colours, flat = [], []
        for colour in sorted(per_colour):
            items = per_colour[colour]
            n = len(items)
            slot = torch.zeros(n, C, dtype=torch.long)
            valid = torch.zeros(n, C, dtype=torch.bool)
            for i, (layer, _, slots) in enumerate(items):
                slot[i, : len(slots)] = torch.tensor(slots) + layer * P
                valid[i, : len(slots)] = True
            layer_t = torch.tensor([it[0] for it in items], dtype=torch.long)
            expert_t = torch.tensor([it[1] for it in items], dtype=torch.long)
            rank = (slot % P) // S + layer_t[:, None] * R
            same = (rank[:, :, None] == rank[:, None, :]) & valid[:, :, None] & valid[:, None, :]
            earlier = torch.tril(torch.ones(C, C, dtype=torch.bool), diagonal=-1)
            first = valid & ~(same & earlier).any(-1)
            mult = same.sum(-1).clamp(min=1)
            slot = torch.where(valid, slot, L * P)
            rank = torch.where(valid, rank, L * R)
            f64 = torch.float64
            colour_t = (
                layer_t, expert_t, slot, rank, same.to(f64),
                (~first).to(f64) * 1e300, valid.to(f64) / mult.to(f64), first.to(f64),
            )
            colours.append(tuple(t.to(dev) for t in colour_t))
            flat.append((layer_t, expert_t, rank, valid))
        if flat:
            cat = [torch.cat([f[i] for f in flat]).to(dev) for i in range(4)]
        else:
            z = torch.zeros(0, dtype=torch.long, device=dev)
            cat = [z, z, z.reshape(0, C), torch.zeros(0, C, dtype=torch.bool, device=dev)]
        return ReplicaBlocks(tuple(colours), *cat)

    @cached_property
    def with_shared_expert(self) -> "Placement":
        """The fused placement: one shared-expert slot appended to every rank.

        Rank ``r`` holds fused slots ``r*(S+1) .. r*(S+1)+S``: its S routed slots, then a copy of
        logical expert ``E`` (the shared expert). Routed slot ``p`` becomes ``p + p // S``.
        """
        L, R, S, E = self.num_layers, self.num_ranks, self.slots_per_rank, self.num_logical
        routed = self.phy2log.reshape(L, R, S)
        shared = torch.full((L, R, 1), E, dtype=torch.long, device=self.device)
        fused = torch.cat([routed, shared], 2).reshape(L, R * (S + 1))
        return Placement(fused[0] if self.single_layer else fused, R, E + 1)

    # -- derived views -------------------------------------------------------------------------
    @property
    def slot_rank(self) -> torch.Tensor:
        return self._d.slot_rank

    @property
    def num_copies(self) -> torch.Tensor:
        return self._d.num_copies

    @property
    def replicated_slot(self) -> torch.Tensor:
        return self._d.replicated_slot

    @property
    def copy_order(self) -> torch.Tensor:
        return self._d.copy_order

    @property
    def copy_start(self) -> torch.Tensor:
        return self._d.copy_start

    @property
    def device(self) -> torch.device:
        return self.phy2log.device

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_logical

    @property
    def has_replicas(self) -> bool:
        return self.num_physical > self.num_logical

    @cached_property
    def _layers(self) -> list["Placement"]:
        return [Placement(self.phy2log[i], self.num_ranks, self.num_logical) for i in range(self.num_layers)]

    def layer(self, i: int) -> "Placement":
        """The single-layer placement of layer ``i`` (built once, then reused)."""
        return self if self.single_layer else self._layers[i]

    def to(self, device: torch.device | str) -> "Placement":
        """The same placement on another device (single-layer stays single-layer)."""
        p2l = self.phy2log[0] if self.single_layer else self.phy2log
        return Placement(p2l.to(device), self.num_ranks, self.num_logical)

    def rank_loads(self, slot_tokens: torch.Tensor) -> torch.Tensor:
        """Per-rank load from per-slot tokens: ``[..., P] -> [..., R]``."""
        return slot_tokens.reshape(*slot_tokens.shape[:-1], self.num_ranks, self.slots_per_rank).sum(-1)

    def check_counts(self, logical_counts: torch.Tensor, name: str = "logical_counts",
                     max_total: int | None = None) -> torch.Tensor:
        """Validate per-expert counts ``[E]`` or ``[L, E]`` and return them as ``[L, E]``.

        ``max_total``: the most tokens one layer may carry in all (the caller's exact range,
        e.g. ``EXACT_TOKENS``); a layer above it is an error rather than a wrapped int64 sum.
        """
        c = logical_counts
        if not isinstance(c, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
        want = (self.num_logical,) if self.single_layer else (self.num_layers, self.num_logical)
        if tuple(c.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} for this placement, got {list(c.shape)}")
        if c.dtype == torch.bool or c.dtype.is_complex:
            raise ValueError(f"{name} must be numeric, got {c.dtype}")
        if c.dtype.is_floating_point and not bool(torch.isfinite(c).all()):
            raise ValueError(f"{name} has NaN or inf entries")
        if bool((c < 0).any()):
            raise ValueError(f"{name} has negative entries")
        c = c.reshape(self.num_layers, self.num_logical)
        if max_total is not None:
            _check_totals(c, name, max_total)
        return c

    def __repr__(self) -> str:
        return (
            f"Placement(layers={self.num_layers}, physical={self.num_physical}, logical={self.num_logical}, "
            f"ranks={self.num_ranks}, redundant={self.num_redundant})"
        )


# Integers float64 holds exactly: the float split and its rounding are exact up to here.
EXACT_TOKENS = 1 << 53


def _check_totals(c: torch.Tensor, name: str, max_total: int) -> None:
    """Each layer's total of ``c [L, E]`` (non-negative) must be at most ``max_total``: checked
    without an int64 sum that could wrap (entries first, then a float64 estimate, then exactly)."""
    top = c.max() if c.numel() else torch.zeros(())
    if float(top) > max_total:
        shown = f"{float(top):.6g}" if c.dtype.is_floating_point else str(int(top))
        raise ValueError(f"{name} has an entry of {shown} tokens, "
                         f"above {max_total} (the most one layer may carry for this split to stay exact)")
    approx = c.to(torch.float64).sum(1)
    exact = c.to(torch.long).sum(1) if float(approx.max()) <= 2.0 * max_total else None
    worst = int(exact.argmax()) if exact is not None else int(approx.argmax())
    total = int(exact[worst]) if exact is not None else float(approx[worst])
    if total > max_total:
        shown = str(total) if exact is not None else f"about {total:.6g}"
        raise ValueError(f"{name} of layer {worst} add up to {shown} tokens, above {max_total} "
                         "(the most one layer may carry for this split to stay exact)")

