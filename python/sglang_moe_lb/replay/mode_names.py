"""Replay's mode names: SGLang's own dispatch modes, and every ``BalanceMode`` by its name.

* SGLang: ``static`` (each rank's nearest copy), ``dynamic`` (a random copy),
  ``upstream-waterfill`` (SGLang's ``WaterfillBalancer`` on top of static, its default static
  variant) and ``upstream-waterfill-dyn`` (the same with ``SGLANG_DISABLE_STATIC_WATERFILL=1``).
* Ours: any ``BalanceMode`` name (``mode.py``), e.g. ``lplb/plan``,
  ``lplb/plan/local/tokens/gate``, ``lplb/per-batch/global/tokens``,
  ``waterfill/conservative/global``, ``waterfill+lplb/per-batch/global/tokens/all_rank``.
  They run through ``chain.balance_layer`` exactly as the server plugin does.
* The server's flag values: ``lplb``, ``waterfill`` and ``waterfill+lplb`` mean what
  ``--moe-lb`` means (the mode it runs with default sub-options); ``off`` is ``static``.

``server_default(flag)`` is the name ``--moe-lb FLAG`` runs with no sub-options, read from
``mode.SERVER_DEFAULTS`` (never written here).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from ..mode import CANDIDATES, FLAGS, OBJECTIVES, SYNCS, BalanceMode, ModeError, every_mode

__all__ = [
    "ReplayMode",
    "SGLANG_MODES",
    "parse_mode",
    "parse_modes",
    "server_default",
    "default_mode_names",
    "all_mode_names",
    "RENAMED",
]

SGLANG_MODES: dict[str, str] = {
    "static": "SGLang static dispatch (each rank's nearest copy); shared expert local",
    "dynamic": "SGLang dynamic dispatch (a random copy); shared expert local",
    "upstream-waterfill": "SGLang static dispatch + SGLang's WaterfillBalancer (static, its default)",
    "upstream-waterfill-dyn": "SGLang static dispatch + SGLang's WaterfillBalancer with SGLANG_DISABLE_STATIC_WATERFILL=1",
}

# Names replay used before the one mode vocabulary: rejected with the new name as a hint.
RENAMED: dict[str, str] = {
    "lplb-rebalance": "lplb/plan",
    "waterfill-cons": "waterfill/conservative/global",
    "waterfill-all": "waterfill/all_rank/global",
    "waterfill-cons-static": "waterfill/conservative/local",
    "waterfill-all-static": "waterfill/all_rank/local",
    "waterfill+lplb-cons": "waterfill+lplb/per-batch/global/tokens/conservative",
    "waterfill+lplb-all": "waterfill+lplb/per-batch/global/tokens/all_rank",
}


@dataclass(frozen=True)
class ReplayMode:
    """One replayed mode: an SGLang mode (``sglang``) or one of ours (``balance``)."""

    name: str
    sglang: str | None = None
    balance: BalanceMode | None = None

    @property
    def family(self) -> str:
        return "upstream" if self.sglang is not None else "ours"

    @property
    def upstream_waterfill(self) -> bool:
        return self.sglang in ("upstream-waterfill", "upstream-waterfill-dyn")

    @property
    def moves_shared(self) -> bool:
        """Whether the shared expert may leave its source rank."""
        return self.upstream_waterfill or (self.balance is not None and self.balance.waterfill is not None)

    @property
    def gated(self) -> bool:
        return self.balance is not None and self.balance.gate

    @property
    def ungated(self) -> "ReplayMode":
        """What runs where the gate is open (``BalanceMode.opened``); itself without a gate."""
        if not self.gated:
            return self
        b = self.balance.opened
        return ReplayMode(b.name, balance=b)

    @property
    def closed(self) -> "ReplayMode":
        """What runs where the gate is closed: the plan for a plan schedule, else SGLang static."""
        b = self.balance.closed if self.gated else None
        return ReplayMode(b.name, balance=b) if b is not None else ReplayMode("static", sglang="static")

    @property
    def description(self) -> str:
        if self.sglang is not None:
            return SGLANG_MODES[self.sglang]
        return describe(self.balance)


def describe(m: BalanceMode) -> str:
    """One line on what a ``BalanceMode`` does per batch."""
    parts = []
    whose = "all-gathered" if m.lplb_sync == "global" else "rank's own"
    if m.plan and m.gate:
        parts.append(f"dispatch plans per batch size (solved in the EPLB cycle, one gather); where the cost model "
                     f"says it pays, the exact per-batch split of the {whose} counts, {m.objective} objective")
    elif m.plan:
        parts.append("dispatch plans per batch size, solved in the EPLB cycle, applied by one gather")
    elif m.per_batch:
        parts.append(f"exact per-batch LPLB split of the {whose} counts, {m.objective} objective")
    else:
        parts.append("SGLang static dispatch")
    if m.waterfill is not None:
        how = "joint with the split (shared expert = one more expert)" if m.waterfill == "all_rank" and m.splits else (
            f"{m.waterfill} candidates")
        sync = f", {m.waterfill_sync} loads" if m.waterfill_sync else ""
        parts.append(f"our Waterfill, {how}{sync}")
    if m.gate:
        closed = "the plan, shared expert at home" if m.plan else "SGLang static"
        parts.append(f"gated by the cost model (closed: {closed})")
    return "; ".join(parts)


def parse_mode(name: str) -> ReplayMode:
    """A replay mode from its name; raises ``ModeError`` naming the problem."""
    text = name.strip()
    if text == "off":
        text = "static"  # --moe-lb off: SGLang's own dispatch
    if text in SGLANG_MODES:
        return ReplayMode(text, sglang=text)
    if text in FLAGS:  # --moe-lb lplb|waterfill|waterfill+lplb: the server's default sub-options
        b = BalanceMode.from_flag(text)
        return ReplayMode(b.name, balance=b)
    if text in RENAMED:
        raise ModeError(f"mode {text!r} was renamed: use {RENAMED[text]!r}")
    if "/table" in text:
        raise ModeError(f"mode {text!r}: the table schedule is gone; plans replace it (lplb/plan, or the "
                        f"server default {server_default('lplb')!r})")
    mode = BalanceMode.parse(text)
    if mode.name != text:
        raise ModeError(f"mode {text!r}: write it as {mode.name!r} (the one spelling of that mode)")
    return ReplayMode(mode.name, balance=mode)


def server_default(flag: str = "lplb") -> str:
    """The mode ``--moe-lb FLAG`` runs with default sub-options (from ``mode.SERVER_DEFAULTS``)."""
    return BalanceMode.from_flag(flag).name


def all_mode_names() -> list[str]:
    """Every SGLang mode and every distinct active ``BalanceMode`` (gated and not)."""
    return list(SGLANG_MODES) + [m.name for m in every_mode()]


def default_mode_names() -> list[str]:
    """The no-``--modes`` set: SGLang's static, dynamic and Waterfill; our plan alone; per-batch
    LPLB in both syncs and objectives; Waterfill alone in both syncs; the joint per-batch modes
    (token objective) in both syncs; the gated per-batch split; and the two server defaults."""
    names: dict[str, None] = dict.fromkeys(["static", "dynamic", "upstream-waterfill"])
    names[BalanceMode(lplb="plan").name] = None
    for sync, obj in product(SYNCS[::-1], OBJECTIVES):
        names[BalanceMode(lplb="per-batch", lplb_sync=sync, objective=obj).name] = None
    for sync, cand in product(SYNCS[::-1], CANDIDATES):
        names[BalanceMode(waterfill=cand, waterfill_sync=sync).name] = None
    for sync, cand in product(SYNCS[::-1], CANDIDATES):
        names[BalanceMode(lplb="per-batch", lplb_sync=sync, objective="tokens", waterfill=cand).name] = None
    names[BalanceMode(lplb="per-batch", lplb_sync="local", objective="tokens", gate=True).name] = None
    for flag in ("lplb", "waterfill+lplb"):
        names[server_default(flag)] = None
    return list(names)


def parse_modes(items: list[str] | tuple[str, ...] | str) -> tuple[ReplayMode, ...]:
    """``--modes`` items (or a comma-separated string): names, ``all`` or ``default``.

    Duplicates are rejected (they would be run and reported twice under one name)."""
    if isinstance(items, str):
        items = [t.strip() for t in items.split(",") if t.strip()]
    if not items:
        raise ModeError("--modes: give at least one mode")
    names: list[str] = []
    for item in items:
        if item == "all":
            names += all_mode_names()
        elif item == "default":
            names += default_mode_names()
        else:
            names.append(item)
    modes = [parse_mode(n) for n in names]
    seen: set[str] = set()
    dup = [m.name for m in modes if m.name in seen or seen.add(m.name)]
    if dup:
        raise ModeError(f"--modes: mode(s) given twice: {sorted(set(dup))}")
    if "static" not in seen:
        raise ModeError("--modes must include 'static' (the reference of every time ratio)")
    return tuple(modes)
