"""The ``--moe-lb`` flag, its sub-options, and every start-up check on them.

The flags are derived from the core's one mode spec (``sglang_moe_lb.mode``): ``--moe-lb``
takes ``mode.FLAGS``, each sub-option the matching choice tuple, and an absent sub-option
means ``mode.SERVER_DEFAULTS`` (``BalanceMode.from_flag``). ``OPTIONS`` is the one table of
sub-options; the CLI parser, ``sglang.Engine(moe_lb=..., moe_lb_...=...)`` keywords and the
docs all read it.

Nothing here imports SGLang: the checks read plain values (an ``argparse.Namespace`` or a
``ServerArgs`` before resolution, a small dict after it), so they can be tested and
documented on their own. ``cli_hooks`` feeds them SGLang's objects.

Errors are ``MoeLbConfigError`` (a ``ValueError``) with one line naming the flag to change;
``ERRORS``/``WARNINGS`` hold them all (docs/usage.md lists them).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import mode as modes
from ..cost import DTYPE_BYTES, GPUS, CostModelError, load_calibration
from ..cost_files import CostFileError
from ..decode_placement import DECODE_MIN_RANKS, PLACEMENT_CHOICES
from ..gate import DEFAULT_EXPECTED_GAIN, PLAN_EXPECTED_GAIN, Overheads
from ..mode import BalanceMode

__all__ = [
    "FLAG",
    "OPTIONS",
    "Option",
    "CostSettings",
    "PlanSettings",
    "MoeLbOptions",
    "MoeLbConfigError",
    "ERRORS",
    "WARNINGS",
    "add_cli_flags",
    "mode_flags",
    "options_from_values",
    "options_from_namespace",
    "pop_engine_kwargs",
    "check_raw_args",
    "check_resolved",
]

FLAG = "--moe-lb"
TILE_CHOICES = (64, 128)
DEFAULT_TILE = 128


class MoeLbConfigError(ValueError):
    """A ``--moe-lb`` configuration that cannot run; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# The sub-options: one table for the parser, Engine keywords, "ignored" warnings and the docs
