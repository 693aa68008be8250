"""One frozen description of a balancing mode, and its one vocabulary.

Every layer of the project speaks of modes through ``BalanceMode``: the server flags
(``--moe-lb`` and its sub-options), the plugin runtime, the kernels, ``replay``'s mode names,
the docs and the test ids. A mode has five choices:

=================  ===========================  ==============================================
field              values                       meaning
=================  ===========================  ==============================================
``lplb``           ``off`` | ``plan`` |         LPLB schedule: no split; dispatch plans solved
                   ``per-batch``                in the EPLB cycle per batch-size level and
                                                applied by a gather (``plan.py``); or an exact
                                                split of every batch
``lplb_sync``      ``local`` | ``global``       the per-batch split: each rank splits its own
                                                tokens (no collective), or the global counts
                                                from one all-gather per MoE layer
``objective``      ``tokens`` | ``tiles``       the per-batch split: minimise the busiest
                                                rank's tokens, or its grouped-GEMM tiles
``waterfill``      None | ``conservative`` |    Waterfill candidates for the shared expert
                   ``all_rank``
``waterfill_sync`` ``local`` | ``global``       Waterfill not decided with a per-batch split
``gate``           bool                         per-batch work only where the cost model
                                                predicts more gain than its overhead
=================  ===========================  ==============================================

The gate decides per batch size between a mode's *opened* form (its per-batch work) and its
*closed* form (what costs nothing per batch): for ``per-batch`` and Waterfill alone, closed is
SGLang's static dispatch; for ``plan``, closed is the plan and opened is the per-batch split
(the hybrid: plans where per-batch does not pay, the exact split where it does), so a gated
plan mode takes the per-batch split's sync and objective. With Waterfill, the closed form
keeps the shared expert on its source rank (in decode every rank runs its own shared tokens
and reads the shared weights anyway).

Fields that do not apply to a mode are normalised to None, so two modes that behave the
same compare equal and have the same ``name``. Names are the ``--moe-lb`` value followed by
the relevant choices, ``/``-separated, in a fixed order::

    lplb/plan
    lplb/plan/local/tokens/gate
    lplb/per-batch/local/tiles/gate
    waterfill/conservative/local
    waterfill+lplb/plan/all_rank/local
    waterfill+lplb/per-batch/global/tokens/all_rank

``BalanceMode.parse`` reads a name back (the parts after the first in any order).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

__all__ = [
    "BalanceMode",
    "ModeError",
    "FLAGS",
    "SCHEDULES",
    "SYNCS",
    "OBJECTIVES",
    "CANDIDATES",
    "SERVER_DEFAULTS",
    "every_mode",
]

Schedule = Literal["off", "plan", "per-batch"]
Sync = Literal["local", "global"]
Objective = Literal["tokens", "tiles"]
Candidates = Literal["conservative", "all_rank"]

FLAGS: tuple[str, ...] = ("off", "lplb", "waterfill", "waterfill+lplb")
SCHEDULES: tuple[str, ...] = ("plan", "per-batch")
SYNCS: tuple[str, ...] = ("local", "global")
OBJECTIVES: tuple[str, ...] = ("tokens", "tiles")
CANDIDATES: tuple[str, ...] = ("conservative", "all_rank")


# What ``--moe-lb FLAG`` runs when a sub-option is not given. Chosen by measurement
# (docs/defaults.md: replay --batch-sweep over the bundled OLMoE data, the synthetic generator
# and a demo-server dump, EP 2-32 with 2-64 redundant experts, 1-4096 tokens per rank).
# The schedule is the gated plan: plans at every batch size where the per-batch split does not
# pay its kernels, the split (local sync, token objective: what the default kernels run under
# CUDA graphs) where it does. Every other choice stays selectable.
SERVER_DEFAULTS: dict = {
    "schedule": "plan",
    "lplb_sync": "local",
    "objective": "tokens",
    "candidates": "all_rank",
    "waterfill_sync": "global",
    "gate": True,
}


class ModeError(ValueError):
    """A mode description with an unknown or contradictory choice."""


@dataclass(frozen=True)
class BalanceMode:
    """What one MoE layer does per batch (see the module docstring for every field).

    Construct with keywords, ``BalanceMode.from_flag`` (the server's flag spelling) or
    ``BalanceMode.parse`` (a name). Irrelevant fields become None.
    """

    lplb: Schedule = "off"
    lplb_sync: Sync | None = None
    objective: Objective | None = None
    waterfill: Candidates | None = None
    waterfill_sync: Sync | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        def check(name: str, value, allowed) -> None:
            if value is not None and value not in allowed:
                raise ModeError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

        check("lplb", self.lplb, ("off",) + SCHEDULES)
        check("lplb_sync", self.lplb_sync, SYNCS)
        check("objective", self.objective, OBJECTIVES)
        check("waterfill", self.waterfill, CANDIDATES)
        check("waterfill_sync", self.waterfill_sync, SYNCS)
        if not isinstance(self.gate, bool):
            raise ModeError(f"gate must be a bool; got {self.gate!r}")
        set_ = object.__setattr__  # frozen: normalise in place, once
        if self.lplb == "off" and self.waterfill is None:
            set_(self, "gate", False)  # nothing to gate
        splits = self.lplb == "per-batch" or (self.lplb == "plan" and self.gate)
        set_(self, "lplb_sync", (self.lplb_sync or "global") if splits else None)
        set_(self, "objective", (self.objective or "tokens") if splits else None)
        own_wf_sync = self.waterfill is not None and not splits
        set_(self, "waterfill_sync", (self.waterfill_sync or "local") if own_wf_sync else None)

    # -- derived -----------------------------------------------------------------------------
    @property
    def flag(self) -> str:
        """The ``--moe-lb`` value: ``off``, ``lplb``, ``waterfill`` or ``waterfill+lplb``."""
        lp, wf = self.lplb != "off", self.waterfill is not None
        return "waterfill+lplb" if lp and wf else "lplb" if lp else "waterfill" if wf else "off"

    @property
    def active(self) -> bool:
        return self.flag != "off"

    @property
    def per_batch(self) -> bool:
        """The exact split runs on every batch (the schedule is ``per-batch``)."""
        return self.lplb == "per-batch"

    @property
    def plan(self) -> bool:
        return self.lplb == "plan"

    @property
    def splits(self) -> bool:
        """A per-batch split runs, at least where the gate opens (``per-batch``, or a gated plan)."""
        return self.per_batch or (self.plan and self.gate)

    @property
    def joint(self) -> bool:
        """Waterfill decided together with the per-batch split (one problem, one sync)."""
        return self.waterfill is not None and self.splits

    @property
    def sync(self) -> Sync | None:
        """The mode's one sync choice: the split's, else Waterfill's; None without either."""
        return self.lplb_sync if self.splits else self.waterfill_sync

    @property
    def opened(self) -> "BalanceMode":
        """What runs where the gate is open (an ungated mode: itself)."""
        if not self.gate:
            return self
        if self.plan:
            return BalanceMode(lplb="per-batch", lplb_sync=self.lplb_sync, objective=self.objective,
                               waterfill=self.waterfill)
        return self.with_(gate=False)

    @property
    def closed(self) -> "BalanceMode | None":
        """What runs where the gate is closed: the plan (shared expert at home) for a plan
        schedule, None (SGLang's static dispatch) otherwise, and for an ungated mode."""
        return BalanceMode(lplb="plan") if self.gate and self.plan else None

    @property
    def collective(self) -> bool:
        """Whether every MoE layer runs one all-gather over the EP group on every rank."""
        return self.sync == "global"

    @property
    def name(self) -> str:
        parts = [self.flag]
        if self.lplb != "off":
            parts.append(self.lplb)
        if self.splits:
            parts += [self.lplb_sync, self.objective]
        if self.waterfill is not None:
            parts.append(self.waterfill)
            if self.waterfill_sync is not None:
                parts.append(self.waterfill_sync)
        if self.gate:
            parts.append("gate")
        return "/".join(parts)

    def __str__(self) -> str:
        return self.name

    def with_(self, **changes) -> "BalanceMode":
        """A copy with some fields changed (then normalised)."""
        return replace(self, **changes)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_flag(
        cls,
        flag: str,
        *,
        schedule: str | None = None,
        lplb_sync: str | None = None,
        objective: str | None = None,
        candidates: str | None = None,
        waterfill_sync: str | None = None,
        gate: bool | None = None,
    ) -> "BalanceMode":
        """The mode of ``--moe-lb FLAG`` with its sub-options (None: ``SERVER_DEFAULTS``)."""
        if flag not in FLAGS:
            raise ModeError(f"--moe-lb must be one of {', '.join(FLAGS)}; got {flag!r}")
        lp = "lplb" in flag
        wf = "waterfill" in flag
        d = SERVER_DEFAULTS
        return cls(
            lplb=(schedule or d["schedule"]) if lp else "off",
            lplb_sync=lplb_sync or d["lplb_sync"],
            objective=objective or d["objective"],
            waterfill=(candidates or d["candidates"]) if wf else None,
            waterfill_sync=waterfill_sync or d["waterfill_sync"],
            gate=d["gate"] if gate is None else bool(gate),
        )

    @classmethod
    def parse(cls, name: str) -> "BalanceMode":
        """Read a ``name`` back; raises ``ModeError`` naming the bad part."""
        if not isinstance(name, str) or not name.strip():
            raise ModeError(f"a mode name must be a non-empty string; got {name!r}")
        head, *rest = name.strip().split("/")
        if head not in FLAGS:
            raise ModeError(f"mode {name!r}: first part must be one of {', '.join(FLAGS)}; got {head!r}")
        kw: dict = {}
        syncs: list[str] = []

        def put(key: str, value) -> None:
            if key in kw:
                raise ModeError(f"mode {name!r}: two values for {key} ({kw[key]!r} and {value!r})")
            kw[key] = value

        for part in rest:
            if part in SCHEDULES:
                put("schedule", part)
            elif part in SYNCS:
                syncs.append(part)
            elif part in OBJECTIVES:
                put("objective", part)
            elif part in CANDIDATES:
                put("candidates", part)
            elif part == "gate":
                put("gate", True)
            else:
                raise ModeError(
                    f"mode {name!r}: unknown part {part!r} (expected one of "
                    f"{', '.join(SCHEDULES + SYNCS + OBJECTIVES + CANDIDATES + ('gate',))})"
                )
        if len(syncs) > 1:
            raise ModeError(f"mode {name!r}: a mode has one sync choice, got {syncs}")
        lp, wf = "lplb" in head, "waterfill" in head
        if not lp and ("schedule" in kw or "objective" in kw):
            raise ModeError(f"mode {name!r}: LPLB choices given without LPLB")
        if not wf and "candidates" in kw:
            raise ModeError(f"mode {name!r}: Waterfill candidates given without Waterfill")
        schedule = kw.get("schedule")
        if lp and schedule is None:
            raise ModeError(f"mode {name!r}: name the LPLB schedule ({' or '.join(SCHEDULES)})")
        gate = kw.get("gate", False)
        splits = lp and (schedule == "per-batch" or (schedule == "plan" and gate))
        if "objective" in kw and not splits:
            raise ModeError(f"mode {name!r}: an objective applies to a per-batch split only "
                            "(per-batch, or a gated plan)")
        sync = syncs[0] if syncs else None
        if sync is not None and not splits and not wf:
            raise ModeError(f"mode {name!r}: a sync choice applies to a per-batch split or Waterfill only")
        mode = cls.from_flag(
            head, schedule=schedule, objective=kw.get("objective"), candidates=kw.get("candidates"),
            lplb_sync=sync if splits else None, waterfill_sync=sync if not splits else None, gate=gate,
        )
        if splits and (sync is None or "objective" not in kw):
            raise ModeError(f"mode {name!r}: the per-batch split needs its sync (local|global) and objective "
                            "(tokens|tiles)")
        if wf and not splits and sync is None:
            raise ModeError(f"mode {name!r}: Waterfill needs its sync (local|global)")
        if wf and "candidates" not in kw:
            raise ModeError(f"mode {name!r}: Waterfill needs its candidates ({' or '.join(CANDIDATES)})")
        return mode

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def every_mode(*, gates: tuple[bool, ...] = (False, True)) -> list[BalanceMode]:
    """Every distinct active mode (21 ungated, 28 gated), in a fixed order."""
    from itertools import product

    out: dict[BalanceMode, None] = {}
    for gate in gates:
        split_choices = list(product(SYNCS, OBJECTIVES))
        if gate:
            for sync, obj in split_choices:
                out[BalanceMode(lplb="plan", lplb_sync=sync, objective=obj, gate=True)] = None
        else:
            out[BalanceMode(lplb="plan")] = None
        for sync, obj in split_choices:
            out[BalanceMode(lplb="per-batch", lplb_sync=sync, objective=obj, gate=gate)] = None
        for cand, sync in product(CANDIDATES, SYNCS):
            out[BalanceMode(waterfill=cand, waterfill_sync=sync, gate=gate)] = None
            if not gate:
                out[BalanceMode(lplb="plan", waterfill=cand, waterfill_sync=sync)] = None
        for cand, (sync, obj) in product(CANDIDATES, split_choices):
            if gate:
                out[BalanceMode(lplb="plan", lplb_sync=sync, objective=obj, waterfill=cand, gate=True)] = None
            out[BalanceMode(lplb="per-batch", lplb_sync=sync, objective=obj, waterfill=cand, gate=gate)] = None
    return list(out)
