"""Every place the plugin touches SGLang, in one list, and the check that they all exist.

Three kinds of touch point:

* ``HOOKS``: SGLang targets we hook through ``HookRegistry`` (hook type, our handler, when
  it is needed, and the parameters our handler reads from the call).
* ``WRITES``: attributes we write on SGLang objects.
* ``READS``: private attributes we read (and the few public SGLang names the forward path
  depends on that are not hook targets).

``hooks.py`` registers from ``HOOKS``; ``check`` verifies entries against the installed
SGLang (``register()`` for the argument hooks, the launcher's ``resolve_once`` hook and the
scheduler activation for the forward path, and ``sglang-moe-lb doctor`` for all of them);
docs/usage.md's tables are ``markdown()`` (a test keeps them equal). Nothing here imports
a plugin module, so every other plugin module may import this one.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterable

from ..mode import BalanceMode
from ..versions import sglang_version

__all__ = [
    "WRITTEN_FOR",
    "Hook",
    "Attr",
    "Problem",
    "HOOKS",
    "WRITES",
    "READS",
    "hooks_for",
    "check",
    "sglang_version",
    "missing_message",
    "markdown",
    "plugin_filter_note",
]

WRITTEN_FOR = "0.5.23"  # the SGLang release every entry below was read from
ENTRY_POINT = "moe_lb"  # our name in the sglang.srt.plugins group (SGLANG_PLUGINS filters by it)


# When a touch point is needed: (mode, rank_invariant) -> bool. rank_invariant: no a2a backend.
def _always(m: BalanceMode, ri: bool) -> bool:
    return True


def _active(m: BalanceMode, ri: bool) -> bool:
    return m.active


def _lplb(m: BalanceMode, ri: bool) -> bool:
    return m.lplb != "off"


def _plan(m: BalanceMode, ri: bool) -> bool:
    return m.plan


def _waterfill(m: BalanceMode, ri: bool) -> bool:
    return m.waterfill is not None


def _collective(m: BalanceMode, ri: bool) -> bool:
    return m.collective and not ri


def _lplb_collective(m: BalanceMode, ri: bool) -> bool:
    return m.splits and _collective(m, ri)


def _gate(m: BalanceMode, ri: bool) -> bool:
    return m.gate


WHEN: dict[str, tuple[Callable[[BalanceMode, bool], bool], str]] = {
    "always": (_always, "always (argument handling)"),
    "active": (_active, "any active mode"),
    "lplb": (_lplb, "LPLB"),
    "plan": (_plan, "LPLB plan schedule"),
    "waterfill": (_waterfill, "Waterfill"),
    "collective": (_collective, "global sync with an a2a backend"),
    "lplb_collective": (_lplb_collective, "LPLB with global sync and an a2a backend"),
    "gate": (_gate, "--moe-lb-gate on"),
}


@dataclass(frozen=True)
class Hook:
    """One ``HookRegistry`` target.

    target: dotted path. kind: ``BEFORE`` | ``AFTER`` | ``AROUND``. handler: our function,
    ``"<plugin module>.<function>"``. stage: ``light`` (registered by ``register()`` in every
    process) or ``forward`` (registered when a scheduler activates the mode). when: a ``WHEN``
    key. params: parameters of the target our handler reads (a changed signature is caught).
    generator: the target must be a generator function (our AROUND hook ``yield from``s it).
    """

    target: str
    kind: str
    handler: str
    stage: str
    when: str
    does: str
    params: tuple[str, ...] = ()
    generator: bool = False

    def needed(self, mode: BalanceMode, rank_invariant: bool) -> bool:
        return WHEN[self.when][0](mode, rank_invariant)


@dataclass(frozen=True)
class Attr:
    """An attribute of an SGLang object we write (``WRITES``) or read (``READS``).

    owner: dotted path of the class or module. kind, how ``check`` verifies it:
    ``class`` (attribute of the class/module), ``instance`` (the class's source assigns
    ``self.<attr>``), ``new`` (a new attribute of ours: instances must accept attributes),
    ``field`` (a ``ServerArgs`` field), ``bookkeeping`` (a non-field underscore attribute
    ``ServerArgs`` keeps and pickles).
    """

    owner: str
    attr: str
    kind: str
    when: str
    why: str

    @property
    def target(self) -> str:
        return f"{self.owner}.{self.attr}"


_SA = "sglang.srt.server_args.ServerArgs"
_ELD = "sglang.srt.eplb.expert_location_dispatch"
_EL = "sglang.srt.eplb.expert_location"
_EPLB = "sglang.srt.eplb.eplb_manager.EPLBManager"
_TOPK = "sglang.srt.layers.moe.topk.TopK"
_DEEPEP = "sglang.srt.layers.moe.token_dispatcher.deepep.DeepEPDispatcher"
_REC = "sglang.srt.eplb.expert_distribution"
_ENGINE = "sglang.srt.entrypoints.engine.Engine"

HOOKS: tuple[Hook, ...] = (
    Hook(f"{_SA}.add_cli_args", "AFTER", "cli_hooks.after_add_cli_args", "light", "always",
         "adds `--moe-lb` and its sub-options", ("parser",)),
    Hook(f"{_SA}.from_cli_args", "AFTER", "cli_hooks.after_from_cli_args", "light", "always",
         "reads and checks the flags, stores the options as `server_args._moe_lb`, sets the SGLang fields the mode builds on",
         ("args",)),
    Hook(f"{_SA}.resolve_once", "AFTER", "cli_hooks.after_resolve_once", "light", "always",
         "checks that need the resolved config and the model config; checks the forward-path touch points"),
    Hook("sglang.srt.runtime_context.publish", "AFTER", "activation.after_publish", "light", "always",
         "in a scheduler: creates the runtime and hooks the forward path (only what the mode needs)",
         ("server_args", "role")),
    Hook(f"{_ELD}.ExpertLocationDispatchInfo.init_new", "AFTER", "forward_hooks.tag_dispatch_info", "forward",
         "active", "tags the info with its layer", ("layer_id",)),
    Hook("sglang.srt.model_executor.model_runner_components.moe_ep_setup.prepare_moe_topk", "AFTER",
         "forward_hooks.after_prepare_moe_topk", "forward", "active",
         "model loaded, before CUDA graphs: each MoE layer's plan maps and layer path, start-up plans, our Waterfill balancer on each `TopK`, DeepEP dispatchers tagged",
         ("model", "model_config")),
    Hook(f"{_EL}.ExpertLocationMetadata.update", "AFTER", "forward_hooks.after_metadata_update", "forward",
         "active", "follows every placement change layer by layer, in place", ("update_layer_ids",)),
    Hook(f"{_EL}.set_global_expert_location_metadata", "AFTER", "forward_hooks.after_set_global_metadata",
         "forward", "active", "a replaced metadata object (elastic EP)", ("value",)),
    Hook(f"{_ELD}.topk_ids_logical_to_physical", "AROUND", "forward_hooks.logical_to_physical", "forward", "lplb",
         "LPLB: physical ids from the plan's map (one gather), or from the layer path where the gate opens (with Waterfill, shared ranks too); SGLang's own pick where the gate is closed without a plan",
         ("topk_ids", "info", "log2phy_prob")),
    Hook(f"{_TOPK}.empty_topk_output", "AROUND", "forward_hooks.empty_topk_output", "forward", "lplb_collective",
         "an idle rank joins the layer's all-gather", ("device",)),
    Hook(f"{_DEEPEP}.dispatch_a", "BEFORE", "forward_hooks.dispatcher_net", "forward", "collective",
         "joins the layer's all-gather if a model skipped `TopK` on an idle rank", ("topk_output",)),
    Hook(f"{_EL}.ExpertLocationMetadata.init_by_eplb", "AROUND", "forward_hooks.around_init_by_eplb", "forward",
         "plan", "the recorded window and the new placement: starts the plan solve in a background thread",
         ("model_config", "logical_count")),
    Hook("sglang.srt.eplb.eplb_algorithms.rebalance_experts", "AFTER", "forward_hooks.after_rebalance_experts",
         "forward", "plan", "with `--moe-lb-placement decode` (or `auto` from EP 16 on): EPLB's placement after the decode-aware post-step",
         ("tokens_per_expert", "num_physical_experts", "num_local_physical_experts")),
    Hook(f"{_EPLB}.rebalance", "AROUND", "forward_hooks.around_rebalance", "forward", "plan",
         "marks the rebalance; plans install after it", generator=True),
    Hook(f"{_EPLB}.on_forward_pass_end", "AFTER", "forward_hooks.after_forward_pass_end", "forward", "plan",
         "advances the plan cycle: installs solved plans at a pass boundary, starts refreshes"),
)

WRITES: tuple[Attr, ...] = (
    Attr(_ENGINE, "server_args_class", "class", "always",
         "SGLang's override point for building `ServerArgs`: ours pops the `moe_lb*` keywords of `sglang.Engine(...)` (set by `register()` where the Engine module is loaded; `uninstall()` restores it)"),
    Attr(_SA, "_moe_lb", "bookkeeping", "always", "the options, pickled into every scheduler"),
    Attr(_SA, "_moe_lb_checked", "bookkeeping", "active", "the resolved-config checks ran"),
    Attr(_SA, "enable_waterfill", "field", "waterfill", "SGLang's fused shared-expert layout, which our balancer drives"),
    Attr(_SA, "ep_dispatch_algorithm", "field", "lplb", "`dynamic` when unset, so the expert-location dispatch path runs"),
    Attr(f"{_ELD}.ExpertLocationDispatchInfo", "_moe_lb_layer", "new", "active", "the layer of a dispatch info"),
    Attr(_TOPK, "waterfill_balancer", "instance", "waterfill", "our `MoeLbWaterfill` replaces SGLang's `WaterfillBalancer`"),
    Attr(_DEEPEP, "_moe_lb_layer", "new", "collective", "the layer of a DeepEP dispatcher (safety net)"),
)

READS: tuple[Attr, ...] = (
    Attr("argparse.ArgumentParser", "_actions", "instance", "always", "`add_cli_flags` is idempotent (stdlib)"),
    Attr("sglang.srt.plugins.hook_registry.HookRegistry", "_hooks", "class", "always", "`uninstall()` forgets our hooks"),
    Attr("sglang.srt.plugins.hook_registry.HookRegistry", "_patched", "class", "always", "`uninstall()` lets a target be patched again"),
    Attr("sglang.srt.batch_overlap.two_batch_overlap.MaybeTboDeepEPDispatcher", "_inners", "instance", "collective",
         "the DeepEP dispatchers under SGLang's two-batch-overlap wrapper (tagged with their layer)"),
    Attr("sglang.srt.layers.dp_attention", "get_dp_global_num_tokens", "class", "gate",
         "DP attention's per-rank token counts: the batch size every rank shares, for the gate"),
    Attr("sglang.srt.model_executor.forward_context.ForwardContext", "moe_num_token_non_padded", "class", "active",
         "rows past the real tokens (graph padding) route nowhere"),
    Attr("sglang.srt.eplb.expert_location.ExpertLocationMetadata", "physical_to_logical_map_cpu", "instance", "active",
         "SGLang's placement, one row per layer"),
    Attr(_TOPK, "is_draft", "instance", "active", "draft models keep SGLang's dispatch"),
    Attr(_REC, "get_global_expert_distribution_recorder", "class", "plan", "plan refresh: the recorder"),
    Attr(f"{_REC}._ExpertDistributionRecorderReal", "_accumulator", "instance", "plan",
         "plan refresh: the recorder's accumulator"),
    Attr(f"{_REC}._StatAccumulator", "_global_physical_count_of_buffered_step", "instance", "plan",
         "plan refresh: the per-pass physical counts (stat mode)"),
    Attr(f"{_REC}._CircularBuffer", "_buffer", "instance", "plan", "plan refresh: the ring of per-pass counts"),
    Attr(f"{_REC}._CircularBuffer", "_curr_index", "instance", "plan", "plan refresh: where the ring's newest pass is"),
)


@dataclass(frozen=True)
class Problem:
    """A touch point the installed SGLang does not have as we use it."""

    target: str
    detail: str

    def __str__(self) -> str:
        return f"{self.target} ({self.detail})"


def _resolve_owner(path: str):
    """Resolve a dotted module/class path; raises ``ImportError``/``AttributeError``."""
    return pkgutil.resolve_name(path)


def _params_of(fn) -> set[str] | None:
    fn = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    fn = inspect.unwrap(fn)
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _check_hook(h: Hook) -> str | None:
    owner_path, attr = h.target.rsplit(".", 1)
    try:
        owner = _resolve_owner(owner_path)
    except Exception as err:  # ImportError, AttributeError, and whatever a module raises on import
        return f"cannot import {owner_path}: {type(err).__name__}: {err}"
    raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
    fn = raw if raw is not None else getattr(owner, attr, None)
    if fn is None:
        return f"{owner_path} has no attribute {attr!r}"
    target = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    if not callable(target):
        return "not callable"
    params = _params_of(fn)
    if params is not None:
        missing = [p for p in h.params if p not in params]
        if missing:
            return f"signature changed: no parameter {', '.join(missing)}"
    if h.generator and not inspect.isgeneratorfunction(inspect.unwrap(target)):
        return "no longer a generator function"
    return None


def _source_assigns(cls, attr: str) -> bool:
    for klass in inspect.getmro(cls):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if f"self.{attr} =" in src or f"self.{attr}:" in src:
            return True
    return False


def _check_attr(a: Attr) -> str | None:
    try:
        owner = _resolve_owner(a.owner)
    except Exception as err:
        return f"cannot import {a.owner}: {type(err).__name__}: {err}"
    if a.kind == "class":
        return None if hasattr(owner, a.attr) else f"{a.owner} has no attribute {a.attr!r}"
    if not isinstance(owner, type):
        return f"{a.owner} is not a class"
    if a.kind == "instance":
        if a.attr in getattr(owner, "__dataclass_fields__", {}) or a.attr in getattr(owner, "__struct_fields__", ()):
            return None
        return None if _source_assigns(owner, a.attr) else f"{owner.__name__} no longer sets self.{a.attr}"
    if a.kind == "new":
        return None if owner.__dictoffset__ != 0 else f"{owner.__name__} instances take no new attributes (__slots__)"
    if a.kind in ("field", "bookkeeping"):
        fields = set(getattr(owner, "__struct_fields__", ()))
        if a.kind == "field":
            return None if a.attr in fields else f"{owner.__name__} has no field {a.attr!r}"
        if a.attr in fields:
            return f"{owner.__name__} now has a field {a.attr!r} (our bookkeeping name collides)"
        return None if owner.__dictoffset__ != 0 else f"{owner.__name__} keeps no bookkeeping attributes (dict=False)"
    return f"unknown check kind {a.kind!r}"


def check(entries: Iterable[Hook | Attr] | None = None) -> list[Problem]:
    """Check touch points against the installed SGLang (default: all of them).

    Imports the owning modules (as registration would). Returns one ``Problem`` per entry
    that is missing or changed; empty when all are present.
    """
    entries = list(HOOKS + WRITES + READS) if entries is None else list(entries)
    problems = []
    for e in entries:
        detail = _check_hook(e) if isinstance(e, Hook) else _check_attr(e)
        if detail is not None:
            problems.append(Problem(e.target, detail))
    return problems


def hooks_for(stage: str, mode: BalanceMode | None = None, rank_invariant: bool = False) -> list[Hook]:
    """The hooks of a stage (``light``/``forward``), only those ``mode`` needs when given."""
    return [h for h in HOOKS if h.stage == stage and (mode is None or h.needed(mode, rank_invariant))]


def attrs_for(mode: BalanceMode, rank_invariant: bool = False) -> list[Attr]:
    """The writes and reads the forward path of ``mode`` needs (the ``always`` ones are checked
    by ``register()``; leaving them out keeps schedulers from importing the Engine module)."""
    return [a for a in WRITES + READS if a.when != "always" and WHEN[a.when][0](mode, rank_invariant)]


def missing_message(problems: list[Problem], where: str = "") -> str:
    """One line naming every missing/changed touch point and the installed SGLang version."""
    what = "; ".join(str(p) for p in problems)
    return (
        f"sglang-moe-lb{where}: the installed sglang {sglang_version()} does not have what this plugin "
        f"hooks (written for sglang=={WRITTEN_FOR}): {what}. Install sglang=={WRITTEN_FOR}, or leave the "
        f"plugin out (SGLANG_PLUGINS set to the other plugins); `sglang-moe-lb doctor` lists every touch point."
    )


def plugin_filter_note(env: dict | None = None) -> str | None:
    """Why SGLang would not load this plugin in this environment (``SGLANG_PLUGINS``), or None."""
    env = os.environ if env is None else env
    allowed = env.get("SGLANG_PLUGINS")
    if not allowed:
        return None
    names = {x.strip() for x in allowed.split(",") if x.strip()}
    if ENTRY_POINT in names:
        return None
    return (
        f"SGLANG_PLUGINS={allowed!r} leaves this plugin ({ENTRY_POINT!r}) out: SGLang will not load it, so "
        f"--moe-lb is an unrecognized argument and sglang.Engine(moe_lb=...) an unexpected keyword. "
        f"Add {ENTRY_POINT} to SGLANG_PLUGINS."
    )


def entry_point_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT for ep in entry_points(group="sglang.srt.plugins"))


def _short(path: str) -> str:
    return path[len("sglang.srt."):] if path.startswith("sglang.srt.") else path


def markdown() -> str:
    """docs/usage.md's touch-point tables (kept equal to this module by a test)."""
    lines = ["| SGLang target | hook | when | does |", "|---|---|---|---|"]
    for h in HOOKS:
        lines.append(f"| `{_short(h.target)}` | {h.kind.lower()} | {WHEN[h.when][1]} | {h.does} |")
    lines += ["", "Attributes we write on SGLang objects:", "", "| attribute | when | why |", "|---|---|---|"]
    for a in WRITES:
        lines.append(f"| `{_short(a.target)}` | {WHEN[a.when][1]} | {a.why} |")
    lines += ["", "What we read that SGLang could change without notice:", "", "| attribute | when | why |",
              "|---|---|---|"]
    for a in READS:
        lines.append(f"| `{_short(a.target)}` | {WHEN[a.when][1]} | {a.why} |")
    return "\n".join(lines)


def handler(h: Hook):
    """Our handler function of a hook (imported on demand, so this module imports no plugin module)."""
    module, name = h.handler.rsplit(".", 1)
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)
