"""The ``--moe-lb`` flag, its sub-options, and every start-up check on them.

Nothing here imports SGLang: the checks read plain values (an ``argparse.Namespace`` before
resolution, a small dict after it), so they can be tested and documented on their own.
``cli_hooks`` feeds them SGLang's objects.

Errors are ``MoeLbConfigError`` (a ``ValueError``); the CLI hooks turn them into an
argparse-style exit. Every message names the flags involved and says what to do;
``ERRORS``/``WARNINGS`` hold them all (docs/usage.md lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MODES",
    "MoeLbOptions",
    "MoeLbConfigError",
    "ERRORS",
    "WARNINGS",
    "add_cli_flags",
    "options_from_namespace",
    "check_raw_args",
    "check_resolved",
]

Mode = Literal["off", "waterfill", "lplb", "waterfill+lplb"]
MODES: tuple[str, ...] = ("off", "waterfill", "lplb", "waterfill+lplb")
CANDIDATES = ("conservative", "all_rank")
SYNCS = ("static", "dynamic")
SCHEDULES = ("rebalance-only", "per-batch")

DEFAULTS = {"waterfill_candidates": "conservative", "waterfill_sync": "static", "lplb_schedule": "rebalance-only"}

FLAG = "--moe-lb"
FLAG_CANDIDATES = "--moe-lb-waterfill-candidates"
FLAG_SYNC = "--moe-lb-waterfill-sync"
FLAG_SCHEDULE = "--moe-lb-lplb-schedule"

HELP_MODE = (
    "Dispatch-time MoE load balancing for expert parallelism (sglang-moe-lb plugin). "
    "'lplb' splits the tokens of every replicated expert over its copies so that the busiest "
    "EP rank carries as little as possible: by default a split table that HiGHS computes at "
    "start-up and after every EPLB rebalance (minimising the expected max rank load over the "
    "recorded window), or, with --moe-lb-lplb-schedule per-batch, an exact solve of each batch; "
    "it needs redundant experts (--ep-num-redundant-experts, usually with --enable-eplb). "
    "'waterfill' runs each token's shared expert on a lightly loaded EP rank as one extra fused "
    "top-k slot; it needs a model with a shared expert (DeepSeek-V3/R1 family) and "
    "--moe-a2a-backend deepep. 'waterfill+lplb' does both. Replaces, and cannot be combined with, "
    "--enable-waterfill and --ep-dispatch-algorithm lp. Default: off."
)
HELP_CANDIDATES = (
    "Waterfill: ranks that may run a token's shared expert. 'conservative' (default): only ranks "
    "the token already visits, plus its own rank (no extra traffic); 'all_rank': any EP rank."
)
HELP_SYNC = (
    "Waterfill without per-batch LPLB: 'static' (default) balances against this rank's own tokens, "
    "no communication; 'dynamic' balances against the global rank loads with one all-gather over "
    "the EP group per MoE layer (every rank joins, idle DP-attention ranks included)."
)
HELP_SCHEDULE = (
    "LPLB: 'rebalance-only' (default) applies the split table solved at start-up and after each "
    "EPLB rebalance (no communication on the forward path); 'per-batch' counts each batch, "
    "all-gathers the counts once per MoE layer over the EP group, solves the exact split and "
    "dispatches by integer quotas."
)

ERRORS = {
    "upstream_waterfill": (
        "--moe-lb {mode} cannot be combined with SGLang's own --enable-waterfill: both would drive "
        "the same fused shared-expert slot. Remove --enable-waterfill ({hint})."
    ),
    "lp_dispatch": (
        "--moe-lb {mode} cannot be combined with --ep-dispatch-algorithm lp: both decide how tokens "
        "are split over expert replicas. Remove --ep-dispatch-algorithm lp (per-batch LP balancing "
        "is --moe-lb lplb --moe-lb-lplb-schedule per-batch)."
    ),
    "waterfill_a2a": (
        "--moe-lb {mode} needs --moe-a2a-backend deepep (got {backend!r}): Waterfill sends a token's "
        "shared expert to another EP rank as a fused (top-k + 1) slot, which only the DeepEP "
        "dispatcher carries. Add --moe-a2a-backend deepep, or use --moe-lb lplb."
    ),
    "waterfill_fusion_disabled": (
        "--moe-lb {mode} runs the shared expert as a fused MoE slot, so it cannot be combined with "
        "--disable-shared-experts-fusion. Remove that flag, or use --moe-lb lplb."
    ),
    "no_shared_expert": (
        "--moe-lb {mode} needs a model with a shared expert, but {arch} has none ({detail}). "
        "Use --moe-lb lplb for this model."
    ),
    "no_fusion_support": (
        "--moe-lb {mode} needs SGLang's shared-expert fusion, which {arch} does not implement in "
        "sglang 0.5.23. Use --moe-lb lplb for this model."
    ),
    "cuda_graph": (
        "--moe-lb {mode} runs on the core's torch reference path, which synchronises with the host "
        "in every MoE layer and cannot be captured in a CUDA graph (a captured graph would also keep "
        "plan tensors that a rebalance replaces). Add --disable-cuda-graph (or "
        "--cuda-graph-backend-decode disabled), or install sglang-moe-lb-kernels with a "
        "CUDA-graph-safe implementation."
    ),
    "fusion_off_at_load": (
        "--moe-lb {mode}: the model was built without the fused shared-expert slot (SGLang turned "
        "shared-expert fusion off for it; the reason is in the 'Shared experts fusion optimization "
        "is disabled' log line, e.g. a quantisation that keeps the shared expert at another "
        "precision). Waterfill cannot run on it; use --moe-lb lplb."
    ),
    "hook_conflict": (
        "--moe-lb {mode}: could not hook {targets} (another plugin patched it first). Load "
        "sglang-moe-lb alone, or leave the other plugin out with SGLANG_PLUGINS."
    ),
}

WARNINGS = {
    "no_redundant": (
        "--moe-lb {mode}: there are no redundant experts (--ep-num-redundant-experts 0), so every "
        "expert has one copy and LPLB has nothing to split. LPLB is off (a zero-cost no-op){rest}. "
        "Add --ep-num-redundant-experts N (usually with --enable-eplb) to use it."
    ),
    "ignored": "{flag} is ignored with --moe-lb {mode}: {why}",
    "ep1": (
        "--moe-lb {mode}: expert parallelism is off (EP size 1), so there is nothing to balance; "
        "the plugin stays off. Use --ep-size > 1 or an a2a backend."
    ),
}


class MoeLbConfigError(ValueError):
    """A ``--moe-lb`` configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class MoeLbOptions:
    """What the user asked for, after defaults (carried to every scheduler on ``ServerArgs``).

    Attributes:
        mode: the effective mode (``requested`` downgraded by start-up checks).
        requested: the ``--moe-lb`` value as given.
        waterfill_candidates: ``conservative`` | ``all_rank`` (core ``waterfill`` spelling).
        waterfill_sync: ``static`` | ``dynamic``.
        lplb_schedule: ``rebalance-only`` | ``per-batch``.
        explicit: the sub-option flags the user passed (for "ignored" warnings).
    """

    mode: str = "off"
    requested: str = "off"
    waterfill_candidates: str = DEFAULTS["waterfill_candidates"]
    waterfill_sync: str = DEFAULTS["waterfill_sync"]
    lplb_schedule: str = DEFAULTS["lplb_schedule"]
    explicit: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return self.mode != "off"

    @property
    def waterfill(self) -> bool:
        return self.mode in ("waterfill", "waterfill+lplb")

    @property
    def lplb(self) -> bool:
        return self.mode in ("lplb", "waterfill+lplb")

    @property
    def per_batch(self) -> bool:
        return self.lplb and self.lplb_schedule == "per-batch"

    @property
    def joint(self) -> bool:
        """Waterfill and per-batch LPLB decided together (one collective, ``joint.balance_layer``)."""
        return self.waterfill and self.per_batch

    @property
    def dynamic_waterfill(self) -> bool:
        return self.waterfill and not self.per_batch and self.waterfill_sync == "dynamic"

    def with_mode(self, mode: str) -> "MoeLbOptions":
        return dataclasses.replace(self, mode=mode)

    def describe(self) -> str:
        parts = [f"mode={self.mode}"]
        if self.requested != self.mode:
            parts.append(f"requested={self.requested}")
        if self.waterfill:
            parts.append(f"waterfill={self.waterfill_candidates}/{'per-batch' if self.joint else self.waterfill_sync}")
        if self.lplb:
            parts.append(f"lplb={self.lplb_schedule}")
        return " ".join(parts)


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--moe-lb`` and its sub-options to SGLang's server parser (idempotent)."""
    if any(FLAG in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group("MoE load balancing (sglang-moe-lb)")
    group.add_argument(FLAG, dest="moe_lb", type=str, choices=MODES, default="off", help=HELP_MODE)
    group.add_argument(FLAG_CANDIDATES, dest="moe_lb_waterfill_candidates", choices=CANDIDATES, default=None,
                       help=HELP_CANDIDATES)
    group.add_argument(FLAG_SYNC, dest="moe_lb_waterfill_sync", choices=SYNCS, default=None, help=HELP_SYNC)
    group.add_argument(FLAG_SCHEDULE, dest="moe_lb_lplb_schedule", choices=SCHEDULES, default=None,
                       help=HELP_SCHEDULE)


def options_from_namespace(args: argparse.Namespace) -> MoeLbOptions:
    """Read the flags off a parsed namespace (absent flags: ``off``)."""
    mode = getattr(args, "moe_lb", None) or "off"
    if mode not in MODES:
        raise MoeLbConfigError(f"{FLAG} must be one of {', '.join(MODES)}; got {mode!r}")
    given = {
        "waterfill_candidates": (FLAG_CANDIDATES, getattr(args, "moe_lb_waterfill_candidates", None)),
        "waterfill_sync": (FLAG_SYNC, getattr(args, "moe_lb_waterfill_sync", None)),
        "lplb_schedule": (FLAG_SCHEDULE, getattr(args, "moe_lb_lplb_schedule", None)),
    }
    values = {k: (v if v is not None else DEFAULTS[k]) for k, (_, v) in given.items()}
    explicit = tuple(flag for flag, v in given.values() if v is not None)
    return MoeLbOptions(mode=mode, requested=mode, explicit=explicit, **values)


def _err(key: str, **kw) -> MoeLbConfigError:
    return MoeLbConfigError(ERRORS[key].format(**kw))


def check_raw_args(opts: MoeLbOptions, args) -> tuple[MoeLbOptions, list[str]]:
    """Checks on the raw CLI values, before SGLang resolves them.

    Args:
        opts: from ``options_from_namespace``.
        args: anything with SGLang's raw field names as attributes (the argparse namespace).
    Returns:
        (effective options, warnings). Raises ``MoeLbConfigError``.
    """
    warnings: list[str] = []
    if not opts.active:
        ignored = [f for f in opts.explicit]
        if ignored:
            warnings.append(WARNINGS["ignored"].format(flag=", ".join(ignored), mode="off",
                                                       why="the plugin is off"))
        return opts, warnings
    mode = opts.mode
    if getattr(args, "enable_waterfill", False):
        hint = "--moe-lb waterfill already includes Waterfill" if opts.waterfill else \
            "for both, use --moe-lb waterfill+lplb"
        raise _err("upstream_waterfill", mode=mode, hint=hint)
    if getattr(args, "ep_dispatch_algorithm", None) == "lp":
        raise _err("lp_dispatch", mode=mode)
    if opts.waterfill:
        backend = getattr(args, "moe_a2a_backend", "none") or "none"
        if backend != "deepep":
            raise _err("waterfill_a2a", mode=mode, backend=backend)
        if getattr(args, "disable_shared_experts_fusion", False):
            raise _err("waterfill_fusion_disabled", mode=mode)

    # Sub-options that do nothing in this mode.
    why = {
        FLAG_CANDIDATES: None if opts.waterfill else "it only applies to Waterfill",
        FLAG_SYNC: (
            "it only applies to Waterfill" if not opts.waterfill else
            "per-batch LPLB already gathers global counts once per layer, and Waterfill shares that "
            "collective" if opts.per_batch else None
        ),
        FLAG_SCHEDULE: None if opts.lplb else "it only applies to LPLB",
    }
    for flag in opts.explicit:
        if why.get(flag):
            warnings.append(WARNINGS["ignored"].format(flag=flag, mode=mode, why=why[flag]))

    if opts.lplb and int(getattr(args, "ep_num_redundant_experts", 0) or 0) == 0:
        new_mode = "waterfill" if opts.waterfill else "off"
        rest = "; Waterfill stays on" if opts.waterfill else ""
        warnings.append(WARNINGS["no_redundant"].format(mode=mode, rest=rest))
        opts = opts.with_mode(new_mode)
    return opts, warnings


def check_resolved(opts: MoeLbOptions, view: dict) -> tuple[MoeLbOptions, list[str]]:
    """Checks that need SGLang's resolved configuration and the model's config.

    Args:
        view: ``ep_size``, ``device``, ``cuda_graph`` (bool: a CUDA graph will be captured),
            ``arch`` (architecture name), ``shared_experts`` (int or None when unknown),
            ``shared_detail`` (str, where that number came from), ``fusion_supported``
            (bool or None when unknown), ``graph_safe_kernels`` (bool).
    Returns:
        (effective options, warnings). Raises ``MoeLbConfigError``.
    """
    warnings: list[str] = []
    if not opts.active:
        return opts, warnings
    mode = opts.mode
    if int(view.get("ep_size", 1) or 1) <= 1:
        warnings.append(WARNINGS["ep1"].format(mode=mode))
        return opts.with_mode("off"), warnings
    arch = view.get("arch") or "this model"
    if opts.waterfill:
        shared = view.get("shared_experts")
        if shared is not None and shared <= 0:
            raise _err("no_shared_expert", mode=mode, arch=arch, detail=view.get("shared_detail", "no shared expert"))
        if view.get("fusion_supported") is False:
            raise _err("no_fusion_support", mode=mode, arch=arch)
    if view.get("device") == "cuda" and view.get("cuda_graph") and not view.get("graph_safe_kernels"):
        raise _err("cuda_graph", mode=mode)
    return opts, warnings