# ---------------------------------------------------------------------------------------------
def _number(value, *, integer: bool) -> int | float | None:
    """``value`` read as the flag reads its text, or None when it is not such a number.

    A string goes through ``int``/``float`` exactly as on the command line. Otherwise only a
    real number of the right kind counts: a bool is never a number (``True`` is not 1), and a
    float never an int option's value (the flag refuses ``64.0`` and ``64.9`` alike)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            return int(value) if integer else float(value)
        except ValueError:
            return None
    if isinstance(value, numbers.Integral):
        return int(value) if integer else float(value)
    return float(value) if not integer and isinstance(value, float) else None


def _positive_fraction(text) -> float:
    v = _number(text, integer=False)
    if v is None or not (math.isfinite(v) and 0 < v <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return v


def _tile(text) -> int:
    v = _number(text, integer=True)
    if v not in TILE_CHOICES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, TILE_CHOICES))}, got {text!r}")
    return v


def _file(text) -> str:
    if not isinstance(text, (str, os.PathLike)) or not str(text):
        raise argparse.ArgumentTypeError(f"expected a file path, got {text!r}")
    return str(text)


@dataclass(frozen=True)
class Option:
    """One ``--moe-lb-*`` sub-option.

    key: the ``BalanceMode.from_flag`` keyword it feeds (group ``mode``), or the field of
    ``CostSettings`` (group ``cost``: cost model and gate) or ``PlanSettings`` (group ``plan``).
    applies: ``(mode) -> None`` when it matters for that mode, else the reason it is ignored.
    parse: argparse ``type`` (raises ``ArgumentTypeError``).
    """

    flag: str
    key: str
    choices: tuple | None
    help: str
    applies: Callable[[BalanceMode], str | None]
    parse: Callable[[Any], Any] = str
    metavar: str | None = None
    group: str = "mode"

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def _needs_lplb(m: BalanceMode) -> str | None:
    return None if m.lplb != "off" else "it only applies to LPLB"


def _needs_split(m: BalanceMode) -> str | None:
    if m.lplb == "off":
        return "it only applies to LPLB"
    return None if m.splits else ("it only applies to the per-batch split (--moe-lb-lplb-schedule per-batch, or "
                                  "plan with --moe-lb-gate on)")


def _needs_plan(m: BalanceMode) -> str | None:
    if m.lplb == "off":
        return "it only applies to LPLB"
    return None if m.plan else "it only applies to --moe-lb-lplb-schedule plan"


def _needs_waterfill(m: BalanceMode) -> str | None:
    return None if m.waterfill is not None else "it only applies to Waterfill"


def _needs_waterfill_sync(m: BalanceMode) -> str | None:
    if m.waterfill is None:
        return "it only applies to Waterfill"
    if m.splits:
        return "with a per-batch split, Waterfill is decided in the same split and shares --moe-lb-lplb-sync"
    return None


def _needs_cost(m: BalanceMode) -> str | None:
    if not m.active:
        return "the plugin is off"
    return None if (m.plan or m.objective == "tiles" or m.gate) else (
        "the cost model is only used by plans, --moe-lb-objective tiles and --moe-lb-gate on")


def _count(minimum: int, noun: str):
    def parse(text) -> int:
        v = _number(text, integer=True)
        if v is None or v < minimum:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {minimum}, got {text!r}")
        return v

    return parse


def _seconds(text) -> float:
    v = _number(text, integer=False)
    if v is None or not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return v


def _needs_gate(m: BalanceMode) -> str | None:
    if not m.active:
        return "the plugin is off"
    return None if m.gate else "it only applies to --moe-lb-gate on"


def _gate_flag(text) -> bool:
    if isinstance(text, bool):
        return text
    if text in ("on", "off"):
        return text == "on"
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def _choice(choices):
    def parse(text):
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, choices))}, got {text!r}")
        return text

    return parse


_D = modes.SERVER_DEFAULTS
# Plan options: where they come from is docs/defaults.md (placement) and docs/design.md (cadence).
PLAN_DEFAULTS: dict = {"placement": "auto", "timeout_s": 60.0, "solver": "process"}

OPTIONS: tuple[Option, ...] = (
    Option("--moe-lb-lplb-schedule", "schedule", modes.SCHEDULES,
           "LPLB: 'plan' applies dispatch plans solved by HiGHS-checked solvers at start-up, at each EPLB "
           "rebalance and between rebalances (which copies of each expert serve its tokens, per batch size; "
           "one gather, like SGLang's static dispatch: no kernel, no collective), and with --moe-lb-gate on "
           "the exact per-batch split where its kernels pay; 'per-batch' solves the exact split of every "
           f"batch (default: {_D['schedule']}).", _needs_lplb, _choice(modes.SCHEDULES)),
    Option("--moe-lb-lplb-sync", "lplb_sync", modes.SYNCS,
           "The per-batch split: 'global' all-gathers each rank's expert counts once per MoE layer (int32) and "
           "splits the global counts; 'local' splits only this rank's own tokens, with no collective "
           f"(default: {_D['lplb_sync']}).", _needs_split, _choice(modes.SYNCS)),
    Option("--moe-lb-objective", "objective", modes.OBJECTIVES,
           "The per-batch split: minimise the busiest rank's 'tokens', or its grouped-GEMM 'tiles' "
           "(uses the cost model's tile; on CUDA the kernels run 'tokens' only, so 'tiles' needs CUDA graphs "
           f"off; default: {_D['objective']}).", _needs_split, _choice(modes.OBJECTIVES)),
    Option("--moe-lb-waterfill-candidates", "candidates", modes.CANDIDATES,
           "Waterfill: ranks that may run a token's shared expert. 'conservative': only ranks the token "
           "already visits, plus its own rank (no extra traffic); 'all_rank': any EP rank "
           f"(default: {_D['candidates']}).", _needs_waterfill, _choice(modes.CANDIDATES)),
    Option("--moe-lb-waterfill-sync", "waterfill_sync", modes.SYNCS,
           "Waterfill without per-batch LPLB: 'local' balances against this rank's own tokens (no "
           "communication); 'global' against the global rank loads, one all-gather over the EP group per "
           f"MoE layer (default: {_D['waterfill_sync']}).", _needs_waterfill_sync, _choice(modes.SYNCS)),
    Option("--moe-lb-gate", "gate", ("on", "off"),
           "Run per-batch work only where the cost model predicts more gain than its overhead; elsewhere the "
           "plan (plan schedule) or SGLang's own dispatch runs, with no collective; decided from batch sizes "
           f"every rank shares (default: {'on' if _D['gate'] else 'off'}).",
           lambda m: None if m.active else "the plugin is off", _gate_flag),
    Option("--moe-lb-gpu", "gpu", tuple(GPUS),
           "Cost model: the GPU's datasheet numbers (default: detected from the device name, else H200 "
           "with a logged note).", _needs_cost, _choice(tuple(GPUS)), group="cost"),
    Option("--moe-lb-dtype", "dtype", tuple(DTYPE_BYTES),
           "Cost model: expert weight dtype (default: fp8 for an fp8-quantised model, else bf16).",
           _needs_cost, _choice(tuple(DTYPE_BYTES)), group="cost"),
    Option("--moe-lb-calibration", "calibration_path", None,
           "Cost model: a calibration file measured on this GPU (format in docs/cost-model.md); overrides "
           "the datasheet numbers.", _needs_cost, _file, metavar="FILE", group="cost"),
    Option("--moe-lb-tile-tokens", "tile_tokens", TILE_CHOICES,
           f"Cost model: the grouped GEMM's M-tile in tokens (default: the calibration file's, else {DEFAULT_TILE}).",
           _needs_cost, _tile, group="cost"),
    Option("--moe-lb-overheads", "overheads_path", None,
           "Gate: a table of measured hot-path and collective microseconds per mode (format of "
           "sglang_moe_lb/data/overheads_h200.json, the default).", _needs_gate, _file, metavar="FILE",
           group="cost"),
    Option("--moe-lb-expected-gain", "expected_gain", None,
           "Gate: the share of a layer's time the per-batch work takes off what runs where the gate is closed, "
           f"in (0, 1] (default: {PLAN_EXPECTED_GAIN} over a plan, {DEFAULT_EXPECTED_GAIN} over SGLang static; "
           "replay --batch-sweep measures it).", _needs_gate, _positive_fraction, metavar="FLOAT", group="cost"),
    Option("--moe-lb-placement", "placement", PLACEMENT_CHOICES,
           "Plans: 'eplb' keeps SGLang's EPLB placement; 'decode' moves copies after each EPLB placement (same "
           "replica counts, prefill token balance kept) so plans can switch copies off evenly in decode; 'auto' "
           f"is decode from {DECODE_MIN_RANKS} EP ranks on, else eplb (default: {PLAN_DEFAULTS['placement']}).",
           _needs_plan, _choice(PLACEMENT_CHOICES), group="plan"),
    Option("--moe-lb-plan-refresh", "refresh_passes", None,
           "Plans: forward passes between refreshes from the recent expert counts of SGLang's recorder (no "
           "weights move; one all-reduce of the counts per refresh); 0 = only at start-up and each EPLB "
           "rebalance (default: --eplb-rebalance-num-iterations / 4 with --enable-eplb, else 0).",
           _needs_plan, _count(0, "a number of passes"), metavar="PASSES", group="plan"),
    Option("--moe-lb-plan-window", "window_passes", None,
           "Plans: the most recent forward passes of recorded counts a refresh solves from (default: the "
           "refresh interval).", _needs_plan, _count(1, "a number of passes"), metavar="PASSES", group="plan"),
    Option("--moe-lb-plan-timeout", "timeout_s", None,
           "Plans: seconds a background solve may take before it is dropped and every layer keeps its plan "
           f"(default: {PLAN_DEFAULTS['timeout_s']:g}).", _needs_plan, _seconds, metavar="SECONDS", group="plan"),
    Option("--moe-lb-plan-solver", "solver", ("process", "thread"),
           "Plans: where background solves run: one helper process per scheduler ('process', never holds the "
           "forward thread's interpreter lock) or a thread of the scheduler ('thread': no extra process, but "
           f"forward passes slow down while it solves) (default: {PLAN_DEFAULTS['solver']}).", _needs_plan,
           _choice(("process", "thread")), group="plan"),
)
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}

HELP_MODE = (
    "Dispatch-time MoE load balancing for expert parallelism (sglang-moe-lb plugin). "
    "'lplb' decides which copies of every replicated expert serve its tokens so that the busiest "
    "EP rank takes as little time as possible (dispatch plans per batch size, solved in the EPLB cycle "
    "and applied by one gather; with the gate, the exact per-batch split where it pays: "
    "--moe-lb-lplb-schedule); it needs redundant experts (--ep-num-redundant-experts, usually "
    "with --enable-eplb). 'waterfill' runs each token's shared expert on a lightly loaded EP rank as "
    "one extra fused top-k slot; it needs a model with a shared expert (DeepSeek-V3/R1 family) and "
    "--moe-a2a-backend deepep. 'waterfill+lplb' does both. Replaces, and cannot be combined with, "
    "--enable-waterfill and --ep-dispatch-algorithm lp. Default: off."
)


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------
ERRORS = {
    "upstream_waterfill": (
        "--moe-lb {mode} cannot be combined with SGLang's own --enable-waterfill: both would drive "
        "the same fused shared-expert slot. Remove --enable-waterfill ({hint})."
    ),
    "lp_dispatch": (
        "--moe-lb {mode} cannot be combined with --ep-dispatch-algorithm lp: both decide how tokens "
        "are split over expert replicas. Remove --ep-dispatch-algorithm lp (per-batch LP balancing "
        "is --moe-lb lplb --moe-lb-lplb-schedule per-batch, or the default plan with its gate)."
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
    "redundant_negative": (
        "--moe-lb {mode}: --ep-num-redundant-experts must be >= 0 (got {n}). Set it to 0 (no replicas) "
        "or a positive count."
    ),
    "redundant_indivisible": (
        "--moe-lb {mode}: {experts} routed + {n} redundant experts = {total} expert slots do not split "
        "evenly over {ranks} EP ranks. Change --ep-num-redundant-experts to a value that makes the total "
        "a multiple of --ep-size (e.g. {suggest})."
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
        "--moe-lb {mode} with CUDA graphs in the {phases} phase: {reason}. Turn those graphs off "
        "({flags}){alt}, or install sglang-moe-lb-kernels with a CUDA-graph-safe implementation."
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
    "cost_file": "{flag}: {detail}",
    "cost_model": (
        "--moe-lb {mode} needs the cost model (plans, --moe-lb-objective tiles, --moe-lb-gate on), which cannot "
        "read this model's expert shape: {detail}. Use --moe-lb-lplb-schedule per-batch with "
        "--moe-lb-objective tokens and --moe-lb-gate off."
    ),
    "overheads_key": (
        "--moe-lb-overheads {path}: no hot-path time for mode {key!r} (the table has {known}). Add it, "
        "or turn the gate off (--moe-lb-gate off)."
    ),
    "engine_kwarg": "sglang.Engine(..., {kwarg}=...) ({flag}): {detail}",
    "engine_unknown": (
        "sglang.Engine(..., {kwarg}=...): not an sglang-moe-lb option. Known: {known}."
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
    "gate_not_shared": (
        "--moe-lb-gate on with {mode}: without DP attention (--attn-dp-size) the ranks of an a2a "
        "backend share no batch size to decide from, and a collective must be skipped on every rank "
        "or none; the gate stays open (every batch is balanced). Use DP attention, or "
        "--moe-lb-lplb-sync local / --moe-lb-waterfill-sync local."
    ),
}


def _err(which: str, /, **kw) -> MoeLbConfigError:
    return MoeLbConfigError(ERRORS[which].format(**kw))


# ---------------------------------------------------------------------------------------------
# What the user asked for
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostSettings:
    """The cost model and gate settings (used by the tile objective and the gate).

    gpu: a key of ``cost.GPUS``, or None (detect on the device). dtype: a key of
    ``cost.DTYPE_BYTES``, or None (from the model's quantisation). calibration: the loaded
    ``cost.load_calibration`` dict (read once in the launcher, carried to every rank).
    tile_tokens: 64 | 128 | None (the calibration's, else 128). overheads: a loaded
    ``gate.Overheads`` or None (the bundled H200 table). expected_gain: None for
    ``gate.DEFAULT_EXPECTED_GAIN``.
    """

    gpu: str | None = None
    dtype: str | None = None
    calibration_path: str | None = None
    calibration: dict | None = None
    tile_tokens: int | None = None
    overheads_path: str | None = None
    overheads: Any = None
    expected_gain: float | None = None


@dataclass(frozen=True)
class PlanSettings:
    """How plans are made and refreshed (plan schedule).

    placement: ``auto``, ``eplb`` or ``decode`` (``decode_placement.decode_aware_placement`` after
    each EPLB placement; ``decode_placement.resolve_placement`` says what ``auto`` is). refresh_passes: forward passes between refreshes (None: a quarter of SGLang's
    rebalance interval with EPLB on, else 0 = none). window_passes: recent passes a refresh
    reads (None: the refresh interval). timeout_s: a background solve's limit. solver: where
    background solves run (``process`` or ``thread``; ``rebalance.py``).
    """

    placement: str = PLAN_DEFAULTS["placement"]
    refresh_passes: int | None = None
    window_passes: int | None = None
    timeout_s: float = PLAN_DEFAULTS["timeout_s"]
    solver: str = PLAN_DEFAULTS["solver"]


@dataclass(frozen=True)
class MoeLbOptions:
    """What the user asked for, after defaults (carried to every scheduler on ``ServerArgs``).

    Attributes:
        mode: the effective ``BalanceMode`` (``requested`` downgraded by start-up checks).
        requested: the ``BalanceMode`` of the flags as given.
        cost: cost model and gate settings.
        plan: plan settings.
        explicit: the sub-option flags the user passed (for "ignored" warnings).
        entry: ``"cli"`` (launch_server / sglang serve) or ``"engine"`` (``sglang.Engine``).
    """

    mode: BalanceMode = BalanceMode()
    requested: BalanceMode = BalanceMode()
    cost: CostSettings = CostSettings()
    plan: PlanSettings = PlanSettings()
    explicit: tuple[str, ...] = ()
    entry: str = "cli"

    @property
    def active(self) -> bool:
        return self.mode.active

    def with_mode(self, mode: BalanceMode) -> "MoeLbOptions":
        return dataclasses.replace(self, mode=mode)

    def describe(self) -> str:
        parts = [f"mode={self.mode.name}"]
        if self.requested != self.mode:
            parts.append(f"requested={self.requested.name}")
        c = self.cost
        if self.mode.plan:
            p = self.plan
            parts.append(f"placement={p.placement} refresh={p.refresh_passes if p.refresh_passes is not None else 'auto'}")
        if self.mode.plan or self.mode.objective == "tiles" or self.mode.gate:
            parts.append(f"gpu={c.gpu or 'auto'} dtype={c.dtype or 'auto'} tile={c.tile_tokens or 'auto'}")
            if c.calibration_path:
                parts.append(f"calibration={c.calibration_path}")
        if self.mode.gate and c.overheads_path:
            parts.append(f"overheads={c.overheads_path}")
        return " ".join(parts)


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--moe-lb`` and its sub-options to SGLang's server parser (idempotent)."""
    if any(FLAG in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group("MoE load balancing (sglang-moe-lb)")
    group.add_argument(FLAG, dest="moe_lb", type=str, choices=modes.FLAGS, default="off", help=HELP_MODE)
    for o in OPTIONS:
        # With choices, argparse's own "invalid choice" message lists them; values are
        # converted (on/off -> bool) in options_from_values.
        kind = (int if o.choices == TILE_CHOICES else str) if o.choices else o.parse
        group.add_argument(o.flag, dest=o.dest, type=kind, choices=o.choices, default=None,
                           metavar=o.metavar, help=o.help)


def mode_flags(mode: BalanceMode) -> list[str]:
    """The command-line flags that select ``mode`` (every relevant sub-option spelled out)."""
    out = [FLAG, mode.flag]
    if mode.lplb != "off":
        out += ["--moe-lb-lplb-schedule", mode.lplb]
    if mode.splits:
        out += ["--moe-lb-lplb-sync", mode.lplb_sync, "--moe-lb-objective", mode.objective]
    if mode.waterfill is not None:
        out += ["--moe-lb-waterfill-candidates", mode.waterfill]
        if mode.waterfill_sync is not None:
            out += ["--moe-lb-waterfill-sync", mode.waterfill_sync]
    if mode.active:
        out += ["--moe-lb-gate", "on" if mode.gate else "off"]
    return out


def options_from_values(values: Mapping[str, Any], *, entry: str = "cli",
                        name: Callable[[Option], str] | None = None) -> MoeLbOptions:
    """Build the options from ``{dest: value}`` (absent or None: default).

    Values are checked here too (the Engine path has no argparse): a bad one raises
    ``MoeLbConfigError`` naming it (``name(option)``; default the flag).
    """
    name = name or (lambda o: o.flag)
    flag = values.get("moe_lb") or "off"
    if flag not in modes.FLAGS:
        raise MoeLbConfigError(f"{FLAG} must be one of {', '.join(modes.FLAGS)}; got {flag!r}")
    parsed: dict[str, Any] = {}
    for o in OPTIONS:
        v = values.get(o.dest)
        if v is None:
            continue
        try:
            v = o.parse(v)
        except argparse.ArgumentTypeError as err:
            raise MoeLbConfigError(f"{name(o)}: {err}") from None
        parsed[o.dest] = v
    def group(g: str) -> dict:
        return {OPTION_BY_DEST[d].key: v for d, v in parsed.items() if OPTION_BY_DEST[d].group == g}

    requested = BalanceMode.from_flag(flag, **group("mode"))
    explicit = tuple(OPTION_BY_DEST[d].flag for d in parsed)
    return MoeLbOptions(mode=requested, requested=requested, cost=CostSettings(**group("cost")),
                        plan=PlanSettings(**group("plan")), explicit=explicit, entry=entry)


def options_from_namespace(args: argparse.Namespace) -> MoeLbOptions:
    """Read the flags off a parsed namespace (absent flags: ``off``)."""
    return options_from_values({d: getattr(args, d, None) for d in ("moe_lb", *OPTION_BY_DEST)})


def pop_engine_kwargs(kwargs: dict) -> dict:
    """Remove and return the ``moe_lb``/``moe_lb_*`` keywords of an ``sglang.Engine(...)`` call.

    Raises ``MoeLbConfigError`` for a ``moe_lb_*`` name that is not an option."""
    ours = {k: kwargs.pop(k) for k in list(kwargs) if k == "moe_lb" or k.startswith("moe_lb_")}
    for k in ours:
        if k != "moe_lb" and k not in OPTION_BY_DEST:
            raise _err("engine_unknown", kwarg=k, known=", ".join(("moe_lb", *OPTION_BY_DEST)))
    return ours


def engine_options(ours: Mapping[str, Any]) -> MoeLbOptions:
    """Options from ``sglang.Engine`` keywords; errors name the keyword and its flag."""
    if "moe_lb" in ours and ours["moe_lb"] not in modes.FLAGS:
        raise _err("engine_kwarg", kwarg="moe_lb", flag=FLAG,
                   detail=f"expected one of {', '.join(modes.FLAGS)}, got {ours['moe_lb']!r}")
    return options_from_values(ours, entry="engine", name=lambda o: f"sglang.Engine(..., {o.dest}=...) ({o.flag})")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def _load_cost_files(opts: MoeLbOptions) -> MoeLbOptions:
    """Read the calibration and overheads files now (one-line errors naming the flag)."""
    c = opts.cost
    cal = ov = None
    if c.calibration_path is not None:
        try:
            cal = load_calibration(c.calibration_path)
        except CostModelError as err:
            raise _err("cost_file", flag="--moe-lb-calibration", detail=err) from None
    if c.overheads_path is not None:
        try:
            ov = Overheads.measured(c.overheads_path)
        except CostFileError as err:  # the validator replay and Engine share (cost_files.py)
            raise _err("cost_file", flag="--moe-lb-overheads", detail=err) from None
    return dataclasses.replace(opts, cost=dataclasses.replace(c, calibration=cal, overheads=ov))


def _check_overheads_cover(opts: MoeLbOptions) -> None:
    ov = opts.cost.overheads
    if not opts.mode.gate or ov is None:
        return
    for form in (opts.mode.opened, opts.mode.closed):
        try:
            ov.mode_us(form, 1, 2)
        except KeyError:
            raise _err("overheads_key", path=opts.cost.overheads_path, key=Overheads.key(form),
                       known=", ".join(sorted(ov.hot_path))) from None


def _check_redundant(opts: MoeLbOptions, args) -> None:
    n = int(getattr(args, "ep_num_redundant_experts", 0) or 0)
    if n < 0:
        raise _err("redundant_negative", mode=opts.mode.flag, n=n)


def check_raw_args(opts: MoeLbOptions, args) -> tuple[MoeLbOptions, list[str]]:
    """Checks on the raw values, before SGLang resolves them.

    Args:
        opts: from ``options_from_namespace`` / ``engine_options``.
        args: anything with SGLang's raw field names as attributes (the argparse namespace,
            or the ``ServerArgs`` an ``Engine`` built).
    Returns:
        (effective options, warnings). Raises ``MoeLbConfigError``.
    """
    warnings: list[str] = []
    mode = opts.mode
    for flag in opts.explicit:
        why = next(o for o in OPTIONS if o.flag == flag).applies(mode) if mode.active else "the plugin is off"
        if why:
            warnings.append(WARNINGS["ignored"].format(flag=flag, mode=mode.flag, why=why))
    if not opts.active:
        return opts, warnings
    if getattr(args, "enable_waterfill", False):
        hint = "--moe-lb waterfill already includes Waterfill" if mode.waterfill else \
            "for both, use --moe-lb waterfill+lplb"
        raise _err("upstream_waterfill", mode=mode.flag, hint=hint)
    if getattr(args, "ep_dispatch_algorithm", None) == "lp":
        raise _err("lp_dispatch", mode=mode.flag)
    if mode.waterfill is not None:
        backend = getattr(args, "moe_a2a_backend", "none") or "none"
        if backend != "deepep":
            raise _err("waterfill_a2a", mode=mode.flag, backend=backend)
        if getattr(args, "disable_shared_experts_fusion", False):
            raise _err("waterfill_fusion_disabled", mode=mode.flag)
    _check_redundant(opts, args)
    opts = _load_cost_files(opts)
    _check_overheads_cover(opts)

    if mode.lplb != "off" and int(getattr(args, "ep_num_redundant_experts", 0) or 0) == 0:
        rest = "; Waterfill stays on" if mode.waterfill else ""
        warnings.append(WARNINGS["no_redundant"].format(mode=mode.flag, rest=rest))
        opts = opts.with_mode(mode.with_(lplb="off"))
    return opts, warnings


def check_resolved(opts: MoeLbOptions, view: dict) -> tuple[MoeLbOptions, list[str]]:
    """Checks that need SGLang's resolved configuration and the model's config.

    Args:
        view: ``ep_size``, ``device``, ``graph_phases`` (phases with CUDA graphs on, e.g.
            ``["decode"]``), ``graph_safe`` (``(bool, reason)`` from ``hot_path.graph_safety``),
            ``graph_safe_with_tokens`` (tile-objective modes: whether the token objective would be),
            ``arch``, ``shared_experts`` (int or None when unknown), ``shared_detail``,
            ``fusion_supported`` (bool or None), ``num_experts`` (routed experts or None),
            ``redundant`` (int), ``attn_dp_size`` (int), ``a2a_backend`` (str),
            ``cost_model_error`` (why the model config gives no expert shape, when the mode needs one).
    Returns:
        (effective options, warnings). Raises ``MoeLbConfigError``.
    """
    warnings: list[str] = []
    if not opts.active:
        return opts, warnings
    mode = opts.mode
    ep = int(view.get("ep_size", 1) or 1)
    if ep <= 1:
        warnings.append(WARNINGS["ep1"].format(mode=mode.flag))
        return opts.with_mode(BalanceMode()), warnings
    arch = view.get("arch") or "this model"
    experts, red = view.get("num_experts"), int(view.get("redundant", 0) or 0)
    if experts is not None and (experts + red) % ep:
        suggest = next(n for n in range(red + 1, red + ep + 1) if (experts + n) % ep == 0)
        raise _err("redundant_indivisible", mode=mode.flag, experts=experts, n=red, total=experts + red,
                   ranks=ep, suggest=suggest)
    if mode.waterfill is not None:
        shared = view.get("shared_experts")
        if shared is not None and shared <= 0:
            raise _err("no_shared_expert", mode=mode.flag, arch=arch, detail=view.get("shared_detail", "no shared expert"))
        if view.get("fusion_supported") is False:
            raise _err("no_fusion_support", mode=mode.flag, arch=arch)
    if view.get("cost_model_error"):
        raise _err("cost_model", mode=mode.flag, detail=view["cost_model_error"])
    phases = list(view.get("graph_phases") or [])
    if view.get("device") == "cuda" and phases:
        safe, reason = view.get("graph_safe", (False, "no kernel check ran"))
        if not safe:
            flags = " and ".join(f"--cuda-graph-backend-{p} disabled" for p in phases)
            if len(phases) == 2:
                flags += ", or --disable-cuda-graph"
            alt = (", or use the token objective, which these kernels run under graphs (--moe-lb-objective tokens)"
                   if view.get("graph_safe_with_tokens") else "")
            raise _err("cuda_graph", mode=mode.flag, phases=" and ".join(phases), reason=reason, flags=flags, alt=alt)
    if mode.gate and mode.collective and int(view.get("attn_dp_size", 1) or 1) <= 1 \
            and (view.get("a2a_backend") or "none") != "none":
        warnings.append(WARNINGS["gate_not_shared"].format(mode=mode.name))
    return opts, warnings
